"""The policy loop: when to plan, what to send, and holding the robot when anything fails.

One loop runs the policy wherever it runs: in the ROS policy node (its worker thread, on the
node's clock) and in an in-process evaluation (on simulated time). What differs is injected:
the clock and the robot's I/O (`PolicyIO`: the latest observation, the newest measured joint
position, sending a trajectory) and where reports go. The loop owns:

- the replanning cadence: a cycle starts every `actions_per_inference` control periods; one
  that planned nothing (no usable inputs, a failure, an operator hold) is retried one control
  period later;
- inference-delay emulation: with `inference_delay_s`, a chunk is joined into the executing plan
  that long (on the loop's clock) after its cycle started, and the next cycle starts no earlier;
- fail -> hold, with one cause rule: a `CausedError` counts under its cause, anything else under
  `inference_error`; the robot holds at its newest measured position (or the commanded one when
  the measurement is stale while a plan runs);
- hold de-duplication: while the robot already holds and has not moved by a quarter step, a
  failing cycle sends nothing more;
- discarding a chunk whose cycle was overtaken (a hold, a resume, a switch of actuation: see
  `invalidate`);
- the rerun log's calls (`twinbrain_ros.policy.cycle_log`): one file per episode.

`tick()` does what is due and returns the clock time at which it wants to be called again.
`hold`, `invalidate` and `operator_hold` may be used from other threads (a ROS service).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import CausedError, shorten
from ..robot.observation import Observation
from .config import PolicyConfig
from .contract import ActionChunk
from .pipeline import PolicyPipeline
from .scheduler import Trajectory

__all__ = ["PolicyIO", "PolicyLoop", "Snapshot"]


@dataclass
class Snapshot:
    """One consistent observation and what travels with its cycle.

    Attributes:
        observation: images, state (model joint order) and instruction.
        time: when the joint state was measured (the loop's clock).
        episode: changes when a new task starts (a new rerun log).
        joints: joint states measured since the previous snapshot, (time, position), for the
            rerun log.
        info: kept in the cycle's record (the node's receipt time and stamps).
    """

    observation: Observation
    time: float
    episode: int = 0
    joints: list[tuple[float, np.ndarray]] = field(default_factory=list)
    info: dict = field(default_factory=dict)


class PolicyIO(Protocol):
    """The robot as the loop sees it."""

    def now(self) -> float:
        """The loop's clock (seconds)."""

    def observe(self) -> Snapshot | None:
        """The latest consistent snapshot; None when the inputs are unusable (said elsewhere)."""

    def measured(self, max_age: float | None = None) -> np.ndarray | None:
        """The newest measured joint position (None if none, or older than `max_age`)."""

    def send(self, trajectory: Trajectory) -> bool:
        """Send a trajectory to the robot; False when it could not go (shutting down)."""


@dataclass
class _Pending:
    """A chunk inferred and waiting for its delivery time (inference-delay emulation)."""

    snapshot: Snapshot
    chunk: ActionChunk
    started: float
    ready: float
    generation: int


def _no_report(cause: str, message: str, level: str = "warning", count: int = 1) -> None:
    return None


class PolicyLoop:
    """Runs a `PolicyPipeline` on a robot's I/O (see the module docstring)."""

    def __init__(self, pipeline: PolicyPipeline, config: PolicyConfig, io: PolicyIO,
                 report: Callable[..., None] = _no_report, logs=None):
        """Plan with `pipeline` on `io`, as `config` says.

        Args:
            pipeline: the cycle's stages (model, decode, schedule, safety).
            config: cadence, delay, input ages.
            io: the robot (`PolicyIO`).
            report: called as `report(cause, message, level, count)` for what the caller counts
                and logs (level "count": count only): failed cycles (under their cause), holds
                on unusable inputs, discarded chunks, late actions, log failures.
            logs: a `CycleLogs` (one rerun file per episode) or None.
        """
        self.pipeline, self.config, self.io = pipeline, config, io
        self.embodiment = pipeline.embodiment
        self.report = report
        self.logs = logs
        self.period = self.embodiment.dt * config.actions_per_inference
        # The plan and what is sent from it: the loop after inference, and holds from other
        # threads. Never held while the model runs.
        self.lock = threading.RLock()
        self.generation = 0              # bumped by `invalidate`
        self.operator_hold = False       # no cycles while set (`hold` it with force)
        self.held_at = None              # where the last hold (since the last plan) went
        self.holds = 0                   # hold trajectories sent
        self.failures: collections.Counter = collections.Counter()  # failed cycles by cause
        self.last_error = ""
        self.cycles: collections.deque = collections.deque(maxlen=200)  # timing records
        self.chunks_scheduled = 0        # chunks joined into the plan (sent or not)
        self._pending: _Pending | None = None
        self._next_start = -float("inf")
        self._last_now = -float("inf")

    # -- stepping ------------------------------------------------------------------------------

    @property
    def pending_ready(self) -> float | None:
        """When the inferred chunk waiting for its delay is due, None if there is none."""
        return None if self._pending is None else self._pending.ready

    def next_due(self) -> float:
        """When `tick` has something to do: a delayed chunk's delivery or the next cycle."""
        return self._pending.ready if self._pending is not None else self._next_start

    def tick(self, deliver: bool = False) -> float:
        """Deliver a chunk that is due, else start a cycle that is due; the next due time.

        `deliver`: the delayed chunk is due now whatever the clock says (a caller whose clock
        advances in steps, the simulator's).
        """
        now = self.io.now()
        if now + 1e-9 < self._last_now:
            # The clock went back (a simulator restarted, a bag looped): the plan, a pending
            # chunk and the next cycle's time belong to the old timeline.
            self.report("clock_reset", f"the clock went back from {self._last_now:.3f} to "
                                       f"{now:.3f} s: planning afresh")
            self.reset()
        self._last_now = now
        if self._pending is not None:
            if not deliver and now + 1e-9 < self._pending.ready:
                return self._pending.ready
            pending, self._pending = self._pending, None
            if not self._guarded(self._deliver, pending):
                self._next_start = pending.started + self.embodiment.dt  # failed: look again
            return self._next_start
        if now + 1e-9 < self._next_start:
            return self._next_start
        planned = self._guarded(self._start_cycle, now)
        self._next_start = now + (self.period if planned else self.embodiment.dt)
        if self._pending is not None:
            self._next_start = max(self._next_start, self._pending.ready)
            return self._pending.ready
        return self._next_start

    def reset(self) -> None:
        """A new episode: no plan, no pending chunk, the next cycle at once."""
        with self.lock:
            self.pipeline.scheduler.reset()
            self._pending = None
            self._next_start = -float("inf")
            self.held_at = None

    def invalidate(self) -> None:
        """Discard whatever the cycle in flight returns (a hold or a resume overtook it)."""
        with self.lock:
            self.generation += 1

    def _guarded(self, stage, *args) -> bool:
        """Run a stage; whatever fails holds the robot (and never ends the loop)."""
        try:
            return bool(stage(*args))
        except Exception as error:  # noqa: BLE001 - whatever failed, the robot must hold
            try:
                self.fail(error)
            except Exception as failure:  # noqa: BLE001 - never let the loop end
                self.report("hold_failed", f"could not hold after {type(error).__name__}: "
                                           f"{shorten(str(failure), 200)}", "error")
            return False

    # -- a cycle -------------------------------------------------------------------------------

    def _start_cycle(self, started: float) -> bool:
        """Observe and infer; True when a chunk was inferred (delivered now or pending)."""
        if self.operator_hold:
            return False
        snapshot = self.io.observe()
        if snapshot is None:
            # Inputs went stale or unusable while a plan runs: the controller would go on
            # blind to its end. Stop it where the robot is, once.
            with self.lock:
                if self.pipeline.scheduler.plan is not None:
                    self.hold("unusable inputs")
                    self.report("held_on_unusable_inputs", "holding position: no usable "
                                                           "inputs for the next plan")
            return False
        generation = self.generation
        with self.lock:
            prefix = self.pipeline.prepare(snapshot.observation, snapshot.time)
        self._log_observation(snapshot)
        chunk = self.pipeline.infer(snapshot.observation, prefix)
        pending = _Pending(snapshot, chunk, started, started + self.config.inference_delay_s,
                           generation)
        if self.config.inference_delay_s > 0 and self.io.now() + 1e-9 < pending.ready:
            self._pending = pending
        else:
            self._deliver(pending)
        return True

    def _deliver(self, pending: _Pending) -> bool:
        """Join a ready chunk into the plan and send it (or discard it if overtaken)."""
        snapshot, chunk = pending.snapshot, pending.chunk
        observation = snapshot.observation
        targets = self.pipeline.decode(chunk, observation)  # IK runs outside the lock
        with self.lock:
            if pending.generation != self.generation or self.operator_hold:
                self.report("discarded_after_hold", "", "count")
                return True
            result = self.pipeline.schedule(chunk, targets, observation, snapshot.time,
                                            self.io.now, measured=lambda: self._measured_or(
                                                observation.state))
            sent = self.io.send(result.trajectory)
            if sent:
                self.held_at = None
                trajectory = result.trajectory
                self._log("chunk", snapshot.time, result.targets, self.embodiment.dt,
                          chunk.latency_s, trajectory.start_time)
                self._log("sent", trajectory.start_time, trajectory.time_from_start,
                          trajectory.positions)
        now = self.io.now()
        # Time in the loop beyond the model: snapshot, scheduling, safety, sending.
        record = {**snapshot.info, "started": pending.started, "model_s": chunk.latency_s,
                  "published": now, "overhead_s": now - pending.started - chunk.latency_s,
                  "wall_time": time.monotonic()}
        if self.cycles:
            record["period_s"] = pending.started - self.cycles[-1]["started"]
        self.cycles.append(record)
        self.chunks_scheduled += 1
        if result.dropped_actions:
            self.report("late_actions_dropped", "", "count", result.dropped_actions)
        return sent  # not sent (refused, shutting down): look again one period later

    def _measured_or(self, fallback: np.ndarray) -> np.ndarray:
        measured = self.io.measured()
        return fallback if measured is None else measured

    # -- failing and holding -------------------------------------------------------------------

    def fail(self, error: Exception) -> None:
        """A failed cycle: report its cause, hold the robot where it is measured."""
        cause = error.cause if isinstance(error, CausedError) else "inference_error"
        text = shorten(str(error) or type(error).__name__, 300)
        self.last_error = f"{cause}: {text}"
        self.failures[cause] += 1
        self.report(cause, f"holding position: {text}",
                    "warning" if isinstance(error, CausedError) else "error")
        with self.lock:
            self.hold(cause)

    def hold(self, reason: str, force: bool = False) -> bool:
        """Send a hold at the newest measured position; whether one was sent.

        A measured position older than `max_input_age_s` is not trusted while a plan runs: the
        robot then holds at the commanded position. While the robot already holds (no plan
        since the last hold) and has not moved by a quarter step, the hold is not sent again
        unless `force`: failing cycles in a row do not flood the controller.
        """
        with self.lock:
            now = self.io.now()
            scheduler = self.pipeline.scheduler
            executing = scheduler.plan is not None
            position = self.io.measured(self.config.max_input_age_s)
            if position is None:
                position = scheduler.commanded_position(now)
            if position is None:
                position = self.io.measured()
            scheduler.reset()
            if position is None:
                return False
            held_at = self.held_at
            if (not force and not executing and held_at is not None
                    and np.all(np.abs(position - held_at) < 0.25 * self.embodiment.max_step)):
                return True
            try:
                trajectory = self.pipeline.hold(position, now)
            except ValueError as error:
                self.report(getattr(error, "cause", "hold_refused"),
                            f"cannot hold ({reason}): {error}")
                return False
            self.holds += 1
            sent = self.io.send(trajectory)
            self.held_at = trajectory.positions[0].copy() if sent else None
            if sent:
                self._log("sent", trajectory.start_time, trajectory.time_from_start,
                          trajectory.positions, reason)
            return sent

    # -- the rerun log -------------------------------------------------------------------------

    def _log_observation(self, snapshot: Snapshot) -> None:
        if self.logs is None:
            return
        with self.lock:  # holds from other threads log through the same file
            log = self.logs.open(snapshot.episode, snapshot.observation.instruction,
                                 snapshot.time, self._log_failed)
            if log is None:
                return
            self._log("observation", snapshot.time, snapshot.observation.images)
            for t, position in snapshot.joints:
                self._log("measured", t, position)

    def open_log(self, episode: int, instruction: str) -> None:
        """Open the episode's rerun log now (else its first cycle opens it)."""
        if self.logs is not None:
            with self.lock:
                self.logs.open(episode, instruction, self.io.now(), self._log_failed)

    def log_measured(self, t: float, position: np.ndarray) -> None:
        """A measured joint state for the open log (an I/O that samples every period)."""
        self._log("measured", t, position)

    def _log(self, method: str, *args) -> None:
        if self.logs is not None:
            self.logs.call(method, *args, failed=self._log_failed)

    def _log_failed(self, error: Exception) -> None:
        self.report("cycle_log_failed", f"rerun log stopped: {type(error).__name__}: "
                                        f"{shorten(str(error), 300)}", "error")
        self.logs = None

    def close(self) -> None:
        """Close the open log (call once the loop has stopped); a failure is reported."""
        if self.logs is not None:
            with self.lock:
                try:
                    self.logs.close()
                except Exception as error:  # noqa: BLE001 - shutting down: report, go on
                    self._log_failed(error)
