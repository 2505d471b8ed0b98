"""Raw ROS image buffers (sensor_msgs/Image fields) to RGB arrays, with NumPy only.

Shared by the policy node (live messages) and the rosbag converter (recorded messages), so both
accept exactly the same encodings.
"""

from __future__ import annotations

import numpy as np

from ..errors import CausedError, shorten

# encoding -> (channels, channel order that gives RGB)
RAW_ENCODINGS = {
    "rgb8": (3, [0, 1, 2]),
    "bgr8": (3, [2, 1, 0]),
    "rgba8": (4, [0, 1, 2]),
    "bgra8": (4, [2, 1, 0]),
    "mono8": (1, [0, 0, 0]),
}
SUPPORTED_ENCODINGS = tuple(RAW_ENCODINGS)


class ImageFormatError(CausedError, ValueError):
    """An image that cannot be converted; `cause` is a short key for counting and logs."""


def raw_to_rgb(encoding: str, height: int, width: int, step: int, data) -> np.ndarray:
    """HxWx3 uint8 RGB from a raw image buffer (rows of `step` bytes; at most one copy).

    Raises:
        ImageFormatError: unsupported encoding (cause `unsupported_encoding`) or a buffer
            whose size does not match height, width and step (cause `image_size`).
    """
    if encoding not in RAW_ENCODINGS:
        raise ImageFormatError("unsupported_encoding",
                               f"unsupported image encoding {shorten(repr(encoding), 40)}; "
                               "supported: "
                               f"{', '.join(SUPPORTED_ENCODINGS)}")
    channels, order = RAW_ENCODINGS[encoding]
    height, width, step = int(height), int(width), int(step)
    # rclpy gives array('B') or bytes (no copy through the buffer protocol), rosbags NumPy.
    buffer = (np.asarray(data, dtype=np.uint8) if isinstance(data, np.ndarray)
              else np.frombuffer(data, dtype=np.uint8))
    if height == 0 or width == 0 or step < width * channels:
        raise ImageFormatError("image_size", f"image {width}x{height} {encoding} has step "
                                             f"{step}, expected at least {width * channels}")
    if buffer.size != step * height:
        raise ImageFormatError("image_size", f"image data has {buffer.size} bytes, expected "
                                             f"step*height = {step * height}")
    pixels = buffer.reshape(height, step)[:, : width * channels].reshape(height, width, channels)
    if channels == 3 and order == [0, 1, 2]:
        return pixels
    return np.ascontiguousarray(pixels[..., order])
