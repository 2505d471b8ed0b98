"""Reading LeRobot datasets: `LeRobotDataset`, validated when built, images decoded lazily."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...robot.embodiment import Embodiment
from .format import (
    DEFAULT_CHUNKS_SIZE,
    INFO_PATH,
    READ_VERSIONS,
    V2_EPISODES_PATH,
    V2_TASKS_PATH,
    V3_TASKS_PATH,
    DatasetError,
    column_matrix,
    column_vector,
    format_path,
    image_feature_key,
    open_parquet,
    read_columns,
    read_json,
    read_jsonl,
)
from .video import (
    VideoStream,
    decode_image_bytes,
    frame_to_rgb,
)

# Caches a forked process inherited from its parent. Freeing their FFmpeg objects (decoder and
# scaler thread pools whose threads did not survive the fork) deadlocks, so they are kept alive
# and never touched again.
_INHERITED_CACHES: list = []


class _WorkerCache:
    """Per-process state of a reader: open videos and recently read parquet image columns."""

    def __init__(self, max_videos: int, max_columns: int):
        self.pid = os.getpid()
        self.max_videos, self.max_columns = max_videos, max_columns
        self.videos: OrderedDict[Path, VideoStream] = OrderedDict()
        self.columns: OrderedDict[tuple, pa.Array] = OrderedDict()

    def video(self, path: Path) -> VideoStream:
        stream = self.videos.pop(path, None) or VideoStream(path)
        self.videos[path] = stream
        while len(self.videos) > self.max_videos:
            self.videos.popitem(last=False)[1].close()
        return stream

    def column(self, key: tuple, load) -> pa.Array:
        column = self.columns.pop(key, None)
        if column is None:
            column = load()
        self.columns[key] = column
        while len(self.columns) > self.max_columns:
            self.columns.popitem(last=False)
        return column

    def close(self) -> None:
        for stream in self.videos.values():
            stream.close()
        self.videos.clear()
        self.columns.clear()


@dataclass
class _Episode:
    index: int
    length: int
    tasks: list[str]
    data_file: int  # position in LeRobotDataset._files
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # key -> (file, from)


@dataclass
class _DataFile:
    path: Path
    row_group_starts: np.ndarray  # first row of every row group, then the total


class LeRobotDataset:
    """A LeRobot dataset (v2.1 or v3.0) as training samples for one embodiment.

    Sample `i` (a frame of some episode) is a dict::

        images        [HxWx3 uint8 per image key] (resized to image_size if given)
        state         float32 (state_dim,)
        instruction   the frame's task text
        actions       float32 (horizon, action_dim): the actions at t .. t + horizon - 1,
                      the episode's last action repeated past its end
        action_mask   bool (horizon,): False for the repeated (padded) steps
        episode_index, frame_index: int
        embodiment    the embodiment's normalization key

    Everything is validated when the dataset is built; images are decoded lazily, with
    per-process caches (containers are opened on first use in each DataLoader worker).
    """

    def __init__(self, root: str | Path, horizon: int, embodiment: Embodiment,
                 image_keys: list[str] | None = None, state_key: str = "observation.state",
                 action_key: str = "action", image_size: tuple[int, int] | None = None,
                 cache_images: bool = False):
        """Open and validate the dataset at `root`.

        Args:
            root: dataset directory (holding `meta/info.json`).
            horizon: number of actions per sample.
            embodiment: the robot; state and action dims must match it.
            image_keys: image features to return, in order (full keys or camera names);
                default: every image/video feature in `info.json` order.
            state_key: the state feature.
            action_key: the action feature.
            image_size: (height, width) every image is resized to; None keeps the size.
            cache_images: decode each episode's images once, all in a row, and keep them in
                this process's memory (frames x height x width x 3 bytes per camera): for
                datasets that fit, training then decodes no video after the first epoch.

        Raises:
            DatasetError: naming the file or field at fault.
        """
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.root = Path(root)
        self.horizon = int(horizon)
        self.embodiment = embodiment
        self.state_key, self.action_key = state_key, action_key
        self.image_size = tuple(int(s) for s in image_size) if image_size else None
        self._info_path = self.root / INFO_PATH
        self._info = info = read_json(self._info_path)
        self.version = str(info.get("codebase_version", ""))
        if self.version not in READ_VERSIONS:
            raise DatasetError(f"{self._info_path}: codebase_version {self.version!r} is not "
                               f"supported (supported: {', '.join(READ_VERSIONS)})")
        for name in ("fps", "features", "data_path"):
            if name not in info:
                raise DatasetError(f"{self._info_path}: field {name!r} missing")
        self.fps = float(info["fps"])
        if not self.fps > 0:
            raise DatasetError(f"{self._info_path}: fps must be positive, got {info['fps']}")
        self._features: dict = info["features"]
        problems = [p for p in (
            self._check_vector_feature(action_key, embodiment.action_dim, "action_dim"),
            self._check_vector_feature(state_key, embodiment.state_dim, "state_dim")) if p]
        if problems:
            raise DatasetError("; ".join(problems))
        self.image_keys = self._select_image_keys(image_keys)
        self._video_keys = [k for k in self.image_keys if self._features[k]["dtype"] == "video"]
        if self._video_keys and not info.get("video_path"):
            raise DatasetError(f"{self._info_path}: video_path missing but features "
                               f"{self._video_keys} are videos")
        self._files: list[_DataFile] = []
        if self.version == "v3.0":
            self.tasks = self._read_tasks_v3()
            episodes = self._read_episodes_v3()
        else:
            self.tasks = self._read_tasks_v2()
            episodes = self._read_episodes_v2()
        if not episodes:
            raise DatasetError(f"{self.root}: the dataset has no episodes")
        self._episodes = episodes
        self._load_frames()
        self._check_totals()
        self._check_videos_decode()
        self._cache: _WorkerCache | None = None
        self.cache_images = bool(cache_images)
        self._frames: dict[tuple[str, int], np.ndarray] = {}  # (key, episode position) -> frames

    # -- validation and loading ----------------------------------------------------------

    def _check_vector_feature(self, key: str, expected: int, what: str) -> str:
        """A problem with the feature `key` ("" if none)."""
        feature = self._features.get(key)
        if not isinstance(feature, dict):
            return f"{key}: feature missing from {self._info_path}"
        shape = feature.get("shape")
        if not isinstance(shape, (list, tuple)) or len(shape) != 1:
            return f"{key}: shape {shape!r} in {self._info_path} is not [dim]"
        if feature.get("dtype") not in ("float32", "float64", "float16"):
            return f"{key}: dtype {feature.get('dtype')!r} in {self._info_path} is not a float"
        if int(shape[0]) != expected:
            return (f"{key}: dataset has {shape[0]} dims, embodiment {self.embodiment.name} "
                    f"expects {expected} ({what}; {self._info_path})")
        return ""

    def _select_image_keys(self, image_keys: list[str] | None) -> list[str]:
        available = [k for k, ft in self._features.items()
                     if isinstance(ft, dict) and ft.get("dtype") in ("video", "image")]
        if image_keys is None:
            return available
        selected = []
        for name in image_keys:
            key = name if name in self._features else image_feature_key(name)
            if key not in available:
                raise DatasetError(f"image key {name!r}: not an image/video feature of "
                                   f"{self._info_path} (image features: {available})")
            selected.append(key)
        return selected

    def _read_tasks_v2(self) -> dict[int, str]:
        path = self.root / V2_TASKS_PATH
        tasks = {}
        for row in read_jsonl(path):
            try:
                tasks[int(row["task_index"])] = str(row["task"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f"{path}: row {row!r} lacks task_index/task") from exc
        return tasks

    def _read_tasks_v3(self) -> dict[int, str]:
        path = self.root / V3_TASKS_PATH
        if not path.is_file() and (self.root / V2_TASKS_PATH).is_file():
            return self._read_tasks_v2()  # some v3.0 docs describe tasks.jsonl
        pf = open_parquet(path)
        names = pf.schema_arrow.names
        text = "task" if "task" in names else "__index_level_0__"
        table = read_columns(pf, path, ["task_index", text])
        indices = column_vector(table, "task_index", path)
        texts = table.column(text).to_pylist()
        return {int(i): str(t) for i, t in zip(indices, texts, strict=True)}

    def _read_episodes_v2(self) -> list[_Episode]:
        path = self.root / V2_EPISODES_PATH
        chunks_size = int(self._info.get("chunks_size", DEFAULT_CHUNKS_SIZE))
        video_template = self._info.get("video_path")
        episodes = []
        for row in sorted(read_jsonl(path), key=lambda r: r.get("episode_index", -1)):
            try:
                index, length = int(row["episode_index"]), int(row["length"])
                tasks = [str(t) for t in row.get("tasks", [])]
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f"{path}: row {row!r} lacks episode_index/length") from exc
            chunk = index // chunks_size
            data = self.root / format_path(self._info["data_path"], "data_path",
                                            self._info_path, episode_chunk=chunk,
                                            episode_index=index)
            episode = _Episode(index, length, tasks, self._data_file(data))
            for key in self._video_keys:
                video = self.root / format_path(video_template, "video_path", self._info_path,
                                                 episode_chunk=chunk, video_key=key,
                                                 episode_index=index)
                episode.videos[key] = (self._check_video(video, key, index), 0.0)
            episodes.append(episode)
        return episodes

    def _read_episodes_v3(self) -> list[_Episode]:
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DatasetError(f"{self.root / 'meta' / 'episodes'}: no episode metadata files "
                               "(chunk-XXX/file-XXX.parquet)")
        needed = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        for key in self._video_keys:
            needed += [f"videos/{key}/chunk_index", f"videos/{key}/file_index",
                       f"videos/{key}/from_timestamp"]
        rows: list[tuple[Path, dict]] = []
        for path in files:
            pf = open_parquet(path)
            columns = needed + (["tasks"] if "tasks" in pf.schema_arrow.names else [])
            for row in read_columns(pf, path, columns).to_pylist():
                rows.append((path, row))
        data_files: dict[tuple[int, int], int] = {}
        episodes = []
        for path, row in sorted(rows, key=lambda r: r[1]["episode_index"]):
            if any(row[c] is None for c in needed):
                raise DatasetError(f"{path}: episode {row['episode_index']} has null fields")
            index = int(row["episode_index"])
            where = (int(row["data/chunk_index"]), int(row["data/file_index"]))
            if where not in data_files:
                data = self.root / format_path(self._info["data_path"], "data_path",
                                                self._info_path, chunk_index=where[0],
                                                file_index=where[1])
                data_files[where] = self._data_file(data)
            episode = _Episode(index, int(row["length"]), [str(t) for t in row.get("tasks") or []],
                               data_files[where])
            for key in self._video_keys:
                video = self.root / format_path(
                    self._info["video_path"], "video_path", self._info_path, video_key=key,
                    chunk_index=int(row[f"videos/{key}/chunk_index"]),
                    file_index=int(row[f"videos/{key}/file_index"]))
                episode.videos[key] = (self._check_video(video, key, index),
                                       float(row[f"videos/{key}/from_timestamp"]))
            episodes.append(episode)
        return episodes

    def _data_file(self, path: Path) -> int:
        pf = open_parquet(path)
        metadata = pf.metadata
        starts = np.zeros(metadata.num_row_groups + 1, dtype=np.int64)
        starts[1:] = np.cumsum([metadata.row_group(k).num_rows
                                for k in range(metadata.num_row_groups)])
        self._files.append(_DataFile(path, starts))
        return len(self._files) - 1

    def _check_video(self, path: Path, key: str, episode: int) -> Path:
        if not path.is_file():
            raise DatasetError(f"{path}: video file of {key} (episode {episode}) is missing")
        if path.stat().st_size == 0:
            raise DatasetError(f"{path}: video file of {key} (episode {episode}) is empty")
        return path

    def _load_frames(self) -> None:
        """Read the low-dim columns of every data file and order them by episode and frame."""
        state_dim, action_dim = self.embodiment.state_dim, self.embodiment.action_dim
        by_file: dict[int, list[_Episode]] = {}
        for episode in self._episodes:
            by_file.setdefault(episode.data_file, []).append(episode)
        image_columns = [k for k in self.image_keys if self._features[k]["dtype"] == "image"]
        loaded: dict[int, dict] = {}
        for file_id, members in by_file.items():
            path = self._files[file_id].path
            pf = open_parquet(path)
            names = pf.schema_arrow.names
            for key in image_columns:
                if key not in names:
                    raise DatasetError(f"{path}: image column {key} missing")
            columns = [self.state_key, self.action_key, "episode_index", "frame_index"]
            columns += [c for c in ("timestamp", "task_index") if c in names]
            table = read_columns(pf, path, columns)
            state = column_matrix(table, self.state_key, state_dim, path)
            action = column_matrix(table, self.action_key, action_dim, path)
            for key, values in ((self.state_key, state), (self.action_key, action)):
                if not np.isfinite(values).all():
                    raise DatasetError(f"{path}: column {key} has non-finite values")
            ep = column_vector(table, "episode_index", path).astype(np.int64)
            frame = column_vector(table, "frame_index", path).astype(np.int64)
            ts = (column_vector(table, "timestamp", path).astype(np.float64)
                  if "timestamp" in names else frame / self.fps)
            task = (column_vector(table, "task_index", path).astype(np.int64)
                    if "task_index" in names else np.full(len(ep), -1, dtype=np.int64))
            order = np.lexsort((frame, ep))
            for episode in members:
                lo, hi = np.searchsorted(ep[order], [episode.index, episode.index + 1])
                rows = order[lo:hi]
                if len(rows) != episode.length:
                    raise DatasetError(f"{path}: episode {episode.index} has {len(rows)} rows, "
                                       f"the episode metadata says length {episode.length}")
                if not np.array_equal(frame[rows], np.arange(len(rows))):
                    raise DatasetError(f"{path}: frame_index of episode {episode.index} is not "
                                       f"0..{len(rows) - 1}")
                loaded[episode.index] = dict(state=state[rows], action=action[rows],
                                             ts=ts[rows], task=task[rows], row=rows)
        parts = [loaded[e.index] for e in self._episodes]
        self._state = np.concatenate([p["state"] for p in parts]).astype(np.float32)
        self._action = np.concatenate([p["action"] for p in parts]).astype(np.float32)
        self._timestamp = np.concatenate([p["ts"] for p in parts])
        self._task = np.concatenate([p["task"] for p in parts])
        self._row = np.concatenate([p["row"] for p in parts]).astype(np.int64)
        lengths = np.array([e.length for e in self._episodes], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self._episode_of = np.repeat(np.arange(len(self._episodes)), lengths)
        unknown = sorted(set(np.unique(self._task).tolist()) - set(self.tasks) - {-1})
        if unknown:
            raise DatasetError(f"task_index: values {unknown[:5]} of the data are not in the "
                               f"tasks of {self.root / 'meta'}")
        for position, episode in enumerate(self._episodes):
            rows = slice(self._starts[position], self._starts[position + 1])
            if not episode.tasks and np.any(self._task[rows] < 0):
                raise DatasetError(f"episode {episode.index}: no task_index column and no tasks "
                                   "in the episode metadata")

    def _check_videos_decode(self) -> None:
        """Decode the first and last frame each episode needs from every video file.

        A video cut short (a copy interrupted, a disk filled up) still opens; it only fails at
        the frames it lost. Checking both ends of every episode's span here turns that into an
        error naming the file before training starts, instead of one inside a loader worker
        after hours of training.
        """
        spans: dict[Path, list[float]] = {}
        for position, episode in enumerate(self._episodes):
            rows = slice(self._starts[position], self._starts[position + 1])
            first, last = float(self._timestamp[rows][0]), float(self._timestamp[rows][-1])
            for path, start in episode.videos.values():
                span = spans.setdefault(path, [math.inf, -math.inf])
                span[0] = min(span[0], start + first)
                span[1] = max(span[1], start + last)
        for path, (first, last) in spans.items():
            stream = VideoStream(path)
            try:
                for ts in (first, last):
                    stream.frame_at(ts, tolerance=1.0 / self.fps)
            finally:
                stream.close()

    def _check_totals(self) -> None:
        for name, actual in (("total_episodes", len(self._episodes)),
                             ("total_frames", len(self._state))):
            if name in self._info and int(self._info[name]) != actual:
                raise DatasetError(f"{self._info_path}: {name} is {self._info[name]} but the "
                                   f"episode metadata has {actual}")

    # -- public API ----------------------------------------------------------------------

    @property
    def num_episodes(self) -> int:
        """Number of episodes."""
        return len(self._episodes)

    @property
    def num_frames(self) -> int:
        """Number of frames (samples)."""
        return len(self._state)

    @property
    def episode_indices(self) -> list[int]:
        """The episode_index of every episode, in dataset order."""
        return [e.index for e in self._episodes]

    def __len__(self) -> int:
        return len(self._state)

    def states(self) -> np.ndarray:
        """All states, (N, state_dim) float32 (a copy)."""
        return self._state.copy()

    def actions(self) -> np.ndarray:
        """All actions, (N, action_dim) float32 (a copy)."""
        return self._action.copy()

    def instruction(self, i: int) -> str:
        """The task text of frame `i`."""
        task = int(self._task[i])
        if task >= 0:
            return self.tasks[task]
        return self._episodes[self._episode_of[i]].tasks[0]

    def __getitem__(self, i: int) -> dict:
        n = len(self._state)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} frames")
        i = int(i) % n
        position = int(self._episode_of[i])
        episode = self._episodes[position]
        end = int(self._starts[position + 1])
        steps = np.arange(i, i + self.horizon)
        rows = np.minimum(steps, end - 1)
        return {
            "images": [self._cached_image(key, i, position) if self.cache_images
                       else self._image(key, i, episode) for key in self.image_keys],
            "state": self._state[i].copy(),
            "instruction": self.instruction(i),
            "actions": self._action[rows],
            "action_mask": steps < end,
            "episode_index": episode.index,
            "frame_index": i - int(self._starts[position]),
            "embodiment": self.embodiment.normalization_key,
        }

    # -- images --------------------------------------------------------------------------

    def _worker_cache(self) -> _WorkerCache:
        # A forked DataLoader worker must not share the parent's open files: one cache per pid.
        if self._cache is None or self._cache.pid != os.getpid():
            if self._cache is not None:
                _INHERITED_CACHES.append(self._cache)
            keys = max(1, len(self.image_keys))
            self._cache = _WorkerCache(max_videos=2 * keys, max_columns=2 * keys)
        return self._cache

    def _cached_image(self, key: str, i: int, position: int) -> np.ndarray:
        """Frame `i` from the episode's decoded frames (decoded in one pass on first use)."""
        frames = self._frames.get((key, position))
        if frames is None:
            episode = self._episodes[position]
            rows = range(int(self._starts[position]), int(self._starts[position + 1]))
            frames = np.stack([self._image(key, row, episode) for row in rows])
            frames.flags.writeable = False
            self._frames[(key, position)] = frames
        return frames[i - int(self._starts[position])]

    def _image(self, key: str, i: int, episode: _Episode) -> np.ndarray:
        if key in episode.videos:
            path, start = episode.videos[key]
            frame = self._worker_cache().video(path).frame_at(
                start + float(self._timestamp[i]), tolerance=1.0 / self.fps)
            return frame_to_rgb(frame, self.image_size)
        return self._parquet_image(key, i, episode)

    def _parquet_image(self, key: str, i: int, episode: _Episode) -> np.ndarray:
        data_file = self._files[episode.data_file]
        row = int(self._row[i])
        group = int(np.searchsorted(data_file.row_group_starts, row, side="right") - 1)

        def load() -> pa.Array:
            try:
                table = pq.ParquetFile(data_file.path).read_row_group(group, columns=[key])
            except (pa.ArrowException, OSError) as exc:
                raise DatasetError(f"{data_file.path}: cannot read {key} ({exc})") from exc
            return table.column(key).combine_chunks()

        column = self._worker_cache().column((episode.data_file, group, key), load)
        value = column[row - int(data_file.row_group_starts[group])].as_py()
        where = f"{data_file.path} row {row} {key}"
        if isinstance(value, dict):
            data, image_path = value.get("bytes"), value.get("path")
            if data is None and image_path:
                image_path = Path(image_path)
                image_path = image_path if image_path.is_absolute() else self.root / image_path
                try:
                    data = image_path.read_bytes()
                except OSError as exc:
                    raise DatasetError(f"{where}: image file {image_path} unreadable") from exc
            if data is None:
                raise DatasetError(f"{where}: image has neither bytes nor path")
            return frame_to_rgb(decode_image_bytes(data, where), self.image_size)
        raise DatasetError(f"{where}: expected an image struct {{bytes, path}}, got "
                           f"{type(value).__name__}")

    def close(self) -> None:
        """Close the video files opened by this process."""
        if self._cache is not None:
            if self._cache.pid == os.getpid():
                self._cache.close()
            else:
                _INHERITED_CACHES.append(self._cache)
        self._cache = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # open containers never travel to another process
        state["_frames"] = {}   # nor decoded frames: each process decodes its own
        return state

    def __repr__(self) -> str:
        return (f"LeRobotDataset({str(self.root)!r}, {self.version}, {self.num_episodes} "
                f"episodes, {self.num_frames} frames, {self.fps:g} fps, "
                f"embodiment={self.embodiment.name!r}, images={self.image_keys})")
