"""LeRobot datasets, formats v2.1 and v3.0: a validating reader and a writer.

Split by job, as LeRobot's own `datasets/` is: `format` (the format contract, its paths,
constants and file helpers), `reader` (`LeRobotDataset`), `writer` (`LeRobotWriter`) and
`video` (PyAV decoding and encoding).

Reader: `LeRobotDataset` validates the whole dataset when it is built (meta files, every
parquet footer, every video file's presence, dims against the embodiment, image keys) and
raises `DatasetError` naming the file or field at fault; low-dimensional columns are loaded
into memory, images are decoded lazily with per-process caches (safe in DataLoader workers).

Writer: `LeRobotWriter` writes either version, videos with PyAV (libx264, yuv420p: lossy) or
PNG images inside the parquet rows, and the meta files (info, tasks, episodes, stats) at
`finalize()`.
"""

from .format import (
    IMAGE_KEY_PREFIX,
    READ_VERSIONS,
    WRITE_VERSIONS,
    DatasetError,
    image_feature_key,
)
from .reader import LeRobotDataset
from .video import encode_png
from .writer import LeRobotWriter

__all__ = ["IMAGE_KEY_PREFIX", "READ_VERSIONS", "WRITE_VERSIONS", "DatasetError",
           "LeRobotDataset", "LeRobotWriter", "encode_png", "image_feature_key"]
