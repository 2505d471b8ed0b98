"""Fourier GR1 with Fourier hands in robosuite's tabletop pick-and-place (`PickPlace*`).

The robot is robosuite's `GR1FixedLowerBody` (legs fixed; waist, head, arms and hands driven).
Arms and waist follow absolute joint position targets through robosuite's JOINT_POSITION part
controllers; each hand takes six joint angle targets through its GRIP controller (unscaled, so
a hand action is the angle itself); the head is held still. The embodiment (`config/gr1.yaml`:
left arm, right arm, left hand, right hand, waist) lists exactly these driven joints, and
`step` / `joint_state` use its order.

A task is one of robosuite's single-object PickPlace environments: the object starts somewhere
in the bin on the robot's right and has to go into its compartment of the four-compartment bin
on the robot's left. Success is robosuite's own check (object in the compartment, hand away).
The one camera is robosuite's "agentview" (both hands, both bins), rendered on demand only.

The scripted expert reads the object pose from the simulator, solves the arm and waist inverse
kinematics with MuJoCo Jacobians (damped least squares on a point under the palm), grasps the
object with the fingers and thumb (no welding), carries it over the compartment and lets go.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..robot.embodiment import Embodiment
from .base import Episode, ScriptedExpert, SimBackend, SimError, stiffen_joint_limits


def _quiet_robosuite() -> None:
    """Keep robosuite's import-time advice (macros file, optional models) off the console.

    robosuite logs through the "robosuite_logs" logger and resets its level on import, so a
    filter (which a level reset leaves alone) drops everything below ERROR; errors still show.
    """
    logger = logging.getLogger("robosuite_logs")
    if not any(isinstance(f, _BelowError) for f in logger.filters):
        logger.addFilter(_BelowError())


class _BelowError(logging.Filter):
    """Lets only ERROR and above through."""

    def filter(self, record: logging.LogRecord) -> bool:
        """True for records of level ERROR or above."""
        return record.levelno >= logging.ERROR


_quiet_robosuite()
# MUJOCO_GL (offscreen EGL) is chosen in twinbrain_ros/sim/__init__.py, before this import.
import mujoco  # noqa: E402 - after the log filter
import robosuite  # noqa: E402

# Hand DoF in robosuite's Fourier hand action order, with the MuJoCo joint whose angle stands for
# it in the joint state (the gripper controller copies each finger action to the proximal and
# the intermediate joint, and the thumb pitch action to the thumb's pitch and distal joint).
HAND_DOFS = (("pinky", "pinky_proximal_joint"), ("ring", "ring_proximal_joint"),
             ("middle", "middle_proximal_joint"), ("index", "index_proximal_joint"),
             ("thumb_pitch", "thumb_proximal_pitch_joint"),
             ("thumb_yaw", "thumb_proximal_yaw_joint"))
ROBOT = "GR1FixedLowerBody"
SIDES = {"l": "left", "r": "right"}
# Grip-site orientation of a hand with its palm facing down and its fingers pointing forward
# (the grip site's z axis is the palm normal, its -y axis the finger direction).
PALM_DOWN = np.column_stack([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


@dataclass(frozen=True)
class _TaskSpec:
    """One single-object PickPlace task."""

    env_name: str        # robosuite environment
    object_name: str     # robosuite object (body "<name>_main")
    noun: str            # how the instruction names it


# Only the can for now: the expert's top grasp (thumb against fingers, hand yaw left free) holds a
# round object; milk, bread and cereal boxes would need grasps turned to the box's faces (it
# placed them in 16/24, 4/8 and 2/8 episodes).
TASKS: dict[str, _TaskSpec] = {
    "pick_place_can": _TaskSpec("PickPlaceCan", "Can", "soda can"),
}

EPISODE_SECONDS = 25.0
LIFT_HEIGHT = 0.05  # m above its resting height: the object was lifted (`outcome`)
# Where each object's compartment of the goal bin lies, as the robot sees it (robosuite numbers
# them 0..3: near/far along x, right/left along y).
COMPARTMENT_WORDS = ("near right", "far right", "near left", "far left")
INSTRUCTIONS = (
    "pick up the {noun} and place it in the {where} compartment of the left bin",
    "put the {noun} into the {where} compartment of the bin on the left",
    "move the {noun} from the right bin to the {where} section of the left bin",
    "grab the {noun} and drop it in the {where} compartment of the left bin",
)


def _part_controller(kp: float) -> dict:
    """An absolute joint position controller (PD with gravity and inertia compensation)."""
    return {"type": "JOINT_POSITION", "input_type": "absolute", "kp": kp, "damping_ratio": 1.0,
            "impedance_mode": "fixed", "interpolation": None,
            # absolute targets are not scaled, but the controller still reads these
            "input_max": 1, "input_min": -1, "output_max": 1, "output_min": -1,
            "kp_limits": [0, 10 * kp], "damping_ratio_limits": [0, 10]}


def _controller_config(kp: float) -> dict:
    """Composite controller: joint positions for arms, waist and head; hand angles unscaled."""
    hand = {"type": "GRIP", "use_action_scaling": False}
    return {"type": "BASIC", "body_parts": {
        "right": dict(_part_controller(kp), gripper=hand),
        "left": dict(_part_controller(kp), gripper=hand),
        "torso": _part_controller(kp),
        "head": _part_controller(kp),
    }}


class GR1RobosuiteBackend(SimBackend):
    """GR1 with Fourier hands in robosuite's single-object PickPlace tasks.

    Options:
        image_width, image_height: camera size in pixels (224).
        camera: the robosuite camera rendered for the image topic ("agentview").
        control_freq: robosuite control rate in Hz; `sim_dt` is its period (40).
        kp: stiffness of the arm and waist joint controllers (1500).
        msaa_samples: multisample anti-aliasing of the camera (0). MuJoCo's default, 4, doubles
            the time of a frame under a software OpenGL driver (Mesa's llvmpipe: 57 against
            122 ms for a 96x96 frame of this half-million-triangle scene on a 2-core CPU).
    """

    name = "gr1_robosuite"
    tasks = tuple(TASKS)

    def __init__(self, embodiment: Embodiment, task: str, image_width: int = 224,
                 image_height: int = 224, camera: str = "agentview", control_freq: int = 40,
                 kp: float = 1500.0, msaa_samples: int = 0):
        """Build the robosuite environment for `task`.

        Raises:
            SimError: unknown task, a control rate that does not divide the embodiment's, or an
                embodiment whose joints are not this robot's.
        """
        if task not in TASKS:
            raise SimError(f"gr1_robosuite has no task {task!r}; its tasks: {list(TASKS)}")
        substeps = control_freq * embodiment.dt
        if control_freq <= 0 or abs(substeps - round(substeps)) > 1e-9:
            raise SimError(f"control_freq {control_freq} Hz does not divide the embodiment's "
                           f"control period of {embodiment.dt} s")
        self.env = None
        self._renderer = None
        self._renderer_model = None
        self.embodiment = embodiment
        self.task = task
        self.spec = TASKS[task]
        self.sim_dt = 1.0 / control_freq
        self.camera_names = (camera,)
        self.image_size = (int(image_height), int(image_width))
        if msaa_samples < 0:
            raise SimError(f"msaa_samples must be 0 or more, not {msaa_samples}")
        self.msaa_samples = int(msaa_samples)
        self.env = robosuite.make(
            self.spec.env_name, robots=ROBOT, controller_configs=_controller_config(kp),
            has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False,
            control_freq=control_freq, horizon=10**9, ignore_done=True, hard_reset=False,
            initialization_noise=None, reward_shaping=False)
        # robosuite builds the MuJoCo model on its first reset.
        self.env.reset()
        self._map_joints()
        self._head_hold = self.data.qpos[self._head_qpos].copy()
        if camera not in self._camera_list():
            raise SimError(f"camera {camera!r} is not in the scene: {self._camera_list()}")
        self._time = 0.0
        self._episode: Episode | None = None
        # What robosuite's own cameras show: visual meshes, not the collision hulls (group 0).
        self._scene_option = mujoco.MjvOption()
        self._scene_option.geomgroup[:] = [0, 1, 1, 0, 0, 0]

    # ---- joint bookkeeping -------------------------------------------------------------------

    def _map_joints(self) -> None:
        """Embodiment joints <-> qpos/qvel addresses and slots of robosuite's action vector."""
        model = self.env.sim.model._model
        robot = self.env.robots[0]
        composite = robot.composite_controller
        split = composite._action_split_indexes
        self.action_dim = int(max(end for _, end in split.values()))
        qpos, qvel, slot = [], [], []
        for name in self.embodiment.joint_names:
            side, _, rest = name.partition("_")
            if rest.startswith("hand_") and side in SIDES:
                dofs = [d for d, _ in HAND_DOFS]
                dof = rest[len("hand_"):]
                if dof not in dofs:
                    raise SimError(f"embodiment joint {name!r} is not a Fourier hand DoF {dofs}")
                index = dofs.index(dof)
                prefix = "L" if side == "l" else "R"
                joint = f"gripper0_{SIDES[side]}_{prefix}_{HAND_DOFS[index][1]}"
                start, _ = split[f"{SIDES[side]}_gripper"]
                slot.append(start + index)
            else:
                joint = f"robot0_{name}"
                part = "torso" if name.startswith("torso_") else SIDES.get(side)
                controller = composite.part_controllers.get(part)
                if controller is None or joint not in controller.joint_names:
                    raise SimError(f"embodiment joint {name!r} is not a joint of robosuite's "
                                   f"{ROBOT} arms or waist")
                start, _ = split[part]
                slot.append(start + controller.joint_names.index(joint))
            jid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, joint)
            qpos.append(model.jnt_qposadr[jid])
            qvel.append(model.jnt_dofadr[jid])
        self._qpos = np.asarray(qpos)
        self._qvel = np.asarray(qvel)
        self._slot = np.asarray(slot)
        if len(set(slot)) != len(slot):
            raise SimError("embodiment joints map to the same robosuite action twice")
        # Actions robosuite expects that the embodiment does not drive (the head): hold them.
        head = composite.part_controllers["head"]
        start, end = split["head"]
        self._head_slots = np.arange(start, end)
        self._head_qpos = np.asarray([model.jnt_qposadr[mujoco.mj_name2id(
            model, mujoco.mjtObj.mjOBJ_JOINT, j)] for j in head.joint_names])
        missing = set(range(self.action_dim)) - set(slot) - set(self._head_slots.tolist())
        if missing:
            raise SimError(f"robosuite actions {sorted(missing)} have no embodiment joint")

    def _camera_list(self) -> list[str]:
        model = self.env.sim.model._model
        return [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]

    @property
    def model(self) -> mujoco.MjModel:
        """The live MuJoCo model."""
        return self.env.sim.model._model

    @property
    def data(self) -> mujoco.MjData:
        """The live MuJoCo data."""
        return self.env.sim.data._data

    # ---- SimBackend --------------------------------------------------------------------------

    def reset(self, seed: int) -> Episode:
        """Place the object from `seed` (robosuite's sampler draws from the env's generator)."""
        # The placement samplers hold the env's Generator itself: reseed it in place.
        self.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self.env.reset()
        stiffen_joint_limits(self.model)
        self._head_hold = self.data.qpos[self._head_qpos].copy()
        self._time = 0.0
        env = self.env
        compartment = int(env.object_id)
        # Partial progress of the episode, for `outcome()`.
        self._rest_height = float(self.object_position()[2])
        self._max_lift = 0.0
        self._closest_to_target = float(np.linalg.norm(
            self.object_position()[:2] - np.asarray(env.target_bin_placements[compartment])[:2]))
        where = COMPARTMENT_WORDS[compartment]
        template = INSTRUCTIONS[np.random.default_rng(seed).integers(len(INSTRUCTIONS))]
        self._episode = Episode(
            task=self.task, seed=int(seed),
            instruction=template.format(noun=self.spec.noun, where=where),
            # The expert needs 6-8 s, or up to 16 s when it has to grasp again: 25 s.
            max_steps=int(round(EPISODE_SECONDS / self.embodiment.dt)),
            info={"object": self.spec.object_name.lower(), "compartment": where,
                  "target": [float(v) for v in env.target_bin_placements[compartment]]})
        return self._episode

    def step(self, targets: np.ndarray) -> None:
        """Hold `targets` (embodiment order, clipped to the limits) for `sim_dt` seconds."""
        targets = np.asarray(targets, dtype=np.float64)
        if targets.shape != (self.embodiment.state_dim,):
            raise ValueError(f"expected {self.embodiment.state_dim} joint targets, got "
                             f"{targets.shape}")
        # robosuite's action bounds are infinite for absolute targets: the limits are ours.
        targets = np.clip(targets, self.embodiment.lower, self.embodiment.upper)
        action = np.zeros(self.action_dim)
        action[self._slot] = targets
        action[self._head_slots] = self._head_hold
        self.env.step(action)
        self._time += self.sim_dt
        if self._episode is not None:
            position = self.object_position()
            self._max_lift = max(self._max_lift, float(position[2]) - self._rest_height)
            self._closest_to_target = min(self._closest_to_target, float(np.linalg.norm(
                position[:2] - self.target_position()[:2])))

    def outcome(self) -> dict:
        """How far the episode got, beyond success.

        The object's highest rise above where it rested, whether that was a lift (5 cm), and
        its closest horizontal approach to its compartment.
        """
        if self._episode is None:
            return {}
        return {"lifted": self.spec.object_name.lower() if self._max_lift >= LIFT_HEIGHT else "",
                "max_lift_m": round(self._max_lift, 4),
                "closest_to_target_m": round(self._closest_to_target, 4)}

    def joint_state(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, velocities) in embodiment order; hands: the driving joints' angles."""
        return self.data.qpos[self._qpos].copy(), self.data.qvel[self._qvel].copy()

    def render(self) -> list[np.ndarray]:
        """The camera frame, HxWx3 uint8."""
        if self._renderer is None or self._renderer_model is not self.model:
            self._close_renderer()
            height, width = self.image_size
            # The renderer's framebuffer takes the model's sample count when it is created.
            self.model.vis.quality.offsamples = self.msaa_samples
            self._renderer = mujoco.Renderer(self.model, height, width)
            self._renderer_model = self.model
        self._renderer.update_scene(self.data, camera=self.camera_names[0],
                                    scene_option=self._scene_option)
        # Floor reflections re-render the whole scene (costly without a GPU) for little detail.
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        return [self._renderer.render().copy()]

    def success(self) -> bool:
        """Whether the object rests in its compartment, hands away (robosuite's own check)."""
        return bool(self.env._check_success())

    def expert(self) -> ScriptedExpert:
        """The scripted grasp-carry-release expert for the current episode."""
        if self._episode is None:
            raise SimError("call reset() before expert()")
        from .gr1_expert import PickPlaceExpert

        return PickPlaceExpert(self)

    @property
    def time(self) -> float:
        """Simulated seconds since the last reset."""
        return self._time

    def close(self) -> None:
        """Release the renderer and the robosuite environment."""
        self._close_renderer()
        if self.env is not None:
            self.env.close()
            self.env = None

    def _close_renderer(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # ---- privileged state for the expert -----------------------------------------------------

    def object_position(self) -> np.ndarray:
        """World position of the task object's body."""
        body = self.env.obj_body_id[self.spec.object_name]
        return self.data.xpos[body].copy()

    def object_extent(self) -> tuple[float, float]:
        """(lowest, highest) world height of the task object's collision geometry."""
        model, data = self.model, self.data
        body = self.env.obj_body_id[self.spec.object_name]
        low, high = np.inf, -np.inf
        for geom in np.flatnonzero((model.geom_bodyid == body) & (model.geom_contype > 0)):
            if model.geom_type[geom] == mujoco.mjtGeom.mjGEOM_MESH:
                mesh = model.geom_dataid[geom]
                start, count = model.mesh_vertadr[mesh], model.mesh_vertnum[mesh]
                local = model.mesh_vert[start:start + count]
            else:  # a primitive: the corners of its bounding box
                center, half = model.geom_aabb[geom].reshape(2, 3)
                local = center + half * np.array(np.meshgrid(*[[-1, 1]] * 3)).reshape(3, -1).T
            heights = local @ data.geom_xmat[geom].reshape(3, 3)[2] + data.geom_xpos[geom][2]
            low, high = min(low, heights.min()), max(high, heights.max())
        return float(low), float(high)

    def bin_wall_top(self) -> float:
        """Height of the goal bin's walls (the highest point of its geoms)."""
        model, data = self.model, self.data
        bin_body = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, "bin2")
        geoms = np.flatnonzero(model.geom_bodyid == bin_body)
        return float(max(data.geom_xpos[g][2] + model.geom_size[g][2] for g in geoms))

    def target_position(self) -> np.ndarray:
        """Centre of the object's compartment on the goal bin's floor."""
        return np.asarray(self.env.target_bin_placements[int(self.env.object_id)], dtype=float)
