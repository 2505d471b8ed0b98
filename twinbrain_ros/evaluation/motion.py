"""Motion quality of an episode: what was commanded, what was measured, where chunks took over.

A `MotionLog` samples the commanded joint targets (the trajectory the controller is executing,
as `TrajectoryFollower.sample` interpolates it) and the measured joints once per control
period, and notes each trajectory the policy sent (its time and whether it was a hold).
`metrics` turns that into the numbers `evaluate` reports per episode:

- ``max_acceleration``, ``max_jerk``: the largest commanded joint acceleration and jerk
  (finite differences of the commanded targets at the control rate, units/s^2 and units/s^3);
- ``boundary_velocity_jump``: at each chunk boundary (a planned trajectory replacing another),
  the change of commanded velocity across it, ``|v(after) - v(before)|``, largest over joints;
  reported as the largest and the mean over the episode's boundaries (units/s);
- ``hold_time_s``: how long the robot was held (from a hold until the next plan);
- ``tracking_error``: the largest distance between commanded and measured position.

All of them are taken over the arm: grasp joints (`Embodiment.grasp_closing`) are left out,
since a binary gripper command jumps by design. `plot` draws commanded against measured joints
with the chunk boundaries marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["MotionLog", "plot_motion", "summarize_motion"]


@dataclass
class MotionLog:
    """Per control period: time, commanded and measured joints; the trajectories sent."""

    joint_names: list[str]
    dt: float
    arm: np.ndarray                                   # (n,) bool: joints the metrics cover
    times: list[float] = field(default_factory=list)
    commanded: list[np.ndarray] = field(default_factory=list)
    measured: list[np.ndarray] = field(default_factory=list)
    sent: list[tuple[float, bool]] = field(default_factory=list)  # (time, is a hold)

    @classmethod
    def for_embodiment(cls, embodiment) -> MotionLog:
        """An empty log over the embodiment's joints, its grasp joints left out of the metrics."""
        return cls(list(embodiment.joint_names), embodiment.dt,
                   embodiment.grasp_closing == 0)

    def sample(self, t: float, commanded: np.ndarray, measured: np.ndarray) -> None:
        """Record one control period."""
        self.times.append(float(t))
        self.commanded.append(np.asarray(commanded, dtype=np.float64).copy())
        self.measured.append(np.asarray(measured, dtype=np.float64).copy())

    def trajectory(self, t: float, hold: bool = False) -> None:
        """A trajectory was sent at `t` (a hold or a planned chunk).

        The arm's and the gripper's trajectory of one plan (two controllers, which may arrive
        a simulator step apart) count once.
        """
        if self.sent and abs(self.sent[-1][0] - t) < 0.5 * self.dt \
                and self.sent[-1][1] == bool(hold):
            return
        self.sent.append((float(t), bool(hold)))

    def metrics(self) -> dict:
        """The episode's motion numbers (see the module docstring); zeros when too short."""
        result = {"max_acceleration": 0.0, "max_jerk": 0.0, "boundary_velocity_jump": 0.0,
                  "mean_boundary_velocity_jump": 0.0, "boundaries": 0,
                  "hold_time_s": round(self.hold_time(), 4), "tracking_error": 0.0}
        if len(self.times) < 4:
            return result
        times = np.asarray(self.times)
        commanded = np.asarray(self.commanded)[:, self.arm]
        measured = np.asarray(self.measured)[:, self.arm]
        dt = self.dt
        velocity = np.diff(commanded, axis=0) / dt
        acceleration = np.diff(velocity, axis=0) / dt
        jerk = np.diff(acceleration, axis=0) / dt
        jumps = []
        planned = [t for k, (t, hold) in enumerate(self.sent)
                   if not hold and k > 0 and not self.sent[k - 1][1]]
        for t in planned:
            k = int(np.searchsorted(times, t - 1e-9))  # the first sample at or after it
            if 1 <= k < len(times) - 1:
                before = (commanded[k] - commanded[k - 1]) / dt
                after = (commanded[k + 1] - commanded[k]) / dt
                jumps.append(float(np.max(np.abs(after - before))))
        result.update(
            max_acceleration=round(float(np.max(np.abs(acceleration))), 5),
            max_jerk=round(float(np.max(np.abs(jerk))), 5) if len(jerk) else 0.0,
            boundary_velocity_jump=round(max(jumps), 5) if jumps else 0.0,
            mean_boundary_velocity_jump=round(float(np.mean(jumps)), 5) if jumps else 0.0,
            boundaries=len(jumps),
            tracking_error=round(float(np.max(np.abs(commanded - measured))), 5))
        return result

    def hold_time(self) -> float:
        """Seconds from each hold to the next planned trajectory (or the end)."""
        end = self.times[-1] if self.times else 0.0
        total, held_since = 0.0, None
        for t, hold in self.sent:
            if hold and held_since is None:
                held_since = t
            elif not hold and held_since is not None:
                total += t - held_since
                held_since = None
        if held_since is not None:
            total += max(0.0, end - held_since)
        return total


def summarize_motion(episodes: list[dict]) -> dict:
    """Across episodes: the median and largest of each per-episode motion number."""
    rows = [e["motion"] for e in episodes if e.get("motion")]
    if not rows:
        return {}
    summary = {}
    for key in ("max_acceleration", "max_jerk", "boundary_velocity_jump",
                "mean_boundary_velocity_jump", "hold_time_s", "tracking_error"):
        values = np.asarray([row[key] for row in rows], dtype=np.float64)
        summary[key] = {"median": round(float(np.median(values)), 5),
                        "max": round(float(np.max(values)), 5)}
    summary["hold_time_s"]["total"] = round(float(sum(row["hold_time_s"] for row in rows)), 4)
    return summary


def plot_motion(log: MotionLog, path: Path, title: str = "") -> Path:
    """Commanded (solid) against measured (dashed) joints; chunk boundaries and holds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = np.asarray(log.times)
    commanded, measured = np.asarray(log.commanded), np.asarray(log.measured)
    n = len(log.joint_names)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.3 * n + 0.8), sharex=True, squeeze=False)
    for j, ax in enumerate(axes[:, 0]):
        ax.plot(times, commanded[:, j], lw=1.2, label="commanded")
        ax.plot(times, measured[:, j], lw=1.0, ls="--", label="measured")
        for t, hold in log.sent:
            ax.axvline(t, color="red" if hold else "0.75", lw=0.6 if not hold else 1.0,
                       zorder=0)
        ax.set_ylabel(log.joint_names[j], fontsize=7, rotation=0, ha="right")
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[0, 0].set_title(title or "commanded vs measured joints (grey: chunk starts, red: "
                                  "holds)", fontsize=9)
    axes[-1, 0].set_xlabel("time (s)")
    from .results import save_figure

    return save_figure(fig, path, dpi=110)
