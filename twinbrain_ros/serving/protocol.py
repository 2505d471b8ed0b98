"""The policy server's wire format: msgpack messages over a websocket, never pickle.

Every message is one binary websocket frame holding a msgpack map with a `type`. NumPy arrays
travel as `{"__ndarray__": true, "dtype": "<f4", "shape": [..], "data": <bytes>}` (raw
little-endian bytes, a few dtypes only), images as encoded JPEG or PNG bytes.

    client -> server  {"type": "hello", "version": 1, "token": str | null, "client": str}
    server -> client  {"type": "welcome", "version": 1, "server": {...}, "contracts": {key: {...}}}
    client -> server  {"type": "infer", "id": int, "embodiment": key, "images": [bytes, ...],
                       "image_format": "jpeg" | "png", "state": ndarray, "instruction": str,
                       "seed": int | null, "prefix": null | {"actions": ndarray (K, action_dim),
                       "frozen": int, "schedule": "exp" | "linear" | "hard"}}
    server -> client  {"type": "actions", "id": int, "actions": ndarray, "server_s": float,
                       "batch": int}
    client -> server  {"type": "ask", "id": int, "images": [bytes, ...], "image_format": ...,
                       "question": str, "max_new_tokens": int, "timeout_s": float}
    server -> client  {"type": "answer", "id": int, "answer": str, "tokens": int,
                       "finish": "eos" | "length", "server_s": float}
    server -> client  {"type": "error", "id": int | null, "cause": str, "message": str}

A contract (one per embodiment key of the checkpoint) says what the policy expects and returns:
the robot's name, joint and action names, state and action spaces and sizes, horizon, control
rate, image size, number of cameras, backbone, brain mode, the longest instruction and the
prompt's special tokens (which a client can refuse before sending).
"""

from __future__ import annotations

import io

import msgpack
import numpy as np

from ..errors import CausedError
from ..transforms.rtc import ChunkPrefix

PROTOCOL_VERSION = 1
DTYPES = ("|u1", "<f4", "<f8", "<i8", "|b1")   # uint8, float32, float64, int64, bool
IMAGE_FORMATS = ("jpeg", "png")


class ProtocolError(CausedError, ValueError):
    """A message that cannot be used; `cause` says what kind of fault it is."""


def _encode(value):
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype.str not in DTYPES:
            raise ProtocolError("bad_dtype", f"arrays of dtype {array.dtype} are not sent")
        return {"__ndarray__": True, "dtype": dtype.str, "shape": list(array.shape),
                "data": array.astype(dtype, copy=False).tobytes()}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot send a {type(value).__name__}")


def _decode(obj):
    if obj.get("__ndarray__") is True:
        dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
        if dtype not in DTYPES:
            raise ProtocolError("bad_dtype", f"array dtype {dtype!r} is not one of {DTYPES}")
        if (not isinstance(shape, list) or len(shape) > 4
                or not all(isinstance(n, int) and 0 <= n <= 1 << 24 for n in shape)):
            raise ProtocolError("bad_shape", f"array shape {shape!r} is not valid")
        if not isinstance(data, bytes) or len(data) != int(np.prod(shape, dtype=np.int64)) * \
                np.dtype(dtype).itemsize:
            raise ProtocolError("bad_shape", f"array data does not match dtype {dtype} and "
                                             f"shape {shape}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    return obj


def pack(message: dict) -> bytes:
    """One message as msgpack bytes."""
    return msgpack.packb(message, default=_encode, use_bin_type=True)


def unpack(data: bytes, max_bytes: int | None = None) -> dict:
    """Decode one message; `ProtocolError` for anything but a msgpack map with a string type."""
    if not isinstance(data, bytes | bytearray):
        raise ProtocolError("malformed", "messages are binary frames")
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError("too_large", f"message of {len(data)} bytes is larger than the "
                                         f"limit of {max_bytes}")
    try:
        message = msgpack.unpackb(bytes(data), object_hook=_decode, raw=False,
                                  strict_map_key=True, max_bin_len=len(data),
                                  max_str_len=len(data), max_array_len=1 << 16,
                                  max_map_len=1 << 12)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many kinds for garbage
        raise ProtocolError("malformed", f"not a msgpack message ({type(exc).__name__})"
                            ) from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("malformed", "a message is a map with a string 'type'")
    return message


def encode_image(rgb: np.ndarray, image_format: str = "jpeg", quality: int = 90) -> bytes:
    """HxWx3 uint8 RGB -> JPEG or PNG bytes (Pillow)."""
    from PIL import Image

    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format {image_format!r} is not one of {IMAGE_FORMATS}")
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=int(quality))
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_image(data: bytes, max_pixels: int = 4096 * 4096) -> np.ndarray:
    """JPEG or PNG bytes -> HxWx3 uint8 RGB; `ProtocolError` if they are neither (or huge)."""
    from PIL import Image

    if not isinstance(data, bytes):
        raise ProtocolError("bad_image", "an image is JPEG or PNG bytes")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("JPEG", "PNG"):
            raise ProtocolError("bad_image", f"image format {image.format} is not JPEG or PNG")
        if image.width * image.height > max_pixels:
            raise ProtocolError("bad_image", f"image of {image.width}x{image.height} pixels is "
                                             "too large")
        return np.asarray(image.convert("RGB"))
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for bad bytes
        raise ProtocolError("bad_image", f"cannot decode the image ({type(exc).__name__})"
                            ) from exc


def resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`rgb` resized to (height, width) as the model's processor resizes (PIL bilinear)."""
    from PIL import Image

    height, width = size
    if tuple(rgb.shape[:2]) == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def read_token(path: str) -> str:
    """The token in a file (surrounding whitespace dropped); ValueError if unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror}") from exc
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def read_prefix(prefix, contract: dict):
    """The optional real-time chunking prefix of an infer message, checked."""
    if prefix is None:
        return None
    if not isinstance(prefix, dict):
        raise ProtocolError("bad_prefix", "prefix must be a map or null")
    actions = prefix.get("actions")
    if not isinstance(actions, np.ndarray) or actions.dtype.kind != "f" \
            or actions.ndim != 2 or not 1 <= len(actions) <= contract["horizon"] \
            or actions.shape[1] != contract["action_dim"]:
        raise ProtocolError("bad_prefix", f"prefix actions must be a float array of shape "
                                          f"(1..{contract['horizon']}, "
                                          f"{contract['action_dim']}), got "
                                          f"{getattr(actions, 'shape', type(actions))}")
    frozen = prefix.get("frozen")
    if not isinstance(frozen, int) or not 0 <= frozen <= len(actions):
        raise ProtocolError("bad_prefix", "prefix frozen must be an integer within the "
                                          "prefix")
    try:
        return ChunkPrefix(actions, frozen, str(prefix.get("schedule", "exp")))
    except ValueError as error:
        raise ProtocolError("bad_prefix", str(error)) from error
