"""rosbag2 recordings -> time-aligned, episode-split training frames, without a ROS install.

Reads rosbag2 directories (MCAP or sqlite3 storage) with the `rosbags` library and its own
typestore (ROS 2 Jazzy definitions for bags that carry none; Humble's are the same for the
messages used here), and hands each episode to a dataset writer
(`twinbrain_ros.data.lerobot.LeRobotWriter`).

Inputs of one bag (topics default to the embodiment description's):
    cameras: `sensor_msgs/msg/Image` (rgb8, bgr8, rgba8, bgra8, mono8) or
        `sensor_msgs/msg/CompressedImage` (jpeg, png), converted to HxWx3 uint8 RGB;
    state: `sensor_msgs/msg/JointState`, the embodiment's joints picked by name (any order; a
        joint may come in a different message from the others, e.g. a separate gripper
        publisher, each joint is held on its own);
    actions: either the commanded `trajectory_msgs/msg/JointTrajectory` (`actions="trajectory"`:
        the first point's positions are the action at the message's time; joints missing from
        the arm controller's topic are taken from the embodiment's `gripper_topic`), or the
        joint state of the next grid step (`actions="next-state"`);
    instructions: `std_msgs/msg/String`; episode markers: `std_msgs/msg/String`.

Time of a message: its header stamp when it has a header and the stamp is non-zero, else the
time the recorder received it (bag time); `time_source="receive"` uses bag time for all. The two
clocks must agree (same machine, or synchronized) when a bag mixes them.

Alignment rules:
    * Episodes: a new episode starts at each instruction message (with its text) unless it
      repeats the instruction of the episode being recorded (instructions republished
      periodically); a marker message starts a new episode with the current instruction (the
      way to separate two demonstrations of the same task), except a marker whose text is
      "end" (any case), which ends the episode: nothing is recorded until the next instruction
      or marker. Before the first instruction nothing is recorded unless a default instruction
      is given, which then covers the start of the bag.
    * Grid: each episode is sampled at `fps` on the grid `t0 + k / fps` (integer nanoseconds),
      t0 = the episode's start, up to (excluding) the next episode's start, or up to the end
      of the data (included) for the last one. The data span is where every required stream
      has begun and not yet ended (from the latest first message to the earliest last one).
    * Zero-order hold: at each grid time every stream (each camera, each state joint, each
      action source) takes its latest message at or before that time, and only if that
      message is at most `max_gap_s` old (default 2 / fps).
    * Gaps are never interpolated: a grid step where any stream has no fresh message is
      dropped and the episode is split there (the frames on either side become separate
      episodes, each one evenly spaced in time). Runs shorter than `min_episode_frames` are
      dropped too. Every gap is reported per stream with its time span (`BagReport`).
    * `next-state` actions: the action at step k is the state at step k + 1, so the last step
      before an episode end or a gap has no action and is dropped.
    * actions are encoded by the embodiment's action space (`twinbrain_ros.robot.action_spaces`)
      from the state at step k and its target joints (next state, or the commanded joints):
      the targets themselves in joint space, or for `ee_delta` embodiments (WidowX Bridge) the
      end-effector motion between their forward kinematics and a binary gripper.

Memory: a first pass reads every message but keeps only times, joint values and strings; the
images of one episode are decoded in a second, time-ranged pass when that episode is written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..robot.action_spaces import action_space_for
from ..robot.embodiment import Embodiment
from .bag_files import (
    COMPRESSED_IMAGE,
    IMAGE,
    IMAGE_KEY_PREFIX,
    BagError,
    check_compressed_format,
    check_encoding,
    check_mcap,
    decode_image,
    image_key_for_topic,
    rosbags_api,
    storage_of,
)
from .bag_recording import (
    AlignedRun,
    BagReport,
    ConversionOptions,
    Episode,
    EpisodeSummary,
    GapSpan,
    ImageStream,
    JointStream,
    Recording,
)

JOINT_STATE = "sensor_msgs/msg/JointState"
JOINT_TRAJECTORY = "trajectory_msgs/msg/JointTrajectory"
STRING = "std_msgs/msg/String"

ACTION_SOURCES = ("trajectory", "next-state")
TIME_SOURCES = ("auto", "receive")
END_MARKER = "end"



__all__ = ["ACTION_SOURCES", "TIME_SOURCES", "BagConverter", "BagError", "BagReport",
           "ConversionOptions", "convert_bags", "decode_image", "image_key_for_topic"]


class BagConverter:
    """Converts rosbag2 recordings of one embodiment into episodes (see the module docstring).

    Attributes:
        embodiment: the robot.
        fps: grid rate.
        actions: "trajectory" or "next-state".
        max_gap_ns: freshness limit of held messages.
        image_topics, image_keys: camera topics and their dataset keys, same order.
    """

    def __init__(self, embodiment: Embodiment, options: ConversionOptions | None = None,
                 kinematics=None):
        """Resolve the options against the embodiment.

        Args:
            embodiment: the robot description.
            options: conversion options (defaults: `ConversionOptions()`).
            kinematics: for `ee_delta` embodiments, an object with `joint_names` and `fk(q)`
                (default: the model the embodiment's `kinematics` field names).

        Raises:
            BagError: inconsistent options, or ee_delta without kinematics.
        """
        options = options or ConversionOptions()
        self.embodiment = embodiment
        self.options = options
        self.fps = float(options.fps or embodiment.control_rate_hz)
        if not self.fps > 0:
            raise BagError(f"fps must be positive, got {options.fps}")
        if options.actions is None:
            self.actions = ("trajectory" if embodiment.action_space == "joint_position"
                            else "next-state")
        else:
            self.actions = options.actions
        if self.actions not in ACTION_SOURCES:
            raise BagError(f"actions must be one of {ACTION_SOURCES}, got {self.actions!r}")
        if options.time_source not in TIME_SOURCES:
            raise BagError(f"time_source must be one of {TIME_SOURCES}, got "
                           f"{options.time_source!r}")
        max_gap_s = options.max_gap_s if options.max_gap_s is not None else 2.0 / self.fps
        if not max_gap_s >= 0:
            raise BagError(f"max_gap must be >= 0 s, got {max_gap_s}")
        self.max_gap_ns = int(round(max_gap_s * 1e9))
        if options.min_episode_frames < 1:
            raise BagError("min_episode_frames must be at least 1")
        self.image_topics = list(options.image_topics or embodiment.image_topics)
        if not self.image_topics or len(set(self.image_topics)) != len(self.image_topics):
            raise BagError(f"image topics must be non-empty and unique: {self.image_topics}")
        if options.image_keys:
            if len(options.image_keys) != len(self.image_topics):
                raise BagError(f"{len(options.image_keys)} image keys for "
                               f"{len(self.image_topics)} image topics {self.image_topics}")
            self.image_keys = [k if k.startswith(IMAGE_KEY_PREFIX) else IMAGE_KEY_PREFIX + k
                               for k in options.image_keys]
        else:
            self.image_keys = [image_key_for_topic(t) for t in self.image_topics]
        if len(set(self.image_keys)) != len(self.image_keys):
            raise BagError(f"image keys are not unique: {self.image_keys}")
        self.command_topics = []
        if self.actions == "trajectory":
            self.command_topics = [embodiment.trajectory_topic]
            if embodiment.gripper_topic:
                self.command_topics.append(embodiment.gripper_topic)
        used = [topic for topic, _, _ in self._roles()]
        repeated = sorted({t for t in used if used.count(t) > 1})
        if repeated:
            raise BagError(f"topics {repeated} are given more than one role (cameras, joint "
                           "states, commands, instructions, episode markers)")
        self.action_space = action_space_for(embodiment, kinematics)
        if embodiment.action_space == "ee_delta":
            try:
                self.action_space.arm  # noqa: B018 - builds the kinematics now, not mid-bag
            except ImportError as exc:
                raise BagError(f"{embodiment.name} has end-effector delta actions: converting "
                               f"joint recordings needs the arm's forward kinematics ({exc})"
                               ) from exc
            except ValueError as exc:
                raise BagError(str(exc)) from exc

    # ---- first pass -------------------------------------------------------------------------

    def read(self, bag: str | Path) -> Recording:
        """Read one bag's streams (no image is decoded) and check that it can be converted.

        Raises:
            BagError: not a rosbag2 directory, missing topics (named, with the bag's topics),
                wrong message types, unsupported image encodings, missing joints, no
                instruction and no default one.
        """
        path = Path(bag)
        if path.is_file() and (path.parent / "metadata.yaml").is_file():
            path = path.parent   # the .mcap / .db3 file of a bag: read the whole bag
        if not (path / "metadata.yaml").is_file():
            raise BagError(f"{path} is not a rosbag2 directory (no metadata.yaml)")
        _, reader_error, _ = rosbags_api()
        notes = [note for file in sorted(path.glob("*.mcap")) if (note := check_mcap(file))]
        try:
            recording = self._read(path)
        except reader_error as exc:
            raise BagError(f"{path}: cannot read the bag: {exc}") from exc
        recording.notes.extend(notes)
        return recording

    def _read(self, path: Path) -> Recording:
        any_reader, _, typestore = rosbags_api()
        emb, opts = self.embodiment, self.options
        with any_reader([path], default_typestore=typestore) as reader:
            topics = {topic: info.msgtype for topic, info in reader.topics.items()}
            self._check_topics(path, topics)
            images = {t: ImageStream(t, topics[t]) for t in self.image_topics}
            state = JointStream(emb.joint_state_topic)
            commands = [JointStream(t) for t in self.command_topics if t in topics]
            by_topic = {s.topic: s for s in commands}
            instructions: list[tuple[int, str]] = []
            markers: list[tuple[int, str]] = []
            wanted = set(images) | {emb.joint_state_topic} | set(by_topic)
            wanted |= {emb.instruction_topic, opts.episode_marker_topic} & set(topics)
            connections = [c for c in reader.connections if c.topic in wanted]
            sources: dict[str, set[str]] = {}
            for connection, log_ns, raw in reader.messages(connections=connections):
                topic = connection.topic
                msg = reader.deserialize(raw, connection.msgtype)
                t, source = self._message_time(msg, log_ns)
                sources.setdefault(topic, set()).add(source)
                if topic in images:
                    try:
                        if connection.msgtype == IMAGE:
                            check_encoding(msg.encoding)
                        else:
                            check_compressed_format(msg.format)
                    except BagError as exc:
                        raise BagError(f"{path}: {topic}: {exc}") from None
                    images[topic].add(t, log_ns)
                elif topic == emb.joint_state_topic:
                    state.add(t, msg.name, msg.position)
                elif topic in by_topic:
                    if len(msg.points):
                        by_topic[topic].add(t, msg.joint_names, msg.points[0].positions)
                elif topic == emb.instruction_topic:
                    if msg.data.strip():
                        instructions.append((t, msg.data.strip()))
                else:
                    markers.append((t, msg.data.strip()))
            start_ns, end_ns = reader.start_time, reader.end_time
        for stream in images.values():
            stream.finish()
        state.finish()
        for stream in commands:
            stream.finish()
        self._check_joints(path, state, commands)
        if not instructions and opts.default_instruction is None:
            raise BagError(f"{path}: no instruction message on {emb.instruction_topic}; give "
                           "a default instruction (--default-instruction TEXT)")
        time_sources = {t: " and ".join(sorted(s)) for t, s in sources.items()}
        return Recording(path=path, storage=storage_of(path), start_ns=int(start_ns),
                         end_ns=int(end_ns), topics=topics, images=images, state=state,
                         commands=commands, instructions=sorted(instructions),
                         markers=sorted(markers), time_sources=time_sources)

    def _message_time(self, msg, log_ns: int) -> tuple[int, str]:
        header = getattr(msg, "header", None)
        if header is not None and self.options.time_source == "auto":
            stamp = int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
            if stamp != 0:
                return stamp, "header stamp"
        return int(log_ns), "bag time"

    def _roles(self) -> list[tuple[str, tuple[str, ...], bool]]:
        """(topic, accepted message types, required) of every topic the conversion reads."""
        emb, opts = self.embodiment, self.options
        roles = [(t, (IMAGE, COMPRESSED_IMAGE), True) for t in self.image_topics]
        roles.append((emb.joint_state_topic, (JOINT_STATE,), True))
        roles += [(t, (JOINT_TRAJECTORY,), i == 0) for i, t in enumerate(self.command_topics)]
        roles.append((emb.instruction_topic, (STRING,), opts.default_instruction is None))
        roles.append((opts.episode_marker_topic, (STRING,), False))
        return roles

    def _check_topics(self, path: Path, topics: dict[str, str]) -> None:
        roles = self._roles()
        missing = [t for t, _, required in roles if required and t not in topics]
        if missing:
            have = "\n".join(f"  {t} [{m}]" for t, m in sorted(topics.items())) or "  (none)"
            raise BagError(f"{path}: topics {missing} are not in the bag; it has:\n{have}")
        for topic, types, _ in roles:
            if topic in topics and topics[topic] not in types:
                raise BagError(f"{path}: topic {topic} has type {topics[topic]}, expected "
                               f"{' or '.join(types)}")

    def _check_joints(self, path: Path, state: JointStream, commands: list[JointStream]
                      ) -> None:
        joints = self.embodiment.joint_names
        missing = [j for j in joints if j not in state.series]
        if missing:
            raise BagError(f"{path}: joint states on {state.topic} lack joints {missing} "
                           f"(they name {state.joints})")
        if self.actions == "trajectory":
            missing = [j for j in joints if not any(j in s.series for s in commands)]
            if missing:
                named = {s.topic: s.joints for s in commands}
                raise BagError(f"{path}: the commanded trajectories lack joints {missing} "
                               f"(they name {named})")

    # ---- alignment --------------------------------------------------------------------------

    def plan(self, recording: Recording) -> tuple[list[AlignedRun], BagReport]:
        """Episodes (runs of valid grid steps) of a recording, and the report of its gaps."""
        report = BagReport(bag=str(recording.path), storage=recording.storage,
                           duration_s=(recording.end_ns - recording.start_ns) / 1e9,
                           fps=self.fps, time_sources=dict(recording.time_sources),
                           notes=list(recording.notes))
        sources = self._command_sources(recording)
        span = self._data_span(recording, sources)
        if span is None:
            report.notes.append("a required stream has no messages")
            return [], report
        runs: list[AlignedRun] = []
        for task, start, stop, inclusive in self._intervals(recording, span, report):
            runs.extend(self._align(recording, sources, task, start, stop, inclusive, report))
        report.gaps.sort(key=lambda g: (g.start_s, g.stream))
        return runs, report

    def _command_sources(self, recording: Recording) -> list[tuple[JointStream, list[int]]]:
        """(stream, embodiment joint indices it provides): each joint from the first topic."""
        sources, taken = [], set()
        for stream in recording.commands:
            idx = [i for i, j in enumerate(self.embodiment.joint_names)
                   if j in stream.series and i not in taken]
            if idx:
                sources.append((stream, idx))
                taken.update(idx)
        return sources

    def _data_span(self, recording: Recording, sources) -> tuple[int, int] | None:
        spans = [recording.state.span(self.embodiment.joint_names)]
        spans += [stream.span([self.embodiment.joint_names[i] for i in idx])
                  for stream, idx in sources]
        for stream in recording.images.values():
            times = stream.series.times
            spans.append((int(times[0]), int(times[-1])) if len(times) else None)
        if any(s is None for s in spans):
            return None
        start, end = max(s[0] for s in spans), min(s[1] for s in spans)
        return (start, end) if start <= end else None

    def _intervals(self, recording: Recording, span: tuple[int, int], report: BagReport
                   ) -> Iterator[tuple[str, int, int, bool]]:
        """(task, start, stop, stop included) of each episode, clipped to the data span."""
        events = [(t, 0, text) for t, text in recording.instructions]
        events += [(t, 1, text) for t, text in recording.markers]
        events.sort(key=lambda e: (e[0], e[1]))
        task = self.options.default_instruction
        active, start = task is not None, span[0]
        first = recording.instructions[0][0] if recording.instructions else None
        if not active and first is not None and first > span[0]:
            report.notes.append(f"{(first - span[0]) / 1e9:.3f} s of data before the first "
                                "instruction were skipped (no default instruction)")
        intervals = []
        for t, kind, text in events:
            if kind == 0 and active and text == task:
                continue   # the same instruction published again: not a new episode
            if active:
                intervals.append((task, start, t, False))
            if kind == 0:
                task, active = text, True
            else:
                active = task is not None and text.lower() != END_MARKER
            start = t
        if active:
            intervals.append((task, start, span[1], True))
        for task, start, stop, inclusive in intervals:
            if stop > span[1]:
                stop, inclusive = span[1], True
            start = max(start, span[0])
            if stop > start or (stop == start and inclusive):
                yield task, start, stop, inclusive

    def _align(self, recording: Recording, sources, task: str, start: int, stop: int,
               inclusive: bool, report: BagReport) -> list[AlignedRun]:
        emb = self.embodiment
        step_ns = 1e9 / self.fps
        count = int(np.floor((stop - start) / step_ns)) + 1
        grid = start + np.round(np.arange(count) * step_ns).astype(np.int64)
        grid = grid[grid <= stop] if inclusive else grid[grid < stop]
        if not len(grid):
            return []
        fresh: dict[str, np.ndarray] = {}
        state, fresh[recording.state.topic] = recording.state.hold(emb.joint_names, grid,
                                                                   self.max_gap_ns)
        image_index = {}
        for topic, stream in recording.images.items():
            index, fresh[topic] = stream.series.hold(grid, self.max_gap_ns)
            image_index[topic] = stream.series.values[index]
        valid = np.logical_and.reduce(list(fresh.values()))
        if self.actions == "trajectory":
            target = np.empty_like(state)
            for stream, idx in sources:
                names = [emb.joint_names[i] for i in idx]
                target[:, idx], fresh[stream.topic] = stream.hold(names, grid, self.max_gap_ns)
                valid &= fresh[stream.topic]
        else:
            # The action of step k is the state of step k + 1 (none for the last step).
            target = np.concatenate([state[1:], state[-1:]])
            valid &= np.append(valid[1:], False)
        action = self._actions(state, target, valid)
        t0 = recording.start_ns
        for stream_name, ok in fresh.items():
            for a, b in _false_runs(ok):
                report.gaps.append(GapSpan(stream_name, (grid[a] - t0) / 1e9,
                                           (grid[b - 1] - t0) / 1e9, b - a))
        runs = []
        for a, b in _true_runs(valid):
            if b - a < self.options.min_episode_frames:
                report.dropped_frames += b - a
                continue
            runs.append(AlignedRun(task, grid[a:b], state[a:b], action[a:b],
                             {t: i[a:b] for t, i in image_index.items()}))
        report.dropped_frames += int((~valid).sum())
        return runs

    def _actions(self, state: np.ndarray, target: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Action per step from the state and the target joints (the embodiment's space)."""
        state = np.where(valid[:, None], state, np.nan)
        return np.nan_to_num(self.action_space.encode(state, target), nan=0.0)

    # ---- second pass ------------------------------------------------------------------------

    def episodes(self, recording: Recording, runs: list[AlignedRun]) -> Iterator[Episode]:
        """Decode the images of each run (one time-ranged read per episode) and yield it."""
        any_reader, _, typestore = rosbags_api()
        with any_reader([recording.path], default_typestore=typestore) as reader:
            connections = [c for c in reader.connections if c.topic in recording.images]
            for run in runs:
                yield self._episode(reader, connections, recording, run)

    def _episode(self, reader, connections, recording: Recording, run: AlignedRun) -> Episode:
        wanted: dict[tuple[str, int, int], tuple[str, int]] = {}
        for topic, index in run.image_index.items():
            stream = recording.images[topic]
            for number in np.unique(index).tolist():
                key = (topic, stream.log_ns[number], stream.ordinal[number])
                wanted[key] = (topic, number)
        first = min(k[1] for k in wanted)
        last = max(k[1] for k in wanted)
        decoded: dict[tuple[str, int], np.ndarray] = {}
        seen: dict[tuple[str, int], int] = {}
        for connection, log_ns, raw in reader.messages(connections=connections, start=first,
                                                       stop=last + 1):
            ordinal = seen.get((connection.topic, log_ns), 0)
            seen[(connection.topic, log_ns)] = ordinal + 1
            target = wanted.get((connection.topic, log_ns, ordinal))
            if target is not None:
                msg = reader.deserialize(raw, connection.msgtype)
                try:
                    decoded[target] = decode_image(msg, connection.msgtype)
                except BagError as exc:
                    raise BagError(f"{recording.path}: {connection.topic}: {exc}") from None
        images = {}
        for key, topic in zip(self.image_keys, self.image_topics, strict=True):
            frames = [decoded[(topic, int(n))] for n in run.image_index[topic]]
            shapes = {f.shape for f in frames}
            if len(shapes) != 1:
                raise BagError(f"{recording.path}: images on {topic} change size "
                               f"{sorted(shapes)} within an episode")
            images[key] = np.stack(frames)
        t0 = recording.start_ns
        return Episode(images=images, state=run.state, action=run.action, task=run.task,
                       timestamps=(run.grid - run.grid[0]) / 1e9,
                       start_s=(run.grid[0] - t0) / 1e9, end_s=(run.grid[-1] - t0) / 1e9)

    # ---- all together -----------------------------------------------------------------------

    def write(self, recording: Recording, runs: list[AlignedRun], report: BagReport,
              writer) -> None:
        """Write the planned episodes of a recording, noting their indices in the report.

        Args:
            recording: from `read`.
            runs: the episodes, from `plan(recording)`.
            report: the report from `plan(recording)`; episodes are appended to it.
            writer: has `add_episode(images, state, action, task, timestamps) -> int`.
        """
        for episode in self.episodes(recording, runs):
            index = writer.add_episode(episode.images, episode.state, episode.action,
                                       episode.task, timestamps=episode.timestamps)
            report.episodes.append(EpisodeSummary(int(index), episode.task, len(episode.state),
                                                  episode.start_s, episode.end_s))

    def convert(self, bags: Sequence[str | Path], writer) -> list[BagReport]:
        """Read and check every bag (failing before anything is written), then write them.

        Returns:
            One report per bag, with the episode indices the writer returned.
        """
        recordings = [self.read(bag) for bag in bags]
        reports = []
        for recording in recordings:
            runs, report = self.plan(recording)
            self.write(recording, runs, report, writer)
            reports.append(report)
        return reports


def _true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True values."""
    padded = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _false_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    return _true_runs(~np.asarray(mask, dtype=bool))


def convert_bags(bags: Sequence[str | Path], out: str | Path, embodiment: Embodiment,
                 options: ConversionOptions | None = None, version: str = "v3.0",
                 use_videos: bool = True) -> tuple[Path, list[BagReport]]:
    """Convert rosbag2 recordings into a LeRobot dataset at `out`.

    Returns:
        (dataset root, one report per bag).

    Raises:
        BagError: a bag cannot be converted, or no frame survived alignment.
    """
    converter = BagConverter(embodiment, options)
    recordings = [converter.read(bag) for bag in bags]
    plans = [converter.plan(recording) for recording in recordings]
    if not any(runs for runs, _ in plans):
        details = "\n".join(report.format() for _, report in plans)
        raise BagError(f"no frame could be aligned in the recordings:\n{details}")
    from .lerobot import LeRobotWriter

    writer = LeRobotWriter(out, fps=converter.fps, embodiment=embodiment,
                           image_keys=converter.image_keys, version=version,
                           use_videos=use_videos, robot_type=embodiment.name)
    for recording, (runs, report) in zip(recordings, plans, strict=True):
        converter.write(recording, runs, report, writer)
    return writer.finalize(), [report for _, report in plans]
