"""The stages of one control cycle: observation -> model -> joint targets -> plan -> safety.

`prepare` (the rtc prefix, a plan the robot left), `infer` (the model), `decode` (the action
space: inverse kinematics for end-effector deltas), `schedule` (join the executing plan, check
it, make the trajectory) and `hold`. The policy loop (`twinbrain_ros.policy.loop`) runs them,
in the ROS node and in evaluations alike.

Chunk transitions (`chunk_transition`):

- ``blend``: the actions whose time passed while the model ran are dropped and the first
  `blend_steps` of the rest are cross-faded into the executing plan;
- ``rtc`` (real-time chunking): the model is given the executing plan's overlap with the new
  chunk (mapped back into the chunk's action space by the robot's own action space) and
  inpaints it: the actions that will execute while it runs are reproduced exactly, the rest of
  the overlap is guided towards the old plan (`rtc_schedule`). How many actions execute during
  inference comes from the measured latency (observation to plan ready), a running high
  percentile (`latency_percentile` of the last `latency_window` cycles). No cross-fade follows.

Either way, a robot that has left the commanded plan (displaced by hand, reset by a simulator,
blocked) is not steered back onto it: when the measured state is further from the plan than
the embodiment's `tracking_tolerance` (grasp joints judged one-sided: fingers stopped by an
object are not off the plan), the plan is forgotten and the chunk is planned from the measured
state; `divergences` counts this. Found before inference, the chunk is sampled without a
prefix; found when an rtc chunk is ready, that chunk (which reproduces the plan the robot left)
is refused (`plan_left`: the caller holds) and the next cycle samples afresh. With
`track_plan` false (a dry run, where nothing moves the robot) the check is off.
"""

from __future__ import annotations

__all__ = ["ChunkRejected", "CycleResult", "PolicyPipeline"]

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..robot.action_spaces import ChunkRejected
from ..robot.embodiment import Embodiment
from ..robot.observation import Observation
from ..transforms.ensemble import AdaptiveEnsembler
from ..transforms.rtc import ChunkPrefix
from .config import PolicyConfig
from .contract import ActionChunk
from .safety import SafetyFilter, hold_trajectory
from .scheduler import ActionChunkScheduler, Trajectory


@dataclass
class CycleResult:
    """What one cycle produced."""

    trajectory: Trajectory
    chunk: ActionChunk
    dropped_actions: int   # actions whose time had passed when the chunk was ready
    frozen_actions: int = 0  # actions the model was told would execute during inference (rtc)
    targets: np.ndarray | None = None  # the chunk's decoded joint targets, as planned


class PolicyPipeline:
    """Runs the model on snapshots and keeps the executing plan smooth and safe."""

    def __init__(self, runtime, embodiment: Embodiment, config: PolicyConfig | None = None,
                 actions=None, latency_percentile: float = 95.0, latency_window: int = 50,
                 notify: Callable[[str, str], None] | None = None):
        """Schedule and check the chunks `runtime` infers.

        Args:
            runtime: anything with `infer(Observation, prefix=None) -> ActionChunk` (a
                `PolicyRuntime` or `RemoteRuntime`; `prefix` is passed only in rtc mode).
            embodiment: the robot.
            config: `blend_steps`, `chunk_transition` and `rtc_schedule` (the defaults of
                `PolicyConfig` when None).
            actions: the action space decoding chunks (default: the embodiment's own).
            latency_percentile: the percentile of recent latencies that sizes the frozen prefix.
            latency_window: how many recent cycles that percentile is taken over.
            notify: called with (cause, message) when the plan is forgotten because the
                robot left it.
        """
        config = config or PolicyConfig()
        if config.chunk_transition == "rtc" and not getattr(runtime, "supports_prefix", True):
            raise ValueError("this policy cannot inpaint a prefix: chunk_transition rtc is not "
                             "available with it (use blend or ensemble)")
        self.runtime = runtime
        self.embodiment = embodiment
        self.actions = actions or embodiment.actions
        self.scheduler = ActionChunkScheduler(embodiment.dt, config.blend_steps)
        self.safety = SafetyFilter(embodiment.lower, embodiment.upper, embodiment.max_step,
                                   embodiment.dt)
        self.chunk_transition = config.chunk_transition
        self.rtc_schedule = config.rtc_schedule
        self.latency_percentile = float(latency_percentile)
        self.latencies: deque[float] = deque(maxlen=max(1, int(latency_window)))
        self.tolerance = embodiment.tracking_tolerance
        self.closing = embodiment.grasp_closing
        self.divergences = 0
        self.last_divergence = ""
        self.notify = notify
        self.track_plan = True
        self.ensembler = (AdaptiveEnsembler(config.ensemble_horizon, config.ensemble_alpha)
                          if config.chunk_transition == "ensemble" else None)
        self._ensembled_instruction: str | None = None

    def expected_latency(self) -> float:
        """Seconds from observation to plan ready: the running high percentile (0 at first)."""
        if not self.latencies:
            return 0.0
        return float(np.percentile(np.asarray(self.latencies), self.latency_percentile))

    def prepare(self, observation: Observation, observation_time: float
                ) -> ChunkPrefix | None:
        """Before inference: forget a plan the robot has left; the rtc prefix, if any.

        The prefix is the executing plan at the new chunk's action times, as actions of the
        chunk's space (`actions.encode`, chained from the observed state as `decode` chains
        them); the first `ceil(expected_latency / dt)` are frozen. None in blend mode, without
        a plan, or when the plan does not reach the chunk's first action time.
        """
        state = np.clip(np.asarray(observation.state, dtype=np.float64), self.embodiment.lower,
                        self.embodiment.upper)  # as `decode` sees it
        self.check_tracking(state, observation_time)
        plan = self.scheduler.plan
        if self.chunk_transition != "rtc" or plan is None:
            return None
        dt = self.embodiment.dt
        horizon = getattr(self.runtime, "horizon", None) or len(plan.times)
        positions = []
        for k in range(1, int(horizon) + 1):
            position = plan.position_at(observation_time + k * dt)
            if position is None:
                break
            positions.append(position)
        if not positions:
            return None
        positions = np.asarray(positions)
        previous = np.vstack([state[None], positions[:-1]])
        actions = self.actions.encode(previous, positions)
        if not np.isfinite(actions).all():
            return None
        frozen = math.ceil(self.expected_latency() / dt - 1e-9)
        return ChunkPrefix(actions, min(frozen, len(actions)), self.rtc_schedule)

    def check_tracking(self, position: np.ndarray, t: float) -> bool:
        """Forget the plan if `position` is off it at time `t`; True when it was forgotten."""
        commanded = self.scheduler.commanded_position(t)
        if commanded is None or not self.track_plan:
            return False
        error = np.asarray(position, dtype=np.float64) - commanded
        # A grasp joint short of its command in the closing direction is on an object.
        blocked = self.closing * error < 0
        over = (np.abs(error) > self.tolerance) & ~blocked
        if not over.any():
            return False
        names = self.embodiment.joint_names
        worst = int(np.argmax(np.where(over, np.abs(error) / self.tolerance, 0.0)))
        self.scheduler.reset()
        self.divergences += 1
        self.last_divergence = (f"{names[worst]} is {error[worst]:+.3f} from the commanded plan "
                                f"(tolerance {self.tolerance[worst]:.3f})"
                                + (f" and {int(over.sum()) - 1} more joint(s)"
                                   if over.sum() > 1 else ""))
        if self.notify is not None:
            self.notify("plan_left", f"the robot left the commanded plan: "
                                     f"{self.last_divergence}; planning afresh from the "
                                     "measured state")
        return True

    def infer(self, observation: Observation, prefix: ChunkPrefix | None = None
              ) -> ActionChunk:
        """Run the model on a snapshot whose state lies within the joint limits."""
        self.safety.check_state(observation.state, self.embodiment.joint_names)
        if prefix is None:
            chunk = self.runtime.infer(observation)
        else:
            chunk = dataclasses.replace(self.runtime.infer(observation, prefix=prefix),
                                        frozen=prefix.frozen)
        if not np.isfinite(chunk.actions).all():
            raise ChunkRejected("non_finite_actions", "the model returned non-finite actions")
        if self.ensembler is not None:
            if observation.instruction != self._ensembled_instruction:
                self.ensembler.reset()
                self._ensembled_instruction = observation.instruction
            chunk = dataclasses.replace(chunk, actions=self.ensembler.add(chunk.actions)[None])
        return chunk

    def decode(self, chunk: ActionChunk, observation: Observation) -> np.ndarray:
        """The chunk's joint targets (inverse kinematics for end-effector actions)."""
        return self.actions.decode(chunk.actions, observation.state)

    def schedule(self, chunk: ActionChunk, targets: np.ndarray, observation: Observation,
                 observation_time: float, clock: Callable[[], float],
                 measured: Callable[[], np.ndarray] | None = None) -> CycleResult:
        """Merge decoded targets into the executing plan, check them, make the trajectory.

        Args:
            chunk: the model's chunk (`frozen` set when it was inferred with an rtc prefix).
            targets: its joint targets (`decode`).
            observation: the snapshot it was inferred from.
            observation_time: when the snapshot's joint state was taken (clock seconds).
            clock: returns the current time on the same clock.
            measured: returns the newest measured joint position (the trajectory starts from
                it); None uses the observation's state.

        Raises:
            ChunkRejected: when the chunk must not be executed (failed inverse kinematics
                upstream, all actions already past, unsafe targets, a plan the robot left);
                the caller holds still.
            StateOutOfRange: the measured state is outside the joint limits.

        A chunk inferred with an rtc prefix replaces the plan without a cross-fade (it already
        agrees with it). When the robot left the plan while the model ran, a blended chunk is
        planned from the measured state alone and an rtc chunk is refused (`plan_left`).
        """
        names = self.embodiment.joint_names
        now = clock()
        self.latencies.append(max(0.0, now - observation_time))
        position = observation.state if measured is None else measured()
        start = self.safety.check_state(position, names)
        guided = chunk.frozen is not None
        if self.check_tracking(start, now) and guided:
            raise ChunkRejected("plan_left", f"the robot left the plan this chunk continues "
                                             f"({self.last_divergence}); sampling afresh")
        plan = self.scheduler.merge(targets, observation_time, now, blend=not guided)
        if plan is None:
            raise ChunkRejected("chunk_too_late", f"all {len(targets)} actions of the chunk were "
                                                  "in the past when it was ready")
        try:
            plan = self.safety.apply(plan, now, start)
        except ValueError as error:
            raise ChunkRejected("unsafe_targets", str(error)) from error
        self.scheduler.commit(plan)
        trajectory = self.scheduler.trajectory(names, now, start)
        return CycleResult(trajectory=trajectory, chunk=chunk,
                           dropped_actions=len(targets) - len(plan.times),
                           frozen_actions=chunk.frozen or 0, targets=np.asarray(targets))

    def hold(self, position: np.ndarray, now: float) -> Trajectory:
        """Forget the plan and keep the robot at `position` (clipped into the joint limits).

        Raises:
            StateOutOfRange: `position` is outside the limits by more than one step; nothing
                safe can be commanded from it.
            ValueError: `position` is not finite.
        """
        self.scheduler.reset()
        if self.ensembler is not None:
            self.ensembler.reset()
        position = np.asarray(position, dtype=np.float64)
        if not np.isfinite(position).all():
            raise ValueError("cannot hold at a non-finite position")
        position = self.safety.check_state(position, self.embodiment.joint_names)
        return hold_trajectory(self.embodiment.joint_names, now, position, self.embodiment.dt)
