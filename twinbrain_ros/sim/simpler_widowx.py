"""SimplerEnv's WidowX (Bridge) tasks through ManiSkill 3, driven by joint trajectories.

SimplerEnv evaluates Bridge policies on digital twins of four BridgeData v2 scenes. ManiSkill 3
(`mani-skill==3.0.1`, SAPIEN 3.0.3) ships them; this backend runs them on the CPU
(`sim_backend="physx_cpu"`, `render_backend="sapien_cpu"`) behind the same interface as the
other backends:

    task (SimplerEnv name)            ManiSkill environment                          steps
    widowx_spoon_on_towel             PutSpoonOnTableClothInScene-v1                  60
    widowx_carrot_on_plate            PutCarrotOnPlateInScene-v1                      60
    widowx_stack_cube                 StackGreenCubeOnYellowCubeBakedTexInScene-v1    60
    widowx_put_eggplant_in_basket     PutEggplantInBasketScene-v1                     120

What is SimplerEnv's and what is changed:
    - scene, objects, their fixed layouts, the real background photo composited behind the
      simulated objects ("green screen"), the WX250s with its tuned joint drives, the camera
      (the Bridge dataset's third-person Logitech C920, 640x480) and the task's success metric
      are ManiSkill's, untouched. Episodes last the task's steps at 5 Hz (12 s, 24 s).
    - the robot is driven as the real WidowX is: by absolute joint position targets (the policy
      node's IK output, through the bridge's trajectory follower), with the same PD gains the
      SimplerEnv controller uses, instead of SimplerEnv's end-effector delta controller. The
      gripper keeps SimplerEnv's mapping: the fingers' commanded opening from 0.015 m (closed)
      to 0.037 m (open) goes to drive targets 0.014-0.038 m, the extra millimetre giving the
      grip its force.
    - the camera frame is resized to the model's image size (`image_width` x `image_height`).

Seeds and layouts: seed `s < layouts` is SimplerEnv's episode `s` (its fixed layout: object
positions on a grid and orientations from a list). SimplerEnv's Bridge protocol runs episodes
0-23 of each task (`PROTOCOL_EPISODES`): `evaluate --backend simpler_widowx --episodes 24
--seed 0`. Seeds from `layouts` up are that layout `s % layouts` with the objects moved by a
seeded offset (up to `jitter_m` in x and y, the source object turned by up to `jitter_yaw`
about z): fresh scenes for demonstrations, none of them a protocol layout.

Success is the task's own `evaluate()`, called once per 5 Hz control period as in SimplerEnv
(its "consecutive grasp" counts control periods). `outcome()` adds its partial metrics: the
source object grasped at some point, grasped for 5 periods in a row, on the target at the end,
and how high the source object was lifted.

The assets come from ManiSkill's asset folder (`$MS_ASSET_DIR/data`, default `~/.maniskill`),
filled by ManiSkill's downloader or copied from an offline tree; nothing is downloaded here.
Rendering is on the CPU (`sapien_cpu`), so it needs Mesa's software Vulkan driver (lavapipe)
25 or newer, on any machine (`make sim-vulkan`). Both are checked at construction, with an
error that says what to do.

Options (keyword arguments of the constructor): `image_width`, `image_height` (model image
size, default 224), `render_scale` (the camera renders at this fraction of 640x480 with its
intrinsics scaled to match, default 1.0: SimplerEnv's own size), `jitter_m` (0.02) and
`jitter_yaw` (0.26 rad).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..robot.embodiment import Embodiment
from ..robot.kinematics import WIDOWX_ARM_JOINTS, WIDOWX_FINGER
from .base import Episode, ScriptedExpert, SimBackend, SimError
from .experts import TopDownGeometry, TopDownMotion, TopDownPickPlace


@dataclass(frozen=True)
class BridgeTask:
    """One SimplerEnv Bridge task and what its expert needs to know."""

    env_id: str
    max_steps: int
    shape: str           # "long" (grasp across the long axis) or "cube" (across a face)
    place_clearance: float  # m: source object's bottom above the target's top when released


TASKS: dict[str, BridgeTask] = {
    "widowx_spoon_on_towel": BridgeTask("PutSpoonOnTableClothInScene-v1", 60, "long", 0.02),
    "widowx_carrot_on_plate": BridgeTask("PutCarrotOnPlateInScene-v1", 60, "long", 0.02),
    "widowx_stack_cube": BridgeTask("StackGreenCubeOnYellowCubeBakedTexInScene-v1", 60, "cube",
                                    0.006),
    "widowx_put_eggplant_in_basket": BridgeTask("PutEggplantInBasketScene-v1", 120, "long",
                                                0.03),
}
# SimplerEnv's Bridge protocol: episodes 0-23 of every task.
PROTOCOL_EPISODES = 24
CAMERA = "3rd_view_camera"
CAMERA_SIZE = (640, 480)
CONTROL_PERIOD_S = 0.2    # SimplerEnv's Bridge control rate, 5 Hz
PHYSICS_HZ = 500          # ManiSkill's Bridge simulation rate
GRIPPER_DRIVE = (0.014, 0.038)   # SimplerEnv's finger drive range (joint limits +- 1 mm)
# SimplerEnv's measured Bridge start poses (the 6 arm joints, then both fingers open).
START_QPOS = {"flat_table": [-0.01840777, 0.0398835, 0.22242722, -0.00460194, 1.36524296,
                             0.00153398, 0.037, 0.037],
              "sink": [-0.2600599, -0.12875618, 0.04461369, -0.00652761, 1.7033415,
                       -0.26983038, 0.037, 0.037]}

# Words in SAPIEN's errors when it finds no Vulkan device it can render with.
VULKAN_ERRORS = ("vk::", "vulkan", "rendering device", "physical device", "failed to find a "
                 "supported")
VULKAN_HELP = ("SAPIEN renders with Vulkan, and no usable Vulkan device was found. The backend "
               "renders on the CPU, through Mesa's software driver (lavapipe) 25 or newer: "
               "`make sim-vulkan` installs it (root; Debian 12: libvulkan1 and "
               "mesa-vulkan-drivers from bookworm-backports). Debian 12's stock Mesa 22.3 does "
               "not work")


def asset_dir():
    """ManiSkill's asset folder (`MS_ASSET_DIR`, read when ManiSkill is imported)."""
    try:
        from mani_skill import ASSET_DIR
    except ImportError as exc:
        raise ImportError(f"simulation backend 'simpler_widowx' needs ManiSkill 3 ({exc}): "
                          "`make venv` installs it (mani-skill==3.0.1 and sapien==3.0.3 from "
                          "requirements-nodeps.txt, their imports from requirements.txt)"
                          ) from exc
    return ASSET_DIR


def check_assets() -> None:
    """Raise SimError, saying where they are expected and how to get them, if assets lack."""
    root = asset_dir()
    bridge = root / "tasks/bridge_v2_real2sim_dataset"
    needed = [root / "robots/widowx/wx250s.urdf",
              bridge / "custom/info_bridge_custom_v0.json",
              bridge / "custom/info_bridge_custom_baked_tex_v0.json",
              bridge / "real_inpainting/bridge_real_eval_1.png",
              bridge / "real_inpainting/bridge_sink.png",
              bridge / "stages/bridge_table_1_v1.glb",
              bridge / "stages/bridge_table_1_v2.glb"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SimError(
            f"ManiSkill's Bridge assets are not in its asset folder {root} (missing: "
            f"{', '.join(missing)}). Point MS_ASSET_DIR at a folder holding them, or fetch them "
            "with ManiSkill's downloader on a machine with internet access: `python -m "
            "mani_skill.utils.download_asset bridge_v2_real2sim` and `... widowx250s`")


@functools.cache
def _env_class(env_id: str):
    """The ManiSkill task class with a joint-position-driven WX250s and layout offsets."""
    import torch
    from mani_skill.agents.controllers.pd_joint_pos import (
        PDJointPosControllerConfig,
        PDJointPosMimicControllerConfig,
    )
    from mani_skill.envs.tasks.digital_twins.bridge_dataset_eval import base_env
    from mani_skill.utils.registration import REGISTERED_ENVS

    def joint_controllers(agent) -> dict:
        arm = PDJointPosControllerConfig(
            joint_names=agent.arm_joint_names, lower=None, upper=None,
            stiffness=agent.arm_stiffness, damping=agent.arm_damping,
            force_limit=agent.arm_force_limit, friction=agent.arm_friction,
            normalize_action=False)
        gripper = PDJointPosMimicControllerConfig(
            joint_names=agent.gripper_joint_names, lower=GRIPPER_DRIVE[0],
            upper=GRIPPER_DRIVE[1], stiffness=agent.gripper_stiffness,
            damping=agent.gripper_damping, force_limit=agent.gripper_force_limit,
            normalize_action=True, drive_mode="force")
        return {"arm_pd_joint_pos_gripper_pd_joint_pos": {"arm": arm, "gripper": gripper}}

    class FlatTable(base_env.WidowX250SBridgeDatasetFlatTable):
        @property
        def _controller_configs(self):
            return joint_controllers(self)

    class Sink(base_env.WidowX250SBridgeDatasetSink):
        @property
        def _controller_configs(self):
            return joint_controllers(self)

    task_cls = REGISTERED_ENVS[env_id].cls

    class JointDriven(task_cls):
        layout_offset: tuple[np.ndarray, float] | None = None  # (xy per object, source yaw)

        def __init__(self, *args, **kwargs):
            # ManiSkill keeps the background photos and the objects kept out of the green
            # screen in class attributes, shared by every environment of the process: a second
            # one (another task, a rebuilt bridge) would change the first one's images.
            self._rgb_overlay_images = {}
            self._objects_to_remove_from_greenscreen = []
            super().__init__(*args, **kwargs)

        def _load_agent(self, options, *args, **kwargs):
            self.robot_uids = Sink if self.scene_setting == "sink" else FlatTable
            return super()._load_agent(options, *args, **kwargs)

        def _park_robot(self):
            """Put the robot in its start pose, held, before the objects settle.

            ManiSkill moves the robot there only after settling: an arm left low by the last
            episode would push them.
            """
            home = torch.tensor([START_QPOS[self.scene_setting]], dtype=torch.float32)
            self.agent.reset(init_qpos=home)
            self.agent.controller.reset()
            self.agent.set_action(torch.cat([home[:, :6], torch.ones(1, 1)], dim=1))

        def _initialize_episode(self, env_idx, options):
            self._park_robot()
            if self.layout_offset is None:
                return super()._initialize_episode(env_idx, options)
            xyz, quat = self.xyz_configs, self.quat_configs
            shift, yaw = self.layout_offset
            try:
                self.xyz_configs = xyz.clone()
                self.xyz_configs[:, :, :2] += torch.as_tensor(shift, dtype=xyz.dtype)
                self.quat_configs = quat.clone()
                turn = torch.tensor([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)],
                                    dtype=quat.dtype)
                self.quat_configs[:, 0] = _quat_multiply(turn, quat[:, 0])
                return super()._initialize_episode(env_idx, options)
            finally:
                self.xyz_configs, self.quat_configs = xyz, quat

    JointDriven.__name__ = f"JointDriven{task_cls.__name__}"
    return JointDriven


def _quat_multiply(a, b):
    """Hamilton product of quaternions (w, x, y, z): `a` (4,) times each row of `b` (N, 4)."""
    import torch

    aw, ax, ay, az = a
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], dim=-1)


def _pose_matrix(pose) -> np.ndarray:
    """4x4 matrix of a ManiSkill Pose (first of the batch)."""
    return pose.to_transformation_matrix()[0].cpu().numpy().astype(np.float64)


class SimplerWidowXBackend(SimBackend):
    """SimplerEnv's Bridge tasks on ManiSkill 3 (see the module docstring).

    Attributes:
        env: the ManiSkill environment (privileged access for experts and tests).
        layouts: how many fixed layouts the task has.
        episode: the current episode (after `reset`).
    """

    name = "simpler_widowx"
    judge_at_end = True
    tasks = tuple(TASKS)
    camera_names = ("front",)
    sim_dt = 0.04      # 20 physics steps at 500 Hz; 5 per control period

    def __init__(self, embodiment: Embodiment, task: str = "widowx_carrot_on_plate",
                 image_width: int = 224, image_height: int = 224, render_scale: float = 1.0,
                 jitter_m: float = 0.02, jitter_yaw: float = 0.26):
        """Build the task's ManiSkill environment.

        Raises:
            SimError: unknown task, bad option, joints the WX250s lacks, missing assets, or no
                Vulkan device to render with.
        """
        if task not in TASKS:
            raise SimError(f"unknown task {task!r}; tasks: {list(TASKS)}")
        if image_width <= 0 or image_height <= 0:
            raise SimError(f"image size must be positive, got {image_width}x{image_height}")
        if not 0.05 <= render_scale <= 2.0:
            raise SimError(f"render_scale must be within [0.05, 2], got {render_scale}")
        missing = [n for n in embodiment.joint_names
                   if n not in (*WIDOWX_ARM_JOINTS, WIDOWX_FINGER)]
        if missing or embodiment.gripper_joint != WIDOWX_FINGER:
            raise SimError(f"the WX250s has no joints {missing}, or the gripper joint "
                           f"{embodiment.gripper_joint!r} is not 'left_finger'")
        self.embodiment = embodiment
        self.task = task
        self.spec = TASKS[task]
        self.image_width, self.image_height = int(image_width), int(image_height)
        self.jitter_m, self.jitter_yaw = float(jitter_m), float(jitter_yaw)
        check_assets()
        import torch

        self._torch = torch
        width, height = (round(s * render_scale) for s in CAMERA_SIZE)
        intrinsic = np.array([[623.588, 0, 319.501], [0, 623.588, 239.545], [0, 0, 1]])
        intrinsic[:2] *= render_scale
        try:
            self.env = _env_class(self.spec.env_id)(
                obs_mode="rgb+segmentation", num_envs=1, sim_backend="physx_cpu",
                render_backend="sapien_cpu",
                control_mode="arm_pd_joint_pos_gripper_pd_joint_pos",
                sensor_configs={CAMERA: {"width": width, "height": height,
                                         "intrinsic": intrinsic}})
        except (RuntimeError, OSError) as exc:
            text = str(exc).lower()
            if any(word in text for word in VULKAN_ERRORS):
                raise SimError(f"{VULKAN_HELP} ({exc})") from exc
            raise
        env = self.env
        robot = env.agent.robot
        names = [j.name for j in robot.get_active_joints()]
        self._joint_index = np.array([names.index(n) for n in embodiment.joint_names])
        self._gripper_index = embodiment.joint_names.index(WIDOWX_FINGER)
        self._arm_index = np.array([embodiment.joint_names.index(n)
                                    for n in WIDOWX_ARM_JOINTS])
        self._physics_steps = round(self.sim_dt * PHYSICS_HZ)
        self._steps_per_period = round(CONTROL_PERIOD_S / self.sim_dt)
        self.layouts = len(env.xyz_configs) * len(env.quat_configs)
        self._time = 0.0
        self._substep = 0
        self._info: dict = {}
        self._max_lift = 0.0
        self._rest_z = 0.0
        self.episode: Episode | None = None

    # -- episode -------------------------------------------------------------------------------

    def reset(self, seed: int) -> Episode:
        """SimplerEnv's episode `seed` (or, from `layouts` up, a shifted copy of one), settled."""
        torch = self._torch
        seed = int(seed)
        if seed < 0:
            raise SimError(f"seeds are non-negative, got {seed}")
        layout = seed % self.layouts
        env = self.env
        if seed >= self.layouts:
            rng = np.random.default_rng(seed)
            shift = rng.uniform(-self.jitter_m, self.jitter_m, size=(2, 2))
            if self.spec.env_id.startswith("PutEggplant"):
                shift[1] = 0.0          # the basket is part of the sink
            env.layout_offset = (shift, float(rng.uniform(-self.jitter_yaw, self.jitter_yaw)))
        else:
            env.layout_offset = None
        env.reset(seed=seed, options={"episode_id": torch.tensor([layout])})
        self._time, self._substep = 0.0, 0
        self._info = {k: bool(v[0]) for k, v in env.evaluate().items()
                      if isinstance(v, torch.Tensor)}
        source, target = self.object_pose("source"), self.object_pose("target")
        self._rest_z = float(source[2, 3])
        self._max_lift = 0.0
        instruction = env.get_language_instruction()[0]
        info = {"env_id": self.spec.env_id, "layout": layout,
                "protocol": 0 <= seed < min(PROTOCOL_EPISODES, self.layouts),
                "source": env.source_obj_name, "target": env.target_obj_name,
                "source_position": source[:3, 3].round(4).tolist(),
                "target_position": target[:3, 3].round(4).tolist()}
        self.episode = Episode(task=self.task, seed=seed, instruction=instruction,
                               max_steps=self.spec.max_steps, info=info)
        return self.episode

    # -- simulation ----------------------------------------------------------------------------

    def step(self, targets: np.ndarray) -> None:
        """Set joint position targets (clipped to the embodiment's limits), advance `sim_dt`."""
        torch = self._torch
        emb = self.embodiment
        targets = np.asarray(targets, dtype=np.float64).reshape(-1)
        if targets.shape != (len(emb.joint_names),):
            raise ValueError(f"expected {len(emb.joint_names)} joint targets, got "
                             f"{targets.shape}")
        if not np.all(np.isfinite(targets)):
            raise ValueError("joint targets must be finite")
        targets = np.clip(targets, emb.lower, emb.upper)
        closed, opened = emb.gripper_closed_position, emb.gripper_open_position
        grip = 2.0 * (targets[self._gripper_index] - closed) / (opened - closed) - 1.0
        action = np.concatenate([targets[self._arm_index], [grip]])
        env = self.env
        env.agent.set_action(torch.as_tensor(action[None], dtype=torch.float32))
        for _ in range(self._physics_steps):
            env.agent.before_simulation_step()
            env.scene.step()
        self._time += self.sim_dt
        self._substep += 1
        self._max_lift = max(self._max_lift, float(self.object_pose("source")[2, 3])
                             - self._rest_z)
        if self._substep % self._steps_per_period == 0:
            # SimplerEnv judges once per control period: its grasp streak counts periods.
            self._info = {k: bool(v[0]) for k, v in env.evaluate().items()
                          if isinstance(v, torch.Tensor)}

    def joint_state(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, velocities) of `embodiment.joint_names`."""
        robot = self.env.agent.robot
        q = robot.get_qpos()[0].cpu().numpy().astype(np.float64)
        v = robot.get_qvel()[0].cpu().numpy().astype(np.float64)
        return q[self._joint_index], v[self._joint_index]

    @property
    def time(self) -> float:
        """Simulated seconds since the last reset."""
        return self._time

    def render(self) -> list[np.ndarray]:
        """The third-person camera with SimplerEnv's real background, resized for the model."""
        import cv2

        frame = self.env._get_obs_sensor_data()[CAMERA]["rgb"][0].cpu().numpy()
        frame = np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
        if frame.shape[:2] != (self.image_height, self.image_width):
            frame = cv2.resize(frame, (self.image_width, self.image_height),
                               interpolation=cv2.INTER_AREA)
        return [frame]

    def close(self) -> None:
        """Release the simulator and renderer."""
        env = getattr(self, "env", None)
        if env is not None:
            env.close()
            self.env = None

    # -- privileged state ----------------------------------------------------------------------

    def _base_inverse(self) -> np.ndarray:
        return np.linalg.inv(_pose_matrix(self.env.agent.robot.links_map["base_link"].pose))

    def ee_pose(self) -> np.ndarray:
        """Measured 4x4 pose of `ee_gripper_link` in the robot base frame (as `ArmKinematics`)."""
        link = self.env.agent.robot.links_map["ee_gripper_link"]
        return self._base_inverse() @ _pose_matrix(link.pose)

    def object_pose(self, which: str) -> np.ndarray:
        """4x4 pose of the task's `source` or `target` object in the robot base frame."""
        env = self.env
        name = env.source_obj_name if which == "source" else env.target_obj_name
        return self._base_inverse() @ _pose_matrix(env.objs[name].pose)

    def object_box(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(centre, half extents) of the object's bounding box, in its own frame (m)."""
        env = self.env
        name = env.source_obj_name if which == "source" else env.target_obj_name
        box = env.model_db[name]["bbox"]
        scale = float(env.episode_model_scales[name])
        low, high = np.asarray(box["min"], float) * scale, np.asarray(box["max"], float) * scale
        return (low + high) / 2.0, (high - low) / 2.0

    def is_grasping(self) -> bool:
        """Whether both fingers hold the source object (ManiSkill's grasp test)."""
        env = self.env
        return bool(env.agent.is_grasping(env.objs[env.source_obj_name])[0])

    def lift_height(self) -> float:
        """Height of the source object above where it rested at reset (m)."""
        return float(self.object_pose("source")[2, 3]) - self._rest_z

    def success(self) -> bool:
        """The task's own success at the last control period."""
        return bool(self._info.get("success", False))

    def outcome(self) -> dict:
        """SimplerEnv's partial metrics, and the source object's name if it rose 3 cm.

        Keys: grasped (at some point), consecutive_grasp (for 5 periods running), on_target (at
        the end), max_lift_m, lifted, layout.
        """
        if self.episode is None:
            return {}
        lifted = self.env.source_obj_name if self._max_lift >= 0.03 else ""
        return {"lifted": lifted,
                "grasped": self._info.get("is_src_obj_grasped", False),
                "consecutive_grasp": self._info.get("consecutive_grasp", False),
                "on_target": self._info.get("src_on_target", False),
                "max_lift_m": round(self._max_lift, 4),
                "layout": self.episode.info["layout"]}

    def expert(self) -> ScriptedExpert:
        """A scripted grasp-and-place expert for the current episode."""
        if self.episode is None:
            raise SimError("call reset() before expert()")
        return TopDownPickPlace(BridgeGeometry(self), BRIDGE_MOTION)


class BridgeGeometry(TopDownGeometry):
    """SimplerEnv's Bridge scenes for `TopDownPickPlace`: the source object onto the target.

    The gripper closes across the object: across the long axis of the spoon, carrot and
    eggplant, across a face of the cube, turned the least from the arm's natural wrist angle
    (with `wrist_rotate` at zero a top-down gripper closes across the arm's plane, at
    `atan2(y, x) + pi/2`; a cube's faces repeat every 90 degrees, a long object's axis every
    180).
    """

    MIN_GRASP_HEIGHT = 0.012  # m: end effector above the table top (fingertips clear it)

    def __init__(self, backend: SimplerWidowXBackend):
        """Grasp the backend's source object; note the table's height under it."""
        self.backend = backend
        source = backend.object_pose("source")
        centre, half = backend.object_box("source")
        self._table_z = float((source[:3, :3] @ centre + source[:3, 3])[2]
                              - np.abs(source[:3, :3] @ half)[2])

    def box(self, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """An object's box in the base frame.

        Returns (centre, half extents along the base axes, rotation, half extents along its
        own axes).
        """
        pose = self.backend.object_pose(which)
        centre, half = self.backend.object_box(which)
        rotation = pose[:3, :3]
        return rotation @ centre + pose[:3, 3], np.abs(rotation) @ half, rotation, half

    def ee_pose(self) -> np.ndarray:
        """The measured end-effector pose."""
        return self.backend.ee_pose()

    def grasp(self) -> tuple[np.ndarray, float]:
        """The box's centre (no lower than the table allows) and the yaw across the object."""
        centre, _, rotation, half = self.box("source")
        natural = math.atan2(centre[1], centre[0]) + math.pi / 2
        axes = rotation[:2, :]                 # horizontal part of the object's axes
        if self.backend.spec.shape == "cube":
            yaw, period = math.atan2(rotation[1, 0], rotation[0, 0]), math.pi / 2
        else:
            lengths = half * np.linalg.norm(axes, axis=0)
            axis = axes[:, int(np.argmax(lengths))]
            yaw, period = math.atan2(axis[1], axis[0]) + math.pi / 2, math.pi
        k = round((natural - yaw) / period)
        point = np.array([centre[0], centre[1],
                          max(centre[2], self._table_z + self.MIN_GRASP_HEIGHT)])
        return point, yaw + k * period

    def lift_height(self) -> float:
        """The source object's height above its rest."""
        return self.backend.lift_height()

    def drop(self, pose: np.ndarray) -> np.ndarray:
        """The source over the target, as SimplerEnv judges "on the target".

        SimplerEnv measures it between the objects' origins (x, y) and between their boxes
        (z): the source's origin goes over the target's origin, its box bottom
        `place_clearance` above the target's top; the end effector keeps its hold offset.
        """
        backend = self.backend
        centre, half, _, _ = self.box("source")
        target_centre, target_half, _, _ = self.box("target")
        target_origin = backend.object_pose("target")[:3, 3]
        source_origin = backend.object_pose("source")[:3, 3]
        held = pose[:3, 3] - source_origin
        bottom = centre[2] - half[2] - source_origin[2]     # box bottom below the origin
        return np.array([target_origin[0], target_origin[1],
                         target_centre[2] + target_half[2] - bottom
                         + backend.spec.place_clearance]) + held


# Larger steps than the tabletop's (4 cm, 0.3 rad per period): the expert of SimplerEnv's 60
# periods must finish in time.
BRIDGE_MOTION = TopDownMotion(lift=0.08, grasp_tolerance=0.008, drop_tolerance=0.008,
                              carry_height=None, max_translation=0.04, max_rotation=0.3)
