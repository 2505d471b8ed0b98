"""The GR1's scripted expert: one-handed top-down pick and place, by inverse kinematics.

`PickPlaceExpert` plans joint targets for the `GR1RobosuiteBackend`'s pick-and-place tasks with
`ArmIK` (damped least squares on a copy of the simulator's data).
"""

from __future__ import annotations

import mujoco
import numpy as np

from .base import ScriptedExpert
from .gr1_robosuite import HAND_DOFS, PALM_DOWN, SIDES, GR1RobosuiteBackend


class ArmIK:
    """Damped least-squares inverse kinematics of one arm (and the waist), on a copy of the data.

    The controlled point is `point`, fixed in the hand's grip-site frame; the orientation is the
    grip site's. Each solve starts from given joint values, so solving every control step from
    the last command gives small, smooth joint changes.
    """

    def __init__(self, backend: GR1RobosuiteBackend, side: str, point=(0.0, 0.0, 0.0),
                 waist: bool = True):
        """Chain of arm `side` ("l" or "r"), with the waist joints when `waist`.

        `point`: the controlled point in the grip-site frame (m).
        """
        model = backend.model
        self.model = model
        self.data = mujoco.MjData(model)
        self.point = np.asarray(point, dtype=float)
        emb = backend.embodiment
        names = [n for n in emb.joint_names
                 if n.startswith(f"{side}_") and not n.startswith(f"{side}_hand_")]
        if waist:
            names += [n for n in emb.joint_names if n.startswith("torso_")]
        self.index = np.asarray([emb.joint_names.index(n) for n in names])
        self.qpos = backend._qpos[self.index]
        self.dof = backend._qvel[self.index]
        self.lower, self.upper = emb.lower[self.index], emb.upper[self.index]
        # The waist moves the whole upper body: make it expensive, so the arm does most.
        self.cost = np.where([n.startswith("torso_") for n in names], 8.0, 1.0)
        site = f"gripper0_{SIDES[side]}_grip_site"
        self.site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, site)
        self.body = model.site_bodyid[self.site]
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))

    def frame(self, qpos: np.ndarray, q: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """(controlled point, grip-site rotation) for the full `qpos` with the chain set to `q`."""
        self.data.qpos[:] = qpos
        if q is not None:
            self.data.qpos[self.qpos] = q
        mujoco.mj_kinematics(self.model, self.data)
        rot = self.data.site_xmat[self.site].reshape(3, 3).copy()
        return self.data.site_xpos[self.site] + rot @ self.point, rot

    def solve(self, qpos: np.ndarray, q: np.ndarray, position: np.ndarray,
              rotation: np.ndarray, q_rest: np.ndarray, iterations: int = 10,
              yaw_free: bool = True) -> tuple[np.ndarray, float]:
        """Chain joint values that put the point at `position` with the hand at `rotation`.

        Args:
            qpos: the full qpos (objects, other arm) the chain lives in.
            q: chain joint values to start from (order of `index`).
            position: the target of the controlled point (world frame).
            rotation: the target grip-site orientation (world frame).
            q_rest: a comfortable posture the solution is weakly pulled towards.
            iterations: Levenberg-Marquardt steps.
            yaw_free: match only the palm normal (the grip site's z axis), not the hand's yaw
                about it; a round object does not care, and the arm reaches further.

        Returns:
            (joint values, remaining position error in metres).
        """
        q = np.clip(np.asarray(q, dtype=float).copy(), self.lower, self.upper)
        # Metres of position error that one radian of orientation error is worth.
        rot_weight = 0.3
        regularization = 1e-3 * np.diag(self.cost)
        for _ in range(iterations):
            point, rot = self.frame(qpos, q)
            mujoco.mj_comPos(self.model, self.data)
            mujoco.mj_jac(self.model, self.data, self._jacp, self._jacr, point, self.body)
            # Rotation vector (small-angle) that turns the hand towards the target.
            if yaw_free:
                err_rot = np.cross(rot[:, 2], rotation[:, 2])
            else:
                err_rot = 0.5 * sum(np.cross(rot[:, i], rotation[:, i]) for i in range(3))
            jac = np.vstack([self._jacp[:, self.dof], rot_weight * self._jacr[:, self.dof]])
            err = np.concatenate([position - point, rot_weight * err_rot])
            # Levenberg-Marquardt with a weak pull towards the rest posture.
            lhs = jac.T @ jac + regularization + 1e-3 * np.eye(len(q))
            step = np.linalg.solve(lhs, jac.T @ err + 1e-3 * (q_rest - q))
            step *= min(1.0, 0.3 / max(np.abs(step).max(), 1e-9))  # stay in the linear regime
            q = np.clip(q + step, self.lower, self.upper)
        point, _ = self.frame(qpos, q)
        return q, float(np.linalg.norm(position - point))



class PickPlaceExpert(ScriptedExpert):
    """Grasp the object from above with one hand, carry it over its compartment, let go.

    The motion is a script (a generator yielding one joint target vector per control step) of
    straight, smooth moves of the grasp point (where the object's top centre sits under the
    palm): above the object with the thumb turned down, down onto the object, fingers and thumb
    closed, up over the bin walls, over the compartment, open, up and away. The fingers really
    hold the object (nothing is welded); if it did not come up or was dropped on the way, the
    hand opens and tries again from where the object lies then.

    Hand vectors follow the embodiment's hand order: pinky, ring, middle, index, thumb pitch,
    thumb yaw.
    """

    # Grasp point in the grip-site frame of the left hand (mirrored in x for the right): the
    # palm faces +z (its surface at z = 0.024), fingers point along -y, the thumb sits on +x.
    GRASP_POINT = (0.0, -0.07, 0.028)
    HAND_OPEN = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    HAND_PRESHAPE = (0.0, 0.0, 0.0, 0.0, 0.0, 1.3)    # thumb turned down beside the object
    HAND_CLOSED = (1.57, 1.57, 1.57, 1.57, 1.22, 1.3)  # past contact: that is the squeeze
    SPEED = 0.3           # m/s of the grasp point along a move
    SLOW = 0.15           # m/s near the object
    CLEARANCE = 0.05      # object bottom above the goal bin's walls while carrying (m)
    ATTEMPTS = 3

    def __init__(self, backend: GR1RobosuiteBackend):
        """Plan for the backend's current episode."""
        self.backend = backend
        emb = backend.embodiment
        self.emb = emb
        self.step_limit = 0.95 * emb.max_step  # stay inside the policy's safety limits
        q, _ = backend.joint_state()
        self.command = q.copy()
        self.rest = q.copy()
        self.side = self._choose_arm()
        point = np.array(self.GRASP_POINT) * ([1, 1, 1] if self.side == "l" else [-1, 1, 1])
        self.ik = ArmIK(backend, self.side, point)
        self.hand = np.asarray([emb.joint_names.index(f"{self.side}_hand_{dof}")
                                for dof, _ in HAND_DOFS])
        # The other hand keeps its place in the world while the waist turns and leans, so that
        # it stays clear of the bins.
        self.idle = ArmIK(backend, "l" if self.side == "r" else "r", waist=False)
        self.idle_pose = self.idle.frame(backend.data.qpos.copy())
        self._script = self._pick_and_place()

    def act(self) -> np.ndarray:
        """Next joint targets; the last one is held once the script is done."""
        try:
            self.command = next(self._script)
        except StopIteration:
            pass
        return self.command.copy()

    # ---- planning --------------------------------------------------------------------------

    def _choose_arm(self) -> str:
        """The arm whose shoulder is nearer the object, unless only the other reaches both ends."""
        backend = self.backend
        qpos = backend.data.qpos.copy()
        _, top = backend.object_extent()
        obj = np.append(backend.object_position()[:2], top)
        release = np.append(backend.target_position()[:2], self._carry_height())

        def distance(side: str) -> float:
            site = mujoco.mj_name2id(backend.model, mujoco.mjtObj.mjOBJ_SITE,
                                     f"robot0_{side}_shoulder_site")
            return float(np.linalg.norm(backend.data.site_xpos[site][:2] - obj[:2]))

        def reaches(side: str) -> bool:
            point = np.array(self.GRASP_POINT) * ([1, 1, 1] if side == "l" else [-1, 1, 1])
            ik = ArmIK(backend, side, point)
            rest = self.rest[ik.index]
            return all(ik.solve(qpos, rest, p, PALM_DOWN, rest, iterations=150)[1] < 0.01
                       for p in (obj, release))

        order = sorted(SIDES, key=distance)
        return next((side for side in order if reaches(side)), order[0])

    def _carry_height(self) -> float:
        """Grasp point height at which the held object clears the goal bin's walls."""
        bottom, top = self.backend.object_extent()
        return self.backend.bin_wall_top() + self.CLEARANCE + (top - bottom)

    # ---- the script ------------------------------------------------------------------------

    def _pick_and_place(self):
        for _ in range(self.ATTEMPTS):
            if (yield from self._pick()) and (yield from self._carry()):
                yield from self._release()
                return
            # Missed or dropped it: open up and start over from wherever it lies now.
            yield from self._move(self._point() + [0.0, 0.0, 0.05], self.HAND_OPEN, settle=0.3)

    def _pick(self):
        """Grasp the object from above and lift it; returns whether it came up."""
        backend = self.backend
        carry = self._carry_height()
        top = np.append(backend.object_position()[:2], backend.object_extent()[1])
        yield from self._move(np.append(top[:2], max(top[2] + 0.12, carry)), self.HAND_PRESHAPE)
        # Aim again right before going down (the hand may have nudged the object).
        top = np.append(backend.object_position()[:2], backend.object_extent()[1])
        yield from self._move(top, self.HAND_PRESHAPE, speed=self.SLOW)
        yield from self._move(top, self.HAND_CLOSED, settle=1.0)
        yield from self._move(np.append(top[:2], carry), self.HAND_CLOSED, speed=self.SLOW)
        return self._holding()

    def _carry(self):
        """Bring the held object over its compartment; returns whether it is still held."""
        backend = self.backend
        target = backend.target_position()
        carry = self._carry_height()
        yield from self._move(np.append(target[:2], carry), self.HAND_CLOSED)
        if not self._holding():
            return False
        # Put the object, not the hand, over the compartment centre.
        offset = self._point()[:2] - backend.object_position()[:2]
        yield from self._move(np.append(target[:2] + offset, carry), self.HAND_CLOSED,
                              speed=self.SLOW)
        return self._holding()

    def _release(self):
        """Open the hand over the compartment and move up, away from the object."""
        yield from self._move(self._point(), self.HAND_OPEN, settle=0.8)
        yield from self._move(self._point() + [0.0, 0.0, 0.12], self.HAND_OPEN, speed=self.SLOW)

    def _holding(self) -> bool:
        """Whether the object hangs in the hand (near the grasp point, above the bin floors)."""
        point = self.ik.frame(self.backend.data.qpos.copy())[0]
        bottom, top = self.backend.object_extent()
        near = np.linalg.norm(self.backend.object_position()[:2] - point[:2]) < 0.06
        return bool(near and top > point[2] - 0.06 and bottom > self.backend.bin_wall_top() - 0.02)

    def _point(self) -> np.ndarray:
        """Where the commanded joints put the grasp point."""
        return self.ik.frame(self.backend.data.qpos.copy(), self.command[self.ik.index])[0]

    def _move(self, position, hand, speed: float | None = None, settle: float = 0.0):
        """Yield joint targets that move the grasp point to `position` in a straight line.

        Args:
            position: goal of the grasp point (world, m).
            hand: hand joint targets, approached at the hand's step limit.
            speed: m/s along the line (default `SPEED`).
            settle: extra seconds to keep commanding the goal (e.g. for the fingers to close).
        """
        dt = self.emb.dt
        position = np.asarray(position, dtype=float)
        start = self._point()
        # Mean speed `speed`, so the peak of the cosine profile is pi/2 of it.
        distance = np.linalg.norm(position - start)
        steps = max(1, int(np.ceil(distance / (speed or self.SPEED) / dt)))
        qpos = self.backend.data.qpos.copy()
        rest = self.rest[self.ik.index]
        for k in range(steps + int(round(settle / dt))):
            # Smooth start and stop (cosine profile), so a held object is not shaken loose.
            alpha = 0.5 - 0.5 * np.cos(np.pi * min(1.0, (k + 1) / steps))
            point = start + alpha * (position - start)
            goal = self.command.copy()
            goal[self.ik.index], _ = self.ik.solve(qpos, self.command[self.ik.index], point,
                                                   PALM_DOWN, rest)
            qpos[self.ik.qpos] = goal[self.ik.index]  # the idle arm hangs on the new waist
            goal[self.idle.index], _ = self.idle.solve(
                qpos, self.command[self.idle.index], *self.idle_pose,
                self.rest[self.idle.index], iterations=5, yaw_free=False)
            goal[self.hand] = hand
            yield self.command + np.clip(goal - self.command, -self.step_limit, self.step_limit)
