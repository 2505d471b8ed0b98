"""LeRobot datasets, formats v2.1 and v3.0: a validating reader and a writer.

Format contract
---------------
Both versions share `meta/info.json`::

    codebase_version  "v2.1" (also read: "v2.0") or "v3.0"
    fps               frames per second of every episode (int in LeRobot; a float is accepted)
    features          {key: {"dtype", "shape", "names"[, "info"]}}:
        observation.images.<cam>  dtype "video" (mp4 files) or "image" (in the parquet rows),
                                  shape [H, W, 3]; video features carry "info" with video.fps,
                                  video.codec, video.pix_fmt, ...
        observation.state         float32 [state_dim]
        action                    float32 [action_dim]
        timestamp                 float32 [1]  seconds since the episode's first frame
        frame_index, episode_index, index (global frame), task_index: int64 [1]
    data_path, video_path  str.format templates (video_path is null without video features)
    chunks_size, total_episodes, total_frames, total_tasks, robot_type, splits
    v2.1 only: total_chunks, total_videos
    v3.0 only: data_files_size_in_mb, video_files_size_in_mb (and "fps" in non-video features)

Parquet columns: one per non-video feature; [d] vectors are (fixed-size) lists, [1] features
scalars, images a struct {bytes: PNG/JPEG, path: str} (Hugging Face `datasets.Image`).

v2.1 (one file per episode; chunk = episode_index // chunks_size)::

    data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet
    videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4
    meta/episodes.jsonl        {"episode_index", "tasks": [str], "length"} per line
    meta/tasks.jsonl           {"task_index", "task"} per line
    meta/episodes_stats.jsonl  {"episode_index", "stats": {feature: {min, max, mean, ...}}}
    meta/stats.json

v3.0 (many episodes per file; files roll over by size)::

    data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet
    videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4   (episodes concatenated)
    meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet  one row per episode:
        episode_index, tasks (list of str), length, data/chunk_index, data/file_index,
        dataset_from_index, dataset_to_index, videos/<key>/{chunk_index, file_index,
        from_timestamp, to_timestamp}, meta/episodes/{chunk_index, file_index}, stats/<f>/<s>
    meta/tasks.parquet         column task_index; the task string is the pandas index "task"
    meta/stats.json

A frame's image is the video frame whose presentation time is closest to its `timestamp`
(plus the episode's `videos/<key>/from_timestamp` in v3.0).

Reader: `LeRobotDataset` validates the whole dataset when it is built (meta files, every
parquet footer, every video file's presence, dims against the embodiment, image keys) and
raises `DatasetError` naming the file or field at fault; low-dimensional columns are loaded
into memory, images are decoded lazily with per-process caches (safe in DataLoader workers).

Writer: `LeRobotWriter` writes either version, videos with PyAV (libx264, yuv420p: lossy) or
PNG images inside the parquet rows, and the meta files (info, tasks, episodes, stats) at
`finalize()`.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..embodiment import Embodiment

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError("twinbrain_ros.data.lerobot needs pyarrow: pip install pyarrow==26.0.1"
                      ) from _exc

IMAGE_KEY_PREFIX = "observation.images."
READ_VERSIONS = ("v2.0", "v2.1", "v3.0")
WRITE_VERSIONS = ("v2.1", "v3.0")
DEFAULT_CHUNKS_SIZE = 1000

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
V2_EPISODES_PATH = "meta/episodes.jsonl"
V2_EPISODES_STATS_PATH = "meta/episodes_stats.jsonl"
V2_TASKS_PATH = "meta/tasks.jsonl"
V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V3_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_TASKS_PATH = "meta/tasks.parquet"

QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_RECENT_FRAMES = 16  # decoded frames kept per open video (consecutive indices are cheap)
# Caches a forked process inherited from its parent. Freeing their FFmpeg objects (decoder and
# scaler thread pools whose threads did not survive the fork) deadlocks, so they are kept alive
# and never touched again.
_INHERITED_CACHES: list = []


class DatasetError(ValueError):
    """A dataset is missing, unreadable or inconsistent; the message names the file or field."""


def _av():
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("LeRobot videos and images need PyAV: pip install av==18.1.0") from exc
    return av


def image_feature_key(name: str) -> str:
    """`observation.images.<name>` for a bare camera name; full feature keys are kept."""
    return name if name.startswith("observation.") else IMAGE_KEY_PREFIX + name


# -- small file helpers ----------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, (json.dumps(obj, indent=4) + "\n").encode())


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _write_parquet_atomic(path: Path, table: pa.Table, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, **kwargs)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable ({exc})") from exc
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: line {number} is not valid JSON ({exc})") from exc
    return rows


def _open_parquet(path: Path) -> pq.ParquetFile:
    """Open a parquet file and read its footer; a missing or truncated file is a DatasetError."""
    if not path.is_file():
        raise DatasetError(f"{path}: parquet file missing")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: unreadable parquet file ({exc})") from exc


def _read_columns(pf: pq.ParquetFile, path: Path, columns: list[str]) -> pa.Table:
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise DatasetError(f"{path}: columns {missing} missing")
    try:
        return pf.read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: unreadable parquet data ({exc})") from exc


def _column_matrix(table: pa.Table, key: str, dim: int, path: Path) -> np.ndarray:
    """An (N, dim) float array from a list / fixed-size-list (or scalar, dim 1) column."""
    column = table.column(key).combine_chunks()
    if column.null_count:
        raise DatasetError(f"{path}: column {key} has {column.null_count} null rows")
    n = len(column)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) \
            or pa.types.is_fixed_size_list(column.type):
        if pa.types.is_fixed_size_list(column.type):
            lengths_ok = column.type.list_size == dim
        else:
            lengths_ok = bool(np.all(np.diff(column.offsets.to_numpy()) == dim))
        if not lengths_ok:
            raise DatasetError(f"{path}: column {key} rows do not all have {dim} values")
        values = column.flatten()
        if values.null_count:
            raise DatasetError(f"{path}: column {key} has null values")
        out = values.to_numpy(zero_copy_only=False).reshape(n, dim)
    elif dim == 1:
        out = column.to_numpy(zero_copy_only=False).reshape(n, 1)
    else:
        raise DatasetError(f"{path}: column {key} is {column.type}, not a list of {dim} values")
    return out


def _column_vector(table: pa.Table, key: str, path: Path) -> np.ndarray:
    column = table.column(key).combine_chunks()
    if column.null_count:
        raise DatasetError(f"{path}: column {key} has null rows")
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        column = column.flatten()  # a [1] feature written as a list
        if len(column) != len(table):
            raise DatasetError(f"{path}: column {key} is not one value per row")
    return column.to_numpy(zero_copy_only=False)


def _format_path(template: str, field_name: str, info_path: Path, **kwargs) -> str:
    try:
        return template.format(**kwargs)
    except (KeyError, IndexError, ValueError) as exc:
        raise DatasetError(f"{info_path}: {field_name} template {template!r} cannot be "
                           f"filled ({exc!r})") from exc


# -- images and video frames -----------------------------------------------------------------


def _to_rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    """An av.VideoFrame as HxWx3 uint8, resized to size=(height, width) if given."""
    if size is not None and (frame.height, frame.width) != tuple(size):
        height, width = size
        shrink = height <= frame.height and width <= frame.width
        frame = frame.reformat(width=width, height=height, format="rgb24",
                               interpolation="AREA" if shrink else "BILINEAR")
    return frame.to_ndarray(format="rgb24")


def _decode_image_bytes(data: bytes, where: str):
    """PNG or JPEG bytes -> av.VideoFrame."""
    av = _av()
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        codec = "png"
    elif data[:3] == b"\xff\xd8\xff":
        codec = "mjpeg"
    else:
        raise DatasetError(f"{where}: image bytes are neither PNG nor JPEG")
    try:
        frames = av.CodecContext.create(codec, "r").decode(av.Packet(data))
    except av.FFmpegError as exc:
        raise DatasetError(f"{where}: cannot decode image ({exc})") from exc
    if not frames:
        raise DatasetError(f"{where}: image bytes decode to no frame")
    return frames[0]


def encode_png(image: np.ndarray) -> bytes:
    """HxWx3 uint8 -> PNG bytes (lossless), through PyAV's PNG encoder."""
    av = _av()
    image = np.ascontiguousarray(image, dtype=np.uint8)
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    return b"".join(bytes(p) for p in codec.encode(frame) + codec.encode(None))


class _VideoStream:
    """One opened video file: frames by presentation time, decoding forward from a seek."""

    def __init__(self, path: Path):
        av = _av()
        self.path = path
        try:
            self.container = av.open(str(path))
            self.stream = self.container.streams.video[0]
        except (av.FFmpegError, IndexError) as exc:
            raise DatasetError(f"{path}: cannot open video ({exc})") from exc
        self.time_base = float(self.stream.time_base)
        self._frames = None  # decode iterator, positioned after the last recent frame
        self._recent: OrderedDict[float, object] = OrderedDict()  # contiguous decoded frames

    def close(self) -> None:
        self._frames = None
        self._recent.clear()
        self.container.close()

    def _nearest(self, ts: float) -> tuple[float, object]:
        t = min(self._recent, key=lambda k: abs(k - ts))
        return t, self._recent[t]

    def frame_at(self, ts: float, tolerance: float):
        """The frame whose time is closest to `ts` seconds (an av.VideoFrame)."""
        if self._recent:
            first, last = next(iter(self._recent)), next(reversed(self._recent))
            if first - tolerance <= ts <= last:
                t, frame = self._nearest(ts)
                if abs(t - ts) <= tolerance:
                    return frame
            # Forward within a second: keep decoding; otherwise (or backwards) seek.
            if not (self._frames is not None and last < ts <= last + 1.0):
                self._seek(ts)
        else:
            self._seek(ts)
        av = _av()
        try:
            for frame in self._frames:
                if frame.pts is None:
                    continue
                t = float(frame.pts * self.time_base)
                self._recent[t] = frame
                while len(self._recent) > _RECENT_FRAMES:
                    self._recent.popitem(last=False)
                if t >= ts:
                    break
            else:
                self._frames = None  # end of stream
        except av.FFmpegError as exc:
            raise DatasetError(f"{self.path}: cannot decode video near t={ts:.3f} s ({exc})"
                               ) from exc
        if not self._recent:
            raise DatasetError(f"{self.path}: no frame decoded at t={ts:.3f} s")
        t, frame = self._nearest(ts)
        if abs(t - ts) > tolerance:
            raise DatasetError(f"{self.path}: no frame within {tolerance:.4f} s of t={ts:.4f} s "
                               f"(nearest at {t:.4f} s)")
        return frame

    def _seek(self, ts: float) -> None:
        av = _av()
        self._recent.clear()
        target = max(0, int(math.floor(ts / self.time_base)) - 1)
        try:
            self.container.seek(target, backward=True, any_frame=False, stream=self.stream)
        except av.FFmpegError as exc:
            raise DatasetError(f"{self.path}: cannot seek to t={ts:.3f} s ({exc})") from exc
        self._frames = self.container.decode(self.stream)


class _WorkerCache:
    """Per-process state of a reader: open videos and recently read parquet image columns."""

    def __init__(self, max_videos: int, max_columns: int):
        self.pid = os.getpid()
        self.max_videos, self.max_columns = max_videos, max_columns
        self.videos: OrderedDict[Path, _VideoStream] = OrderedDict()
        self.columns: OrderedDict[tuple, pa.Array] = OrderedDict()

    def video(self, path: Path) -> _VideoStream:
        stream = self.videos.pop(path, None) or _VideoStream(path)
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


# -- reader ----------------------------------------------------------------------------------


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
                 action_key: str = "action", image_size: tuple[int, int] | None = None):
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
        self._info = info = _read_json(self._info_path)
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
        for row in _read_jsonl(path):
            try:
                tasks[int(row["task_index"])] = str(row["task"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f"{path}: row {row!r} lacks task_index/task") from exc
        return tasks

    def _read_tasks_v3(self) -> dict[int, str]:
        path = self.root / V3_TASKS_PATH
        if not path.is_file() and (self.root / V2_TASKS_PATH).is_file():
            return self._read_tasks_v2()  # some v3.0 docs describe tasks.jsonl
        pf = _open_parquet(path)
        names = pf.schema_arrow.names
        text = "task" if "task" in names else "__index_level_0__"
        table = _read_columns(pf, path, ["task_index", text])
        indices = _column_vector(table, "task_index", path)
        texts = table.column(text).to_pylist()
        return {int(i): str(t) for i, t in zip(indices, texts, strict=True)}

    def _read_episodes_v2(self) -> list[_Episode]:
        path = self.root / V2_EPISODES_PATH
        chunks_size = int(self._info.get("chunks_size", DEFAULT_CHUNKS_SIZE))
        video_template = self._info.get("video_path")
        episodes = []
        for row in sorted(_read_jsonl(path), key=lambda r: r.get("episode_index", -1)):
            try:
                index, length = int(row["episode_index"]), int(row["length"])
                tasks = [str(t) for t in row.get("tasks", [])]
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f"{path}: row {row!r} lacks episode_index/length") from exc
            chunk = index // chunks_size
            data = self.root / _format_path(self._info["data_path"], "data_path",
                                            self._info_path, episode_chunk=chunk,
                                            episode_index=index)
            episode = _Episode(index, length, tasks, self._data_file(data))
            for key in self._video_keys:
                video = self.root / _format_path(video_template, "video_path", self._info_path,
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
            pf = _open_parquet(path)
            columns = needed + (["tasks"] if "tasks" in pf.schema_arrow.names else [])
            for row in _read_columns(pf, path, columns).to_pylist():
                rows.append((path, row))
        data_files: dict[tuple[int, int], int] = {}
        episodes = []
        for path, row in sorted(rows, key=lambda r: r[1]["episode_index"]):
            if any(row[c] is None for c in needed):
                raise DatasetError(f"{path}: episode {row['episode_index']} has null fields")
            index = int(row["episode_index"])
            where = (int(row["data/chunk_index"]), int(row["data/file_index"]))
            if where not in data_files:
                data = self.root / _format_path(self._info["data_path"], "data_path",
                                                self._info_path, chunk_index=where[0],
                                                file_index=where[1])
                data_files[where] = self._data_file(data)
            episode = _Episode(index, int(row["length"]), [str(t) for t in row.get("tasks") or []],
                               data_files[where])
            for key in self._video_keys:
                video = self.root / _format_path(
                    self._info["video_path"], "video_path", self._info_path, video_key=key,
                    chunk_index=int(row[f"videos/{key}/chunk_index"]),
                    file_index=int(row[f"videos/{key}/file_index"]))
                episode.videos[key] = (self._check_video(video, key, index),
                                       float(row[f"videos/{key}/from_timestamp"]))
            episodes.append(episode)
        return episodes

    def _data_file(self, path: Path) -> int:
        pf = _open_parquet(path)
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
            pf = _open_parquet(path)
            names = pf.schema_arrow.names
            for key in image_columns:
                if key not in names:
                    raise DatasetError(f"{path}: image column {key} missing")
            columns = [self.state_key, self.action_key, "episode_index", "frame_index"]
            columns += [c for c in ("timestamp", "task_index") if c in names]
            table = _read_columns(pf, path, columns)
            state = _column_matrix(table, self.state_key, state_dim, path)
            action = _column_matrix(table, self.action_key, action_dim, path)
            for key, values in ((self.state_key, state), (self.action_key, action)):
                if not np.isfinite(values).all():
                    raise DatasetError(f"{path}: column {key} has non-finite values")
            ep = _column_vector(table, "episode_index", path).astype(np.int64)
            frame = _column_vector(table, "frame_index", path).astype(np.int64)
            ts = (_column_vector(table, "timestamp", path).astype(np.float64)
                  if "timestamp" in names else frame / self.fps)
            task = (_column_vector(table, "task_index", path).astype(np.int64)
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
            stream = _VideoStream(path)
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
            "images": [self._image(key, i, episode) for key in self.image_keys],
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

    def _image(self, key: str, i: int, episode: _Episode) -> np.ndarray:
        if key in episode.videos:
            path, start = episode.videos[key]
            frame = self._worker_cache().video(path).frame_at(
                start + float(self._timestamp[i]), tolerance=1.0 / self.fps)
            return _to_rgb(frame, self.image_size)
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
            return _to_rgb(_decode_image_bytes(data, where), self.image_size)
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
        return state

    def __repr__(self) -> str:
        return (f"LeRobotDataset({str(self.root)!r}, {self.version}, {self.num_episodes} "
                f"episodes, {self.num_frames} frames, {self.fps:g} fps, "
                f"embodiment={self.embodiment.name!r}, images={self.image_keys})")


# -- writer ----------------------------------------------------------------------------------


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def _codec_options(vcodec: str, crf: int, gop: int) -> dict[str, str]:
    options = {"g": str(gop)}
    if vcodec in ("libx264", "libx265", "libsvtav1", "libvpx-vp9"):
        options["crf"] = str(crf)
    return options


class _VideoEncoder:
    """An mp4 file being encoded frame by frame (written to `<name>.partial`, then renamed)."""

    def __init__(self, path: Path, fps: float, height: int, width: int, vcodec: str,
                 crf: int, gop: int):
        av = _av()
        self.path = path
        self.tmp = path.with_name(path.name + ".partial")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.rate = _rate(fps)
        self.container = av.open(str(self.tmp), "w", format="mp4")
        self.stream = self.container.add_stream(vcodec, rate=self.rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.options = _codec_options(vcodec, crf, gop)
        self.frames = 0

    def add(self, images: np.ndarray) -> None:
        av = _av()
        for image in images:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = self.frames, 1 / self.rate
            self.frames += 1
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def size(self) -> int:
        return self.tmp.stat().st_size if self.tmp.exists() else 0

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.path)


def _hf_feature(feature: dict) -> dict:
    """The Hugging Face `datasets` feature of a LeRobot feature (parquet schema metadata)."""
    if feature["dtype"] == "image":
        return {"_type": "Image"}
    if list(feature["shape"]) == [1]:
        return {"dtype": feature["dtype"], "_type": "Value"}
    return {"feature": {"dtype": feature["dtype"], "_type": "Value"},
            "length": int(feature["shape"][0]), "_type": "Sequence"}


def _vector_array(values: np.ndarray, dtype) -> pa.Array:
    values = np.ascontiguousarray(values)
    flat = pa.array(values.reshape(-1), type=dtype)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _numeric_stats(values: np.ndarray) -> dict[str, list]:
    values = np.asarray(values, dtype=np.float64)
    values = values.reshape(len(values), -1)
    stats = {"min": values.min(0), "max": values.max(0), "mean": values.mean(0),
             "std": values.std(0)}
    stats.update({name: np.quantile(values, q, axis=0) for name, q in QUANTILES.items()})
    out = {k: v.tolist() for k, v in stats.items()}
    out["count"] = [len(values)]
    return out


def _image_stats(images: np.ndarray, max_frames: int = 32, max_side: int = 64) -> dict:
    """Per-channel statistics in [0, 1], shape (3, 1, 1), over a sample of frames and pixels."""
    t, h, w = images.shape[:3]
    frames = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    sample = images[frames, :: max(1, h // max_side), :: max(1, w // max_side)]
    pixels = sample.reshape(-1, 3).astype(np.float64) / 255.0
    stats = {"min": pixels.min(0), "max": pixels.max(0), "mean": pixels.mean(0),
             "std": pixels.std(0)}
    stats.update({name: np.quantile(pixels, q, axis=0) for name, q in QUANTILES.items()})
    out = {k: v.reshape(3, 1, 1).tolist() for k, v in stats.items()}
    out["count"] = [len(frames)]
    return out


def _aggregate_stats(parts: list[dict]) -> dict:
    """Merge per-episode statistics: exact min/max/mean/std, count-weighted quantiles."""
    counts = np.array([p["count"][0] for p in parts], dtype=np.float64)
    weights = counts / counts.sum()
    arrays = {k: np.array([p[k] for p in parts], dtype=np.float64) for k in parts[0]
              if k != "count"}
    mean = np.tensordot(weights, arrays["mean"], axes=1)
    var = np.tensordot(weights, arrays["std"] ** 2 + (arrays["mean"] - mean) ** 2, axes=1)
    out = {"min": arrays["min"].min(0), "max": arrays["max"].max(0), "mean": mean,
           "std": np.sqrt(np.maximum(var, 0.0))}
    out.update({name: np.tensordot(weights, arrays[name], axes=1) for name in QUANTILES})
    result = {k: v.tolist() for k, v in out.items()}
    result["count"] = [int(counts.sum())]
    return result


class LeRobotWriter:
    """Writes a LeRobot dataset (v2.1 or v3.0) episode by episode; `finalize()` writes meta.

    Data and video files are written as episodes arrive (videos into `.partial` files renamed
    when complete); `meta/info.json` is written last, so a dataset without it is incomplete.
    """

    def __init__(self, root: str | Path, fps: float, embodiment: Embodiment,
                 image_keys: list[str], version: str = "v2.1", use_videos: bool = True,
                 robot_type: str | None = None, *, vcodec: str = "libx264", crf: int = 23,
                 gop: int = 2, chunks_size: int = DEFAULT_CHUNKS_SIZE,
                 data_file_size_mb: float = 100, video_file_size_mb: float = 200):
        """Prepare an empty dataset directory.

        Args:
            root: dataset directory; must not exist or be empty.
            fps: frame rate of every episode.
            embodiment: the robot (state/action dims, joint names).
            image_keys: camera feature keys (`observation.images.<cam>`) or camera names.
            version: "v2.1" (one file per episode) or "v3.0" (episodes concatenated in files).
            use_videos: encode mp4 videos; False stores PNG images in the parquet rows.
            robot_type: `robot_type` of info.json (default: the embodiment name).
            vcodec: PyAV video encoder (libx264 here; libsvtav1 is LeRobot's default).
            crf: encoder quality (lower is better and larger).
            gop: keyframe interval in frames (small: fast random access).
            chunks_size: files per chunk directory.
            data_file_size_mb: v3.0 parquet size (MB) at which a new data file is started.
            video_file_size_mb: v3.0 mp4 size (MB) at which a new video file is started.
        """
        if version not in WRITE_VERSIONS:
            raise ValueError(f"version {version!r} is not one of {WRITE_VERSIONS}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.root = Path(root)
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise FileExistsError(f"{self.root}: exists and is not an empty directory")
        if len(set(map(image_feature_key, image_keys))) != len(image_keys):
            raise ValueError(f"image keys are not unique: {image_keys}")
        if use_videos:
            _av().codec.Codec(vcodec, "w")  # fail now if the encoder is missing
        self.fps = float(fps)
        self.embodiment = embodiment
        self.version = version
        self.use_videos = use_videos
        self.robot_type = robot_type if robot_type is not None else embodiment.name
        self.image_keys = [image_feature_key(k) for k in image_keys]
        self._names = dict(zip(self.image_keys, image_keys, strict=True))
        self.vcodec, self.crf, self.gop = vcodec, int(crf), int(gop)
        self.chunks_size = int(chunks_size)
        self.data_file_size_mb, self.video_file_size_mb = data_file_size_mb, video_file_size_mb
        self._image_shapes: dict[str, tuple[int, int]] = {}
        self._tasks: dict[str, int] = {}
        self._episodes: list[dict] = []
        self._episode_stats: list[dict] = []
        self._states: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._timestamps: list[np.ndarray] = []
        self._frames = 0
        self._finalized = False
        # v3.0: files being appended to.
        self._data_writer: pq.ParquetWriter | None = None
        self._data_where = (0, 0)
        self._data_path: Path | None = None
        self._data_tmp: Path | None = None
        self._data_rows = 0
        self._videos: dict[str, _VideoEncoder] = {}
        self._video_where: dict[str, tuple[int, int]] = {}
        self._codec_name = ""
        self.root.mkdir(parents=True, exist_ok=True)

    # -- features ------------------------------------------------------------------------

    def _action_names(self) -> list[str]:
        if self.embodiment.action_space == "ee_delta":
            return ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
        return list(self.embodiment.joint_names)

    def _features(self) -> dict:
        features = {}
        for key in self.image_keys:
            height, width = self._image_shapes[key]
            feature = {"dtype": "video" if self.use_videos else "image",
                       "shape": [height, width, 3], "names": ["height", "width", "channels"]}
            if self.use_videos:
                feature["info"] = {
                    "video.height": height, "video.width": width,
                    "video.codec": self._codec_name, "video.pix_fmt": "yuv420p",
                    "video.is_depth_map": False, "video.fps": self._json_fps(),
                    "video.channels": 3, "has_audio": False}
            features[key] = feature
        features["observation.state"] = {"dtype": "float32",
                                         "shape": [self.embodiment.state_dim],
                                         "names": list(self.embodiment.joint_names)}
        features["action"] = {"dtype": "float32", "shape": [self.embodiment.action_dim],
                              "names": self._action_names()}
        features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
        for key in ("frame_index", "episode_index", "index", "task_index"):
            features[key] = {"dtype": "int64", "shape": [1], "names": None}
        if self.version == "v3.0":
            for feature in features.values():
                if feature["dtype"] != "video":
                    feature["fps"] = self._json_fps()
        return features

    def _json_fps(self) -> int | float:
        return int(self.fps) if float(self.fps).is_integer() else self.fps

    def _data_keys(self) -> list[str]:
        keys = [] if self.use_videos else list(self.image_keys)
        return keys + ["observation.state", "action", "timestamp", "frame_index",
                       "episode_index", "index", "task_index"]

    def _schema(self) -> pa.Schema:
        features = self._features()
        types = {"observation.state": pa.list_(pa.float32(), self.embodiment.state_dim),
                 "action": pa.list_(pa.float32(), self.embodiment.action_dim),
                 "timestamp": pa.float32()}
        fields = []
        for key in self._data_keys():
            if key in self.image_keys:
                fields.append(pa.field(key, _IMAGE_STRUCT))
            else:
                fields.append(pa.field(key, types.get(key, pa.int64())))
        hf = {"info": {"features": {k: _hf_feature(features[k]) for k in self._data_keys()}}}
        return pa.schema(fields, metadata={b"huggingface": json.dumps(hf).encode()})

    # -- episodes ------------------------------------------------------------------------

    def add_episode(self, images: dict[str, np.ndarray], state: np.ndarray, action: np.ndarray,
                    task: str, timestamps: np.ndarray | None = None) -> int:
        """Append one episode; returns its episode_index.

        Args:
            images: camera key (as given to the writer, or the feature key) -> (T, H, W, 3)
                uint8 frames.
            state: (T, state_dim) states.
            action: (T, action_dim) actions.
            task: the instruction of the episode.
            timestamps: (T,) seconds from the episode start, increasing (default t / fps);
                with videos each must lie within half a frame of t / fps.

        Raises:
            ValueError: naming the argument with a wrong shape, type or value.
        """
        if self._finalized:
            raise RuntimeError("add_episode after finalize()")
        state = np.asarray(state, dtype=np.float32)
        action = np.asarray(action, dtype=np.float32)
        length = len(state)
        if length == 0:
            raise ValueError("state: an episode needs at least one frame")
        if state.shape != (length, self.embodiment.state_dim):
            raise ValueError(f"state: shape {state.shape}, expected "
                             f"({length}, {self.embodiment.state_dim})")
        if action.shape != (length, self.embodiment.action_dim):
            raise ValueError(f"action: shape {action.shape}, expected "
                             f"({length}, {self.embodiment.action_dim})")
        for name, values in (("state", state), ("action", action)):
            if not np.isfinite(values).all():
                raise ValueError(f"{name}: non-finite values")
        if not isinstance(task, str):
            raise ValueError(f"task: expected a string, got {type(task).__name__}")
        frames = self._check_images(images, length)
        timestamps = self._check_timestamps(timestamps, length)
        index = len(self._episodes)
        if task not in self._tasks:
            self._tasks[task] = len(self._tasks)
        columns = {
            "observation.state": state, "action": action,
            "timestamp": timestamps.astype(np.float32),
            "frame_index": np.arange(length, dtype=np.int64),
            "episode_index": np.full(length, index, dtype=np.int64),
            "index": np.arange(self._frames, self._frames + length, dtype=np.int64),
            "task_index": np.full(length, self._tasks[task], dtype=np.int64),
        }
        record = {"episode_index": index, "tasks": [task], "length": length}
        if self.version == "v2.1":
            self._write_episode_v2(index, frames, columns)
        else:
            record.update(self._write_episode_v3(frames, columns, length))
        stats = {key: _numeric_stats(columns[key]) for key in columns}
        stats.update({key: _image_stats(frames[key]) for key in self.image_keys})
        self._episodes.append(record)
        self._episode_stats.append(stats)
        self._states.append(state)
        self._actions.append(action)
        self._timestamps.append(timestamps)
        self._frames += length
        return index

    def _check_images(self, images: dict[str, np.ndarray], length: int) -> dict:
        frames = {}
        given = {image_feature_key(k): v for k, v in images.items()}
        if set(given) != set(self.image_keys):
            raise ValueError(f"images: keys {sorted(images)}, expected "
                             f"{[self._names[k] for k in self.image_keys]}")
        for key in self.image_keys:
            array = np.asarray(given[key])
            name = self._names[key]
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
                raise ValueError(f"images[{name!r}]: expected (T, H, W, 3) uint8, got "
                                 f"{array.shape} {array.dtype}")
            if len(array) != length:
                raise ValueError(f"images[{name!r}]: {len(array)} frames for {length} states")
            shape = array.shape[1:3]
            if self._image_shapes.setdefault(key, shape) != shape:
                raise ValueError(f"images[{name!r}]: frames are {shape}, earlier episodes "
                                 f"{self._image_shapes[key]}")
            if self.use_videos and (shape[0] % 2 or shape[1] % 2):
                raise ValueError(f"images[{name!r}]: yuv420p video needs even sizes, got "
                                 f"{shape}")
            frames[key] = array
        return frames

    def _check_timestamps(self, timestamps, length: int) -> np.ndarray:
        grid = np.arange(length, dtype=np.float64) / self.fps
        if timestamps is None:
            return grid
        timestamps = np.asarray(timestamps, dtype=np.float64)
        if timestamps.shape != (length,) or not np.isfinite(timestamps).all():
            raise ValueError(f"timestamps: expected ({length},) finite values, got "
                             f"{timestamps.shape}")
        if timestamps[0] < 0 or np.any(np.diff(timestamps) <= 0):
            raise ValueError("timestamps: must start at >= 0 and increase strictly")
        if self.use_videos and np.any(np.abs(timestamps - grid) >= 0.5 / self.fps):
            worst = float(np.max(np.abs(timestamps - grid)))
            raise ValueError(f"timestamps: off the {self.fps:g} fps grid by up to {worst:.4f} s; "
                             "video frames are at t / fps (resample the episode first)")
        return timestamps

    def _table(self, frames: dict, columns: dict) -> pa.Table:
        schema = self._schema()
        arrays = []
        for f in schema:
            if f.name in self.image_keys:
                arrays.append(pa.array([{"bytes": encode_png(img), "path": None}
                                        for img in frames[f.name]], type=_IMAGE_STRUCT))
            elif pa.types.is_fixed_size_list(f.type):
                arrays.append(_vector_array(columns[f.name], pa.float32()))
            else:
                arrays.append(pa.array(columns[f.name], type=f.type))
        return pa.Table.from_arrays(arrays, schema=schema)

    def _new_encoder(self, path: Path, key: str) -> _VideoEncoder:
        height, width = self._image_shapes[key]
        encoder = _VideoEncoder(path, self.fps, height, width, self.vcodec, self.crf, self.gop)
        if not self._codec_name:
            self._codec_name = encoder.stream.codec_context.codec.canonical_name
        return encoder

    def _write_episode_v2(self, index: int, frames: dict, columns: dict) -> None:
        chunk = index // self.chunks_size
        if self.use_videos:
            for key in self.image_keys:
                path = self.root / V2_VIDEO_PATH.format(episode_chunk=chunk, video_key=key,
                                                        episode_index=index)
                encoder = self._new_encoder(path, key)
                encoder.add(frames[key])
                encoder.close()
        path = self.root / V2_DATA_PATH.format(episode_chunk=chunk, episode_index=index)
        _write_parquet_atomic(path, self._table(frames, columns))

    def _write_episode_v3(self, frames: dict, columns: dict, length: int) -> dict:
        record = {}
        limit = self.data_file_size_mb * 1e6
        if self._data_writer is not None and self._data_tmp.stat().st_size >= limit:
            self._close_data_file()
            self._data_where = self._next(self._data_where)
        if self._data_writer is None:
            path = self.root / V3_DATA_PATH.format(chunk_index=self._data_where[0],
                                                   file_index=self._data_where[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_path, self._data_tmp = path, path.with_name(path.name + ".partial")
            self._data_writer = pq.ParquetWriter(self._data_tmp, self._schema())
            self._data_rows = 0
        table = self._table(frames, columns)
        self._data_writer.write_table(table, row_group_size=max(1, length))
        record.update({"data/chunk_index": self._data_where[0],
                       "data/file_index": self._data_where[1],
                       "dataset_from_index": self._frames,
                       "dataset_to_index": self._frames + length})
        self._data_rows += length
        for key in self.image_keys if self.use_videos else []:
            encoder = self._videos.get(key)
            if encoder is not None and encoder.size() >= self.video_file_size_mb * 1e6:
                encoder.close()
                self._video_where[key] = self._next(self._video_where[key])
                encoder = None
            if encoder is None:
                where = self._video_where.setdefault(key, (0, 0))
                path = self.root / V3_VIDEO_PATH.format(video_key=key, chunk_index=where[0],
                                                        file_index=where[1])
                encoder = self._videos[key] = self._new_encoder(path, key)
            start = encoder.frames / self.fps
            encoder.add(frames[key])
            where = self._video_where[key]
            record.update({f"videos/{key}/chunk_index": where[0],
                           f"videos/{key}/file_index": where[1],
                           f"videos/{key}/from_timestamp": start,
                           f"videos/{key}/to_timestamp": start + length / self.fps})
        return record

    def _next(self, where: tuple[int, int]) -> tuple[int, int]:
        chunk, file = where
        return (chunk + 1, 0) if file == self.chunks_size - 1 else (chunk, file + 1)

    def _close_data_file(self) -> None:
        self._data_writer.close()
        os.replace(self._data_tmp, self._data_path)
        self._data_writer = None

    # -- meta ----------------------------------------------------------------------------

    def finalize(self) -> Path:
        """Close the open files and write the meta files; returns the dataset root."""
        if self._finalized:
            return self.root
        if not self._episodes:
            raise ValueError(f"{self.root}: no episode was added")
        if self._data_writer is not None:
            self._close_data_file()
        for encoder in self._videos.values():
            encoder.close()
        self._videos.clear()
        stats = {key: _aggregate_stats([s[key] for s in self._episode_stats])
                 for key in self._episode_stats[0]}
        # Global numeric statistics are exact (the low-dim data is small).
        merged = {"observation.state": np.concatenate(self._states),
                  "action": np.concatenate(self._actions),
                  "timestamp": np.concatenate(self._timestamps).astype(np.float32)}
        for key, values in merged.items():
            stats[key] = _numeric_stats(values)
        tasks = sorted(self._tasks.items(), key=lambda kv: kv[1])
        if self.version == "v2.1":
            _write_jsonl(self.root / V2_TASKS_PATH,
                         [{"task_index": i, "task": t} for t, i in tasks])
            _write_jsonl(self.root / V2_EPISODES_PATH, self._episodes)
            _write_jsonl(self.root / V2_EPISODES_STATS_PATH,
                         [{"episode_index": e["episode_index"], "stats": s}
                          for e, s in zip(self._episodes, self._episode_stats, strict=True)])
        else:
            self._write_tasks_v3(tasks)
            self._write_episodes_v3()
        _write_json(self.root / STATS_PATH, stats)
        _write_json(self.root / INFO_PATH, self._info())
        self._finalized = True
        return self.root

    def _write_tasks_v3(self, tasks: list[tuple[str, int]]) -> None:
        # LeRobot writes a pandas DataFrame indexed by the task text: the index is stored as a
        # "task" column and restored by pandas through the "pandas" schema metadata.
        pandas_meta = {
            "index_columns": ["task"],
            "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                                "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
            "columns": [
                {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                 "numpy_type": "int64", "metadata": None},
                {"name": "task", "field_name": "task", "pandas_type": "unicode",
                 "numpy_type": "object", "metadata": None}],
            "creator": {"library": "pyarrow", "version": pa.__version__},
            "pandas_version": "2.2.3"}
        schema = pa.schema([pa.field("task_index", pa.int64()), pa.field("task", pa.string())],
                           metadata={b"pandas": json.dumps(pandas_meta).encode()})
        table = pa.Table.from_pydict({"task_index": [i for _, i in tasks],
                                      "task": [t for t, _ in tasks]}, schema=schema)
        _write_parquet_atomic(self.root / V3_TASKS_PATH, table)

    def _write_episodes_v3(self) -> None:
        rows = []
        for record, stats in zip(self._episodes, self._episode_stats, strict=True):
            row = dict(record)
            row["meta/episodes/chunk_index"] = 0
            row["meta/episodes/file_index"] = 0
            for key, values in stats.items():
                for name, value in values.items():
                    row[f"stats/{key}/{name}"] = value
            rows.append(row)
        table = pa.Table.from_pylist(rows)
        _write_parquet_atomic(self.root / V3_EPISODES_PATH.format(chunk_index=0, file_index=0),
                              table)

    def _info(self) -> dict:
        episodes = len(self._episodes)
        info = {"codebase_version": self.version, "robot_type": self.robot_type,
                "total_episodes": episodes, "total_frames": self._frames,
                "total_tasks": len(self._tasks)}
        if self.version == "v2.1":
            info.update({
                "total_videos": episodes * len(self.image_keys) if self.use_videos else 0,
                "total_chunks": math.ceil(episodes / self.chunks_size),
                "chunks_size": self.chunks_size, "fps": self._json_fps(),
                "splits": {"train": f"0:{episodes}"}, "data_path": V2_DATA_PATH,
                "video_path": V2_VIDEO_PATH if self.use_videos and self.image_keys else None})
        else:
            info.update({
                "chunks_size": self.chunks_size,
                "data_files_size_in_mb": self.data_file_size_mb,
                "video_files_size_in_mb": self.video_file_size_mb, "fps": self._json_fps(),
                "splits": {"train": f"0:{episodes}"}, "data_path": V3_DATA_PATH,
                "video_path": V3_VIDEO_PATH if self.use_videos and self.image_keys else None})
        info["features"] = self._features()
        return info
