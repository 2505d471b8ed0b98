"""What a bag conversion works with: its options, the streams a first pass keeps, its report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ConversionOptions:
    """How to read and align recordings; None fields take the embodiment's defaults.

    Attributes:
        fps: grid rate (default: the embodiment's control_rate_hz).
        actions: "trajectory" or "next-state" (default: trajectory for joint_position
            embodiments, next-state for ee_delta ones).
        image_topics: camera topics (default: the embodiment's image_topics).
        image_keys: dataset keys or names for them (default: derived from the topics).
        max_gap_s: oldest message a stream may hold at a grid time (default 2 / fps).
        episode_marker_topic: std_msgs/String topic whose messages split episodes.
        default_instruction: instruction before the first instruction message, and for bags
            without any.
        time_source: "auto" (header stamp if non-zero, else bag time) or "receive" (bag time).
        min_episode_frames: shorter runs of frames are dropped (and reported).
    """

    fps: float | None = None
    actions: str | None = None
    image_topics: list[str] | None = None
    image_keys: list[str] | None = None
    max_gap_s: float | None = None
    episode_marker_topic: str = "/episode_marker"
    default_instruction: str | None = None
    time_source: str = "auto"
    min_episode_frames: int = 1


@dataclass
class GapSpan:
    """Grid steps where one stream had no message fresh enough (seconds from the bag start)."""

    stream: str
    start_s: float
    end_s: float
    steps: int


@dataclass
class EpisodeSummary:
    """One written episode."""

    index: int
    task: str
    frames: int
    start_s: float
    end_s: float


@dataclass
class BagReport:
    """What became of one recording: episodes written, gaps found, frames dropped."""

    bag: str
    storage: str
    duration_s: float
    fps: float
    time_sources: dict[str, str] = field(default_factory=dict)
    episodes: list[EpisodeSummary] = field(default_factory=list)
    gaps: list[GapSpan] = field(default_factory=list)
    dropped_frames: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        """Frames written from this bag."""
        return sum(e.frames for e in self.episodes)

    def format(self) -> str:
        """A human-readable summary."""
        lines = [f"{self.bag} ({self.storage}, {self.duration_s:.2f} s): "
                 f"{len(self.episodes)} episodes, {self.frames} frames at {self.fps:g} fps, "
                 f"{self.dropped_frames} grid steps dropped"]
        if self.time_sources:
            lines.append("  time: " + ", ".join(f"{topic} {source}" for topic, source
                                                in sorted(self.time_sources.items())))
        for ep in self.episodes:
            lines.append(f"  episode {ep.index}: {ep.frames} frames, {ep.start_s:.3f}-"
                         f"{ep.end_s:.3f} s, {ep.task!r}")
        if self.gaps:
            lines.append("  gaps (not interpolated: steps dropped, episode split):")
            for gap in self.gaps:
                lines.append(f"    {gap.stream}: {gap.start_s:.3f}-{gap.end_s:.3f} s "
                             f"({gap.steps} steps)")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class Episode:
    """Aligned frames of one episode, ready for a dataset writer."""

    images: dict[str, np.ndarray]   # key -> (T, H, W, 3) uint8
    state: np.ndarray               # (T, state_dim)
    action: np.ndarray              # (T, action_dim)
    task: str
    timestamps: np.ndarray          # (T,) seconds from the episode's first frame
    start_s: float                  # first frame, seconds from the bag start
    end_s: float


class HeldSeries:
    """Samples of one value over time, looked up by zero-order hold with a freshness limit."""

    def __init__(self, times: Sequence[int], values: Sequence):
        order = np.argsort(np.asarray(times, dtype=np.int64), kind="stable")
        self.times = np.asarray(times, dtype=np.int64)[order]
        self.values = np.asarray(values)[order] if len(values) else np.asarray(values)
        self.order = order  # sorted position -> position in arrival order

    def hold(self, grid: np.ndarray, max_gap_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """(sorted index of the latest sample at or before each grid time, whether it is fresh)."""
        index = np.searchsorted(self.times, grid, side="right") - 1
        fresh = index >= 0
        safe = np.maximum(index, 0)
        if len(self.times):
            fresh &= grid - self.times[safe] <= max_gap_ns
        else:
            fresh[:] = False
        return safe, fresh


class JointStream:
    """Per-joint held positions from one topic (JointState or JointTrajectory first points)."""

    def __init__(self, topic: str):
        """Collect the joints published on `topic`."""
        self.topic = topic
        self._times: dict[str, list[int]] = {}
        self._values: dict[str, list[float]] = {}
        self.series: dict[str, HeldSeries] = {}

    def add(self, t: int, names: Sequence[str], positions: Sequence[float]) -> None:
        """One message's joints at time `t` (ns)."""
        for name, position in zip(names, positions, strict=False):  # positions may be empty
            self._times.setdefault(name, []).append(t)
            self._values.setdefault(name, []).append(float(position))

    def finish(self) -> None:
        """Sort each joint's samples (after the last `add`)."""
        self.series = {name: HeldSeries(self._times[name], self._values[name])
                       for name in self._times}

    @property
    def joints(self) -> list[str]:
        """The joints the topic carried."""
        return list(self.series)

    def span(self, joints: Sequence[str]) -> tuple[int, int] | None:
        """(first, last) sample time covered by all of `joints`."""
        if not joints or any(not len(self.series[j].times) for j in joints):
            return None
        return (max(int(self.series[j].times[0]) for j in joints),
                min(int(self.series[j].times[-1]) for j in joints))

    def hold(self, joints: Sequence[str], grid: np.ndarray, max_gap_ns: int
             ) -> tuple[np.ndarray, np.ndarray]:
        """((n, len(joints)) held positions, (n,) all of them fresh)."""
        values = np.empty((len(grid), len(joints)), dtype=np.float64)
        fresh = np.ones(len(grid), dtype=bool)
        for i, joint in enumerate(joints):
            series = self.series[joint]
            index, ok = series.hold(grid, max_gap_ns)
            values[:, i] = series.values[index]
            fresh &= ok
        return values, fresh


@dataclass
class ImageStream:
    """When each image of one camera topic arrived (the images are decoded later)."""

    topic: str
    msgtype: str
    series: HeldSeries | None = None       # values: arrival number of each message
    log_ns: list[int] = field(default_factory=list)   # arrival number -> bag time
    # arrival number -> how many earlier messages of the topic share its bag time (a message
    # is found again in the second pass by its bag time and this ordinal)
    ordinal: list[int] = field(default_factory=list)
    _times: list[int] = field(default_factory=list)

    def add(self, t: int, log_ns: int) -> None:
        """One image at time `t`, received at bag time `log_ns` (ns)."""
        same = self.ordinal[-1] + 1 if self.log_ns and self.log_ns[-1] == log_ns else 0
        self._times.append(t)
        self.log_ns.append(log_ns)
        self.ordinal.append(same)

    def finish(self) -> None:
        """Sort the arrivals (after the last `add`)."""
        self.series = HeldSeries(self._times, np.arange(len(self._times)))


@dataclass
class Recording:
    """The first pass over one bag: times and values of every stream, images not decoded."""

    path: Path
    storage: str
    start_ns: int
    end_ns: int
    topics: dict[str, str]
    images: dict[str, ImageStream]
    state: JointStream
    commands: list[JointStream]
    instructions: list[tuple[int, str]]
    markers: list[tuple[int, str]]
    time_sources: dict[str, str]
    notes: list[str] = field(default_factory=list)


@dataclass
class AlignedRun:
    """A run of consecutive valid grid steps: one episode to write."""

    task: str
    grid: np.ndarray
    state: np.ndarray
    action: np.ndarray
    image_index: dict[str, np.ndarray]   # topic -> arrival number per step
