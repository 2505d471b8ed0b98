"""A visual record of policy cycles: one rerun recording (`.rrd`) per episode (rerun-sdk).

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

The node writes one per instruction it receives (`record_path`), `evaluate --record` one per
episode (under `OUT/recordings`).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

__all__ = ["CycleRecorder"]


class CycleRecorder:
    """Writes policy cycles of one episode to a rerun file."""

    def __init__(self, path: str | Path, joint_names: list[str],
                 application: str = "twinbrain_ros"):
        """Start the recording at `path` (its directory is created).

        Raises:
            RuntimeError: rerun-sdk is not installed.
        """
        try:
            import rerun as rr
        except ImportError as error:  # an optional piece: say what to install
            raise RuntimeError("recording needs rerun-sdk (pip install rerun-sdk)") from error
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
