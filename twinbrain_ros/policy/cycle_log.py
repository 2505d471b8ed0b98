"""Rerun logs of policy cycles: one rerun file (`.rrd`) per episode (rerun-sdk).

Open one with `rerun FILE.rrd` (the viewer comes with `pip install rerun-sdk`). Everything is
on the `time` timeline, in seconds of the clock the policy runs on (simulated time in a
simulation). Entity paths:

    /instruction                   the instruction (text)
    /camera/<k>                    each camera image the model saw
    /joints/measured               measured joint positions, one series per joint
    /joints/sent                   the trajectory points sent to the controller
    /chunks/<nnnn>                 chunk n as planned: its decoded joint targets from the
                                   observation on (before joining the executing plan)
    /timing/inference_latency_s    the model's time per chunk
    /timing/observation_to_plan_s  observation to plan ready (what real-time chunking freezes)
    /events/holds                  each hold, with its cause

The node writes one per instruction it receives (`rerun_path`), `evaluate --rerun` one per
episode (under `OUT/rerun`). `CycleLogs` opens them as episodes change.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

__all__ = ["CycleLog", "CycleLogs"]


class CycleLog:
    """Writes policy cycles of one episode to a rerun file."""

    def __init__(self, path: str | Path, joint_names: list[str],
                 application: str = "twinbrain_ros"):
        """Start the log at `path` (its directory is created).

        Raises:
            RuntimeError: rerun-sdk is not installed.
        """
        try:
            import rerun as rr
        except ImportError as error:  # an optional piece: say what to install
            raise RuntimeError("rerun logs need rerun-sdk (pip install rerun-sdk)") from error
        self.rr = rr
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.joint_names = list(joint_names)
        self.rec = rr.RecordingStream(application, recording_id=str(uuid.uuid4()))
        self.rec.save(str(self.path))
        self.chunks = 0
        self.rec.log("joints/measured", rr.SeriesLines(names=self.joint_names), static=True)
        self.rec.log("joints/sent", rr.SeriesPoints(names=self.joint_names, markers="circle"),
                     static=True)

    def _at(self, t: float) -> None:
        self.rec.set_time("time", duration=float(t))

    def instruction(self, t: float, text: str) -> None:
        """The instruction of the episode (or a new one)."""
        self._at(t)
        self.rec.log("instruction", self.rr.TextDocument(text))

    def observation(self, t: float, images: list[np.ndarray]) -> None:
        """The camera images of one cycle's observation."""
        self._at(t)
        for k, image in enumerate(images):
            self.rec.log(f"camera/{k}", self.rr.Image(np.asarray(image, dtype=np.uint8)))

    def measured(self, t: float, position: np.ndarray) -> None:
        """One measured joint state."""
        self._at(t)
        self.rec.log("joints/measured", self.rr.Scalars(np.asarray(position, dtype=np.float64)))

    def chunk(self, observation_time: float, targets: np.ndarray, dt: float,
              latency_s: float, ready_time: float) -> None:
        """A chunk as planned: target k at `observation_time + (k + 1) dt`; its timing."""
        name = f"chunks/{self.chunks:04d}"
        self.chunks += 1
        self.rec.log(name, self.rr.SeriesLines(names=self.joint_names), static=True)
        for k, target in enumerate(np.asarray(targets, dtype=np.float64)):
            self._at(observation_time + (k + 1) * dt)
            self.rec.log(name, self.rr.Scalars(target))
        self._at(ready_time)
        self.rec.log("timing/inference_latency_s", self.rr.Scalars(float(latency_s)))
        self.rec.log("timing/observation_to_plan_s",
                     self.rr.Scalars(float(ready_time - observation_time)))

    def sent(self, start_time: float, time_from_start: np.ndarray, positions: np.ndarray,
             hold_cause: str = "") -> None:
        """A trajectory sent to the controller; a hold also logs an event with its cause."""
        for offset, point in zip(np.asarray(time_from_start, dtype=np.float64),
                                 np.asarray(positions, dtype=np.float64), strict=True):
            self._at(start_time + offset)
            self.rec.log("joints/sent", self.rr.Scalars(point))
        if hold_cause:
            self._at(start_time)
            self.rec.log("events/holds", self.rr.TextLog(f"hold: {hold_cause}",
                                                         level="WARN"))

    def close(self) -> None:
        """Flush and close the file."""
        self.rec.flush()
        self.rec.disconnect()


class CycleLogs:
    """The rerun log of each episode, opened when an episode's first cycle comes.

    Files go to `directory` as `<episode>_<instruction>.rrd` (the node), or where `path_for`
    says. A log that fails (a full disk) is closed and `failed(error)` is called: logging stops
    there, the robot goes on.
    """

    def __init__(self, joint_names: list[str], directory: str | Path | None = None,
                 path_for=None):
        """Name files in `directory`, or by `path_for(episode, instruction) -> path`."""
        self.joint_names = list(joint_names)
        self.directory = None if directory is None else Path(directory)
        self.path_for = path_for or self._default_path
        self.current: CycleLog | None = None
        self.episode = None

    @staticmethod
    def check_directory(path: str | Path, name: str) -> None:
        """Logs need rerun-sdk and a writable directory: a ValueError says which is missing."""
        try:
            import rerun  # noqa: F401
        except ImportError as error:
            raise ValueError(f"{name} needs rerun-sdk (pip install rerun-sdk)") from error
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{name} {str(path)!r} cannot be created: {error.strerror}") \
                from error

    def _default_path(self, episode: int, instruction: str) -> Path:
        name = "".join(c if c.isalnum() else "_" for c in instruction[:40])
        return self.directory / f"{episode:04d}_{name}.rrd"

    def open(self, episode: int, instruction: str, t: float, failed) -> CycleLog | None:
        """The episode's log (a new file, starting with the instruction, on a new episode)."""
        if self.current is not None and self.episode == episode:
            return self.current
        try:
            self.close()
        except Exception as error:  # noqa: BLE001 - the last episode's file: stop logging
            self._failed(error, failed)
            return None
        try:
            self.current = CycleLog(self.path_for(episode, instruction), self.joint_names)
            self.episode = episode
            self.current.instruction(t, instruction)
        except Exception as error:  # noqa: BLE001 - never a reason to hold the robot
            self._failed(error, failed)
        return self.current

    def call(self, method: str, *args, failed) -> None:
        """Call the open log's `method` (if a log is open); a failure stops logging."""
        if self.current is None:
            return
        try:
            getattr(self.current, method)(*args)
        except Exception as error:  # noqa: BLE001 - a full disk must not stop the robot
            self._failed(error, failed)

    def _failed(self, error: Exception, failed) -> None:
        log, self.current = self.current, None
        if log is not None:
            try:
                log.close()
            except Exception:  # noqa: BLE001, S110 - already failing; nothing more to save
                pass
        failed(error)

    def close(self) -> None:
        """Close the open log, if any."""
        log, self.current = self.current, None
        if log is not None:
            log.close()
