"""Video and image files of LeRobot datasets through PyAV: decoding by time, encoding mp4s."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import numpy as np

from .format import DatasetError

RECENT_FRAMES = 16  # decoded frames kept per open video (consecutive indices are cheap)


def import_av():
    """The `av` module, or an ImportError saying how to install PyAV."""
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("LeRobot videos and images need PyAV: pip install av==18.1.0") from exc
    return av


def frame_to_rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    """An av.VideoFrame as HxWx3 uint8, resized to size=(height, width) if given."""
    if size is not None and (frame.height, frame.width) != tuple(size):
        height, width = size
        shrink = height <= frame.height and width <= frame.width
        frame = frame.reformat(width=width, height=height, format="rgb24",
                               interpolation="AREA" if shrink else "BILINEAR")
    return frame.to_ndarray(format="rgb24")


def decode_image_bytes(data: bytes, where: str):
    """PNG or JPEG bytes -> av.VideoFrame."""
    av = import_av()
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
    av = import_av()
    image = np.ascontiguousarray(image, dtype=np.uint8)
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    return b"".join(bytes(p) for p in codec.encode(frame) + codec.encode(None))


class VideoStream:
    """One opened video file: frames by presentation time, decoding forward from a seek."""

    def __init__(self, path: Path):
        av = import_av()
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
        """Close the container and drop decoded frames."""
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
        av = import_av()
        try:
            for frame in self._frames:
                if frame.pts is None:
                    continue
                t = float(frame.pts * self.time_base)
                self._recent[t] = frame
                while len(self._recent) > RECENT_FRAMES:
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
        av = import_av()
        self._recent.clear()
        target = max(0, int(math.floor(ts / self.time_base)) - 1)
        try:
            self.container.seek(target, backward=True, any_frame=False, stream=self.stream)
        except av.FFmpegError as exc:
            raise DatasetError(f"{self.path}: cannot seek to t={ts:.3f} s ({exc})") from exc
        self._frames = self.container.decode(self.stream)


def video_rate(fps: float) -> Fraction:
    """The frame rate as a fraction (NTSC-style rates exact)."""
    return Fraction(fps).limit_denominator(1001)


def codec_options(vcodec: str, crf: int, gop: int) -> dict[str, str]:
    """Encoder options: keyframe interval, and quality for the codecs with a CRF."""
    options = {"g": str(gop)}
    if vcodec in ("libx264", "libx265", "libsvtav1", "libvpx-vp9"):
        options["crf"] = str(crf)
    return options


class VideoEncoder:
    """An mp4 file being encoded frame by frame (written to `<name>.partial`, then renamed)."""

    def __init__(self, path: Path, fps: float, height: int, width: int, vcodec: str,
                 crf: int, gop: int):
        av = import_av()
        self.path = path
        self.tmp = path.with_name(path.name + ".partial")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.rate = video_rate(fps)
        self.container = av.open(str(self.tmp), "w", format="mp4")
        self.stream = self.container.add_stream(vcodec, rate=self.rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.options = codec_options(vcodec, crf, gop)
        self.frames = 0

    def add(self, images: np.ndarray) -> None:
        """Encode (N, H, W, 3) uint8 frames."""
        av = import_av()
        for image in images:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = self.frames, 1 / self.rate
            self.frames += 1
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def size(self) -> int:
        """Bytes written so far."""
        return self.tmp.stat().st_size if self.tmp.exists() else 0

    def close(self) -> None:
        """Flush the encoder and move the finished file into place."""
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.path)
