"""Writing LeRobot datasets: `LeRobotWriter`, v2.1 or v3.0, videos or images in parquet."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...robot.embodiment import Embodiment
from .format import (
    DEFAULT_CHUNKS_SIZE,
    IMAGE_STRUCT,
    INFO_PATH,
    QUANTILES,
    STATS_PATH,
    V2_DATA_PATH,
    V2_EPISODES_PATH,
    V2_EPISODES_STATS_PATH,
    V2_TASKS_PATH,
    V2_VIDEO_PATH,
    V3_DATA_PATH,
    V3_EPISODES_PATH,
    V3_TASKS_PATH,
    V3_VIDEO_PATH,
    WRITE_VERSIONS,
    image_feature_key,
    write_json,
    write_jsonl,
    write_parquet_atomic,
)
from .video import (
    VideoEncoder,
    encode_png,
    import_av,
)


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
            import_av().codec.Codec(vcodec, "w")  # fail now if the encoder is missing
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
        self._videos: dict[str, VideoEncoder] = {}
        self._video_where: dict[str, tuple[int, int]] = {}
        self._codec_name = ""
        self.root.mkdir(parents=True, exist_ok=True)

    # -- features ------------------------------------------------------------------------

    def _action_names(self) -> list[str]:
        return self.embodiment.action_names

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
                fields.append(pa.field(key, IMAGE_STRUCT))
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
                                        for img in frames[f.name]], type=IMAGE_STRUCT))
            elif pa.types.is_fixed_size_list(f.type):
                arrays.append(_vector_array(columns[f.name], pa.float32()))
            else:
                arrays.append(pa.array(columns[f.name], type=f.type))
        return pa.Table.from_arrays(arrays, schema=schema)

    def _new_encoder(self, path: Path, key: str) -> VideoEncoder:
        height, width = self._image_shapes[key]
        encoder = VideoEncoder(path, self.fps, height, width, self.vcodec, self.crf, self.gop)
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
        write_parquet_atomic(path, self._table(frames, columns))

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
            write_jsonl(self.root / V2_TASKS_PATH,
                         [{"task_index": i, "task": t} for t, i in tasks])
            write_jsonl(self.root / V2_EPISODES_PATH, self._episodes)
            write_jsonl(self.root / V2_EPISODES_STATS_PATH,
                         [{"episode_index": e["episode_index"], "stats": s}
                          for e, s in zip(self._episodes, self._episode_stats, strict=True)])
        else:
            self._write_tasks_v3(tasks)
            self._write_episodes_v3()
        write_json(self.root / STATS_PATH, stats)
        write_json(self.root / INFO_PATH, self._info())
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
        write_parquet_atomic(self.root / V3_TASKS_PATH, table)

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
        write_parquet_atomic(self.root / V3_EPISODES_PATH.format(chunk_index=0, file_index=0),
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
