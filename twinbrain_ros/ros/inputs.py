"""The policy node's inputs and what it refused.

The latest camera frames, recent joint states, the instruction and the rule that makes a
consistent snapshot of them (`InputStore`); counts of refusals by cause (`CauseCounter`). No
rclpy here: the node converts messages and passes arrays, receipt times (its clock) and stamps
(the messages' headers).
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

from ..errors import CausedError, refuse_long_text
from ..policy.loop import Snapshot
from ..robot.observation import Observation

JOINT_HISTORY = 100  # joint states kept for stamp matching (2 s at 50 Hz)
MAX_CAUSES = 48      # distinct causes kept apart in /diagnostics; the rest is "other"
LOG_EVERY_S = 5.0    # a cause is logged at most this often (its count is always kept)
SAME_TASK_S = 2.0    # an instruction repeated within this long continues its episode


class InputStore:
    """What the robot last sent, guarded by one lock (callbacks write, the loop reads)."""

    def __init__(self, image_topics: list[str]):
        """Keep one frame per topic of `image_topics` and the recent joint states."""
        self.image_topics = list(image_topics)
        self.lock = threading.Lock()
        self.images: dict[str, tuple] = {}      # topic -> (rgb, receipt time, stamp)
        # Recent joint states (positions, receipt time, stamp), newest last: joint states come
        # much faster than images, so the one stamped nearest the images is used.
        self.joints: collections.deque = collections.deque(maxlen=JOINT_HISTORY)
        self.instruction: str | None = None
        self.episode = 0                 # bumped by a new instruction (a new rerun log)
        self._instruction_time = -1e9    # monotonic receipt time of the last instruction
        self._logged_joints = -1e18      # receipt time of the newest joint state in a snapshot

    def put_image(self, topic: str, rgb: np.ndarray, received: float, stamp: float) -> None:
        """Store a camera frame (any size: the model's processor resizes every frame)."""
        with self.lock:
            self.images[topic] = (rgb, received, stamp)

    def put_joints(self, positions: np.ndarray, received: float, stamp: float) -> None:
        """Store a joint state (model order)."""
        with self.lock:
            self.joints.append((positions, received, stamp))

    def set_instruction(self, text: str) -> str | None:
        """Store a checked instruction; returns the previous one.

        A new text, or the same one given again after a pause, starts a new episode.
        """
        with self.lock:
            previous, self.instruction = self.instruction, text
            now = time.monotonic()
            if text != previous or now - self._instruction_time > SAME_TASK_S:
                self.episode += 1
            self._instruction_time = now
        return previous

    def clear_instruction(self) -> bool:
        """Forget the instruction (a refused one replaced it); whether there was one."""
        with self.lock:
            had_one, self.instruction = self.instruction is not None, None
        return had_one

    def frames(self) -> dict[str, tuple]:
        """A copy of the latest frames: topic -> (rgb, receipt time, stamp)."""
        with self.lock:
            return dict(self.images)

    def measured(self, now: float, max_age: float | None = None) -> np.ndarray | None:
        """The newest measured joint position (None if none, or older than `max_age`)."""
        with self.lock:
            newest = self.joints[-1] if self.joints else None
        if newest is None or (max_age is not None and now - newest[1] > max_age):
            return None
        return newest[0].copy()

    def snapshot(self, now: float, max_age: float, max_skew: float) -> Snapshot | None:
        """The latest consistent snapshot; None while an input has never arrived.

        Raises:
            CausedError: `stale_input` (an input older than `max_age`) or
                `unsynchronised_input` (image and joint stamps further apart than `max_skew`).
        """
        with self.lock:
            images = dict(self.images)
            history, instruction = list(self.joints), self.instruction
            episode = self.episode
        topics = self.image_topics
        if not history or instruction is None or any(t not in images for t in topics):
            return None
        joints = matching_joint_state(history, [images[t][2] for t in topics])
        ages = [now - images[t][1] for t in topics] + [now - joints[1]]
        if max(ages) > max_age:
            raise CausedError("stale_input", f"inputs are {max(ages):.2f} s old "
                                             f"(max_input_age_s {max_age}): no new trajectory")
        stamps = [images[t][2] for t in topics] + [joints[2]]
        if all(s > 0 for s in stamps):
            skew = max(stamps) - min(stamps)
            if skew > max_skew:
                raise CausedError("unsynchronised_input", f"image and joint state stamps "
                                                          f"differ by {skew:.3f} s: no new "
                                                          "trajectory")
        fresh = [(received, positions) for positions, received, _ in history
                 if received > self._logged_joints]
        if fresh:
            self._logged_joints = fresh[-1][0]
        observation = Observation(images=[images[t][0] for t in topics], state=joints[0],
                                  instruction=instruction)
        # The newest receipt time and the joint state's stamp travel with the cycle's record.
        info = {"received": max([images[t][1] for t in topics] + [joints[1]]),
                "joint_stamp": joints[2], "episode": episode}
        return Snapshot(observation, joints[1], episode, fresh, info)


def checked_instruction(text: str, max_tokens: int, check=None) -> str:
    """The instruction stripped, or a `CausedError` saying why it cannot be used.

    A text longer than 8 characters per allowed token is refused before any work on it (a
    byte-level BPE token covers at least one character); `check(text, max_tokens)` (the
    runtime's tokenizer check) refuses the rest that is too long or holds special tokens.
    """
    refuse_long_text(text, max_tokens)
    text = text.strip()
    if not text:
        raise CausedError("empty_instruction", "rejected an empty instruction")
    if check is not None:
        check(text, max_tokens)
    return text


def matching_joint_state(history: list[tuple], image_stamps: list[float]) -> tuple:
    """The joint state stamped nearest the newest image; the newest one without stamps."""
    newest_image = max(image_stamps)
    if newest_image <= 0 or history[-1][2] <= 0:
        return history[-1]
    return min(history, key=lambda joints: abs(joints[2] - newest_image))


class CauseCounter:
    """Counts by cause under a bounded set of keys, and logs each cause at most every 5 s."""

    def __init__(self, log):
        """`log(level, text)` writes a line ("error", "warning" or "info")."""
        self.log = log
        self.counts: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self._last_log: dict[str, tuple[float, int]] = {}  # cause -> (time logged, count then)

    def count(self, cause: str, n: int = 1) -> str:
        """Count `n` under `cause` (past MAX_CAUSES distinct ones: under "other"); the key."""
        with self.lock:
            if cause not in self.counts and len(self.counts) >= MAX_CAUSES:
                cause = "other"
            self.counts[cause] += n
        return cause

    def reject(self, cause: str, message: str, level: str = "warning") -> None:
        """Count `cause` and log `message` at most once every LOG_EVERY_S for it."""
        key = self.count(cause)
        with self.lock:
            total = self.counts[key]
        self.log_limited(key, message, level, total)

    def log_limited(self, cause: str, message: str, level: str, total: int) -> None:
        """Log at most once per cause every LOG_EVERY_S; `total`: how often it happened."""
        now = time.monotonic()
        with self.lock:
            logged_at, logged_count = self._last_log.get(cause, (-1e9, 0))
            due = now - logged_at >= LOG_EVERY_S
            if due:
                self._last_log[cause] = (now, total)
        if due:
            since = total - logged_count - 1
            more = f" ({since} more since the last report)" if logged_count and since > 0 else ""
            self.log(level, f"{message} [{cause}]{more}")

    def snapshot(self) -> list[tuple[str, int]]:
        """The counts, sorted by cause."""
        with self.lock:
            return sorted(self.counts.items())
