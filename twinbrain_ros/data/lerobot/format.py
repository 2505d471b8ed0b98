"""The LeRobot dataset format, v2.1 and v3.0: the contract, its paths and the file helpers.

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
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

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
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


class DatasetError(ValueError):
    """A dataset is missing, unreadable or inconsistent; the message names the file or field."""


def image_feature_key(name: str) -> str:
    """`observation.images.<name>` for a bare camera name; full feature keys are kept."""
    return name if name.startswith("observation.") else IMAGE_KEY_PREFIX + name


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """Write a JSON file atomically (indented, as LeRobot does)."""
    write_atomic(path, (json.dumps(obj, indent=4) + "\n").encode())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write a JSON-lines file atomically."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def write_parquet_atomic(path: Path, table: pa.Table, **kwargs) -> None:
    """Write a parquet table to a temporary sibling, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, **kwargs)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    """Read a JSON file; `DatasetError` names a missing or invalid one."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file; `DatasetError` names the file and the bad line."""
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


def open_parquet(path: Path) -> pq.ParquetFile:
    """Open a parquet file and read its footer; a missing or truncated file is a DatasetError."""
    if not path.is_file():
        raise DatasetError(f"{path}: parquet file missing")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: unreadable parquet file ({exc})") from exc


def read_columns(pf: pq.ParquetFile, path: Path, columns: list[str]) -> pa.Table:
    """Read `columns` of a parquet file; `DatasetError` names missing ones."""
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise DatasetError(f"{path}: columns {missing} missing")
    try:
        return pf.read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: unreadable parquet data ({exc})") from exc


def column_matrix(table: pa.Table, key: str, dim: int, path: Path) -> np.ndarray:
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


def column_vector(table: pa.Table, key: str, path: Path) -> np.ndarray:
    """A 1-D array of a scalar column; errors name the column."""
    column = table.column(key).combine_chunks()
    if column.null_count:
        raise DatasetError(f"{path}: column {key} has null rows")
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        column = column.flatten()  # a [1] feature written as a list
        if len(column) != len(table):
            raise DatasetError(f"{path}: column {key} is not one value per row")
    return column.to_numpy(zero_copy_only=False)


def format_path(template: str, field_name: str, info_path: Path, **kwargs) -> str:
    """Fill a path template of `info.json`; `DatasetError` names bad templates."""
    try:
        return template.format(**kwargs)
    except (KeyError, IndexError, ValueError) as exc:
        raise DatasetError(f"{info_path}: {field_name} template {template!r} cannot be "
                           f"filled ({exc!r})") from exc
