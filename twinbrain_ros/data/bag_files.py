"""Reading rosbag2 files: the `rosbags` library, image messages, MCAP integrity, storage."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from .images import RAW_ENCODINGS, SUPPORTED_ENCODINGS, ImageFormatError, raw_to_rgb

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
IMAGE_KEY_PREFIX = "observation.images."
SUPPORTED_COMPRESSED_FORMATS = ("jpeg", "png")

_ROSBAGS_HINT = "pip install rosbags==0.11.9"


class BagError(ValueError):
    """A recording that cannot be converted as asked (missing topic, encoding, instruction)."""


def rosbags_api():
    """Import the parts of `rosbags` used here, or raise ImportError saying how to install it."""
    try:
        from rosbags.highlevel import AnyReader, AnyReaderError
        from rosbags.typesys import Stores, get_typestore
    except ImportError as exc:
        raise ImportError(f"reading rosbag2 recordings needs 'rosbags': {_ROSBAGS_HINT}") from exc
    return AnyReader, AnyReaderError, get_typestore(Stores.ROS2_JAZZY)


def image_key_for_topic(topic: str) -> str:
    """Dataset image key of a camera topic: `/camera/image_raw` -> `observation.images.camera_image_raw`."""  # noqa: E501
    name = re.sub(r"[^0-9A-Za-z]+", "_", topic).strip("_")
    if not name:
        raise BagError(f"cannot derive an image key from topic {topic!r}")
    return IMAGE_KEY_PREFIX + name


def decode_image(msg, msgtype: str) -> np.ndarray:
    """A deserialized Image or CompressedImage -> HxWx3 uint8 RGB array.

    Raises:
        BagError: unsupported encoding / format, or data that does not match the size.
    """
    if msgtype == COMPRESSED_IMAGE:
        check_compressed_format(msg.format)
        from PIL import Image as PILImage

        try:
            with PILImage.open(io.BytesIO(np.asarray(msg.data, dtype=np.uint8).tobytes())) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise BagError(f"cannot decode a {msg.format!r} CompressedImage: {exc}") from exc
    check_encoding(msg.encoding)
    try:
        return raw_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data)
    except ImageFormatError as exc:
        raise BagError(str(exc)) from exc


def check_encoding(encoding: str) -> None:
    """Refuse a raw image encoding this package cannot convert (`BagError`)."""
    if encoding not in RAW_ENCODINGS:
        raise BagError(f"unsupported image encoding {encoding!r}; supported: "
                       f"{', '.join(SUPPORTED_ENCODINGS)} (or a jpeg/png CompressedImage)")


def check_compressed_format(fmt: str) -> None:
    """Refuse a CompressedImage format that is not a jpeg or png camera frame (`BagError`)."""
    # image_transport writes e.g. "jpeg", "png" or "bgr8; jpeg compressed bgr8"; depth images
    # ("16UC1; compressedDepth png") are not camera frames.
    lowered = fmt.lower()
    if "compresseddepth" in lowered or (
            lowered and not any(f in lowered for f in ("jpeg", "jpg", "png"))):
        raise BagError(f"unsupported CompressedImage format {fmt!r}; supported: "
                       f"{', '.join(SUPPORTED_COMPRESSED_FORMATS)}")


def check_mcap(path: Path) -> str:
    """Read every record of an MCAP file, checking its CRCs; "" or a note when it has none.

    `ros2 bag record` writes a CRC32 for every chunk and for the whole data section; a file
    damaged on disk or in a copy then fails here, naming the bag, instead of converting into
    silently wrong episodes. Files written without CRCs (CRC fields 0) cannot be checked: the
    returned note says so and goes into the bag's report.

    Raises:
        BagError: a CRC mismatch or a record that cannot be parsed.
    """
    try:
        from mcap.exceptions import McapError
        from mcap.records import Chunk, DataEnd
        from mcap.stream_reader import StreamReader, get_chunk_data_stream
    except ImportError as exc:
        raise ImportError("checking MCAP bags needs 'mcap' (pip install mcap)") from exc
    chunk_crcs = data_crc = chunks = 0
    try:
        with open(path, "rb") as f:
            for record in StreamReader(f, emit_chunks=True, validate_crcs=True).records:
                if isinstance(record, Chunk):
                    chunks += 1
                    if record.uncompressed_crc:
                        chunk_crcs += 1
                        get_chunk_data_stream(record, validate_crc=True)
                elif isinstance(record, DataEnd):
                    data_crc = record.data_section_crc
    except (McapError, ValueError, EOFError, OSError, KeyError, RuntimeError) as exc:
        raise BagError(f"{path.parent}: {path.name} is corrupt or truncated "
                       f"({type(exc).__name__}: {exc})") from exc
    if chunk_crcs == 0 and not data_crc:
        return (f"{path.name} carries no CRCs (written without them): damage to it cannot be "
                "detected")
    return ""


def storage_of(path: Path) -> str:
    """The storage plugin of a rosbag2 directory: mcap, sqlite3 or unknown."""
    if any(path.glob("*.mcap")):
        return "mcap"
    if any(path.glob("*.db3")):
        return "sqlite3"
    return "unknown"
