"""bag_to_dataset: rosbag2 recordings (MCAP, sqlite3) -> aligned, episode-split LeRobot data.

The tests write their own bags with the `rosbags` writers and ROS 2 Jazzy message definitions.
Timeline of the standard bag (seconds from its start T0, converted at 10 fps):
    camera 15 Hz from 0.000 (header stamps), joint states 50 Hz from 0.003 (header stamps,
    received 15 ms later), commanded trajectories 10 Hz at 0.007 + 0.1 i (zero header stamp:
    bag time), all until 4.5 s; instruction A at 0.05, instruction B at 2.05, marker "end" at
    4.05. So episode A has grid times 0.05, 0.15, ..., 1.95 (20 frames) and episode B 2.05,
    ..., 3.95 (20 frames).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

rosbags = pytest.importorskip("rosbags")

from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from twinbrain_ros.data.rosbag import (  # noqa: E402
    BagConverter,
    BagError,
    ConversionOptions,
    convert_bags,
    image_key_for_topic,
)
from twinbrain_ros.robot.embodiment import Embodiment  # noqa: E402
from twinbrain_ros.tools.bag_to_dataset import main  # noqa: E402

TS = get_typestore(Stores.ROS2_JAZZY)
T0 = 1_700_000_000 * 10**9
MS = 10**6
FPS = 10.0
TASK_A, TASK_B = "pick up the red can", "put the can in the bowl"
CAMERA = "/camera/image_raw"
H, W = 24, 32
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


def _header(stamp_ns: int):
    stamp = TS.types["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9,
                                                    nanosec=stamp_ns % 10**9)
    return TS.types["std_msgs/msg/Header"](stamp=stamp, frame_id="base")


def joint_value(i: int, j: int) -> float:
    """Position of joint j in joint state message i: tells every message and joint apart."""
    return 0.001 * i + 0.01 * j


def command_value(i: int, j: int) -> float:
    return -0.001 * i - 0.01 * j


def camera_frame(i: int) -> np.ndarray:
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[..., 0] = 8 * (i % 30)
    rgb[..., 1] = 100
    rgb[..., 2] = 200
    return rgb


def joint_stamps(duration_s=4.5, gap=None):
    """(message number, stamp offset ns) of the 50 Hz joint states, minus those in `gap`."""
    out = []
    for i in range(int(duration_s * 50)):
        t = 3 * MS + i * 20 * MS
        if gap and gap[0] * 1e9 < t < gap[1] * 1e9:
            continue
        out.append((i, t))
    return out


def write_bag(path, storage="mcap", embodiment=None, *, duration_s=4.5, joint_gap=None,
              compressed=False, encoding="rgb8", instructions=((0.05, TASK_A), (2.05, TASK_B)),
              markers=((4.05, "end"),), skip_topics=()):
    """Write a test recording; returns the path."""
    emb = embodiment or Embodiment.load("gr1")
    names = emb.joint_names
    image_type = ("sensor_msgs/msg/CompressedImage" if compressed
                  else "sensor_msgs/msg/Image")
    with Writer(path, version=9, storage_plugin=STORAGES[storage]) as writer:
        def connect(topic, msgtype):
            return None if topic in skip_topics else writer.add_connection(topic, msgtype,
                                                                           typestore=TS)

        camera = connect(CAMERA, image_type)
        joints = connect(emb.joint_state_topic, "sensor_msgs/msg/JointState")
        command = connect(emb.trajectory_topic, "trajectory_msgs/msg/JointTrajectory")
        instruction = connect(emb.instruction_topic, "std_msgs/msg/String")
        marker = connect("/episode_marker", "std_msgs/msg/String")
        messages = []   # (bag time, connection, message)
        for i in range(int(duration_s * 15)):
            t = T0 + round(i * 1e9 / 15)
            rgb = camera_frame(i)
            if compressed:
                buffer = io.BytesIO()
                from PIL import Image as PILImage

                PILImage.fromarray(rgb).save(buffer, format="JPEG", quality=95)
                msg = TS.types[image_type](header=_header(t), format="jpeg",
                                           data=np.frombuffer(buffer.getvalue(), np.uint8))
            else:
                channels = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "16UC1": rgb[..., :2]}[encoding]
                msg = TS.types[image_type](header=_header(t), height=H, width=W,
                                           encoding=encoding, is_bigendian=0,
                                           step=W * channels.shape[-1],
                                           data=np.ascontiguousarray(channels).reshape(-1))
            messages.append((t, camera, msg))
        # Joint states name the joints in reverse order, with an extra joint, 15 ms latency.
        order = list(reversed(range(len(names))))
        for i, t in joint_stamps(duration_s, joint_gap):
            msg = TS.types["sensor_msgs/msg/JointState"](
                header=_header(T0 + t), name=[names[j] for j in order] + ["unused_joint"],
                position=np.array([joint_value(i, j) for j in order] + [9.0]),
                velocity=np.zeros(0), effort=np.zeros(0))
            messages.append((T0 + t + 15 * MS, joints, msg))
        duration = TS.types["builtin_interfaces/msg/Duration"](sec=0, nanosec=100 * MS)
        for i in range(int(duration_s * 10)):
            point = TS.types["trajectory_msgs/msg/JointTrajectoryPoint"](
                positions=np.array([command_value(i, j) for j in range(len(names))]),
                velocities=np.zeros(0), accelerations=np.zeros(0), effort=np.zeros(0),
                time_from_start=duration)
            msg = TS.types["trajectory_msgs/msg/JointTrajectory"](
                header=_header(0), joint_names=list(names), points=[point])
            messages.append((T0 + 7 * MS + i * 100 * MS, command, msg))
        for t, text in instructions:
            messages.append((T0 + round(t * 1e9), instruction,
                             TS.types["std_msgs/msg/String"](data=text)))
        for t, text in markers:
            messages.append((T0 + round(t * 1e9), marker,
                             TS.types["std_msgs/msg/String"](data=text)))
        for t, connection, msg in sorted(messages, key=lambda m: m[0]):
            if connection is not None:
                writer.write(connection, t, TS.serialize_cdr(msg, connection.msgtype))
    return path


class EpisodeCollector:
    """A dataset writer stand-in that keeps the episodes."""

    def __init__(self):
        self.episodes = []

    def add_episode(self, images, state, action, task, timestamps=None):
        self.episodes.append(dict(images=images, state=state, action=action, task=task,
                                  timestamps=timestamps))
        return len(self.episodes) - 1


def expected_state(grid_s: float, joints: int, gap=None) -> np.ndarray:
    """The joint state whose header stamp is the latest at or before the grid time."""
    stamp_ns = T0 + round(grid_s * 1e9)
    i = max(i for i, t in joint_stamps(gap=gap) if T0 + t <= stamp_ns)
    return np.array([joint_value(i, j) for j in range(joints)])


def expected_command(grid_s: float, joints: int) -> np.ndarray:
    """The command whose bag time (its header stamp is zero) is the latest at or before."""
    i = int(np.floor((grid_s * 1e9 - 7 * MS) / (100 * MS)))
    return np.array([command_value(i, j) for j in range(joints)])


def grid(start_s: float, frames: int) -> list[float]:
    return [start_s + k / FPS for k in range(frames)]


@pytest.fixture(scope="module")
def gr1():
    return Embodiment.load("gr1")


def test_image_key_from_topic():
    assert image_key_for_topic("/camera/image_raw") == "observation.images.camera_image_raw"
    assert image_key_for_topic("/wrist/color/image/") == "observation.images.wrist_color_image"


# None: no --format given, LeRobot's current v3.0 is written.
@pytest.mark.parametrize(("storage", "version"), [("mcap", "v2.1"), ("sqlite3", "v3.0"),
                                                  ("mcap", None)])
def test_round_trip_two_instructions_two_episodes(tmp_path, gr1, storage, version, capsys):
    from twinbrain_ros.data.lerobot import LeRobotDataset

    bag = write_bag(tmp_path / "bag", storage)
    out = tmp_path / "dataset"
    code = main([str(bag), "--out", str(out), "--embodiment", "gr1", "--fps", str(FPS),
                 *(["--format", version] if version else []), "--no-videos"])
    version = version or "v3.0"
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"({storage}," in printed.out and "2 episodes, 40 frames" in printed.out

    dataset = LeRobotDataset(out, horizon=4, embodiment=gr1)
    assert dataset.version == version
    assert dataset.num_episodes == 2 and dataset.num_frames == 40 and len(dataset) == 40
    assert sorted(dataset.tasks.values()) == sorted([TASK_A, TASK_B])
    states, actions = np.asarray(dataset.states()), np.asarray(dataset.actions())
    times = grid(0.05, 20) + grid(2.05, 20)
    n = gr1.state_dim
    for row, t in enumerate(times):
        np.testing.assert_allclose(states[row], expected_state(t, n), atol=1e-6,
                                   err_msg=f"state at {t:.2f} s")
        np.testing.assert_allclose(actions[row], expected_command(t, n), atol=1e-6,
                                   err_msg=f"action at {t:.2f} s")
    first, last = dataset[0], dataset[39]
    assert first["instruction"] == TASK_A and int(first["episode_index"]) == 0
    assert last["instruction"] == TASK_B and int(last["episode_index"]) == 1
    assert int(last["frame_index"]) == 19
    np.testing.assert_allclose(np.asarray(first["state"]), expected_state(0.05, n), atol=1e-6)
    assert dataset.image_keys == [image_key_for_topic(CAMERA)]
    # grid 0.05 s holds camera frame 0 (at 0.0; frame 1 is at 0.0667), 2.05 s frame 30.
    np.testing.assert_array_equal(first["images"][0], camera_frame(0))
    np.testing.assert_array_equal(dataset[20]["images"][0], camera_frame(30))


def test_alignment_and_bgr_images_on_the_grid(tmp_path, gr1):
    bag = write_bag(tmp_path / "bag", "sqlite3", encoding="bgr8")
    collector = EpisodeCollector()
    reports = BagConverter(gr1, ConversionOptions(fps=FPS)).convert([bag], collector)
    assert [e["task"] for e in collector.episodes] == [TASK_A, TASK_B]
    assert [len(e["state"]) for e in collector.episodes] == [20, 20]
    episode = collector.episodes[1]
    np.testing.assert_allclose(episode["timestamps"], np.arange(20) / FPS, atol=1e-9)
    for k, t in enumerate(grid(2.05, 20)):
        frame = int(np.floor(t * 15 + 1e-9))   # latest camera frame at or before t
        np.testing.assert_array_equal(episode["images"][image_key_for_topic(CAMERA)][k],
                                      camera_frame(frame))
    assert reports[0].gaps == [] and reports[0].frames == 40
    assert reports[0].time_sources[gr1.trajectory_topic] == "bag time"
    assert reports[0].time_sources[gr1.joint_state_topic] == "header stamp"


def test_next_state_actions(tmp_path, gr1):
    bag = write_bag(tmp_path / "bag", "mcap", skip_topics=(gr1.trajectory_topic,))
    collector = EpisodeCollector()
    BagConverter(gr1, ConversionOptions(fps=FPS, actions="next-state")).convert([bag],
                                                                                collector)
    # The last step of each episode has no next state: 19 frames each.
    assert [len(e["state"]) for e in collector.episodes] == [19, 19]
    for episode in collector.episodes:
        np.testing.assert_array_equal(episode["action"][:-1], episode["state"][1:])


def test_gap_in_joint_states_is_reported_and_splits_the_episode(tmp_path, gr1):
    # No joint state stamped within (1.0, 1.5) s. With max_gap 2/fps = 0.2 s, grid times 1.25,
    # 1.35, 1.45 have none fresh enough (last one at 0.983 s); 1.55 has the one of 1.503 s.
    gap = (1.0, 1.5)
    bag = write_bag(tmp_path / "bag", "mcap", joint_gap=gap)
    collector = EpisodeCollector()
    converter = BagConverter(gr1, ConversionOptions(fps=FPS))
    reports = converter.convert([bag], collector)
    assert [(e["task"], len(e["state"])) for e in collector.episodes] == [
        (TASK_A, 12), (TASK_A, 5), (TASK_B, 20)]
    report = reports[0]
    assert len(report.gaps) == 1 and report.dropped_frames == 3
    gap_span = report.gaps[0]
    assert gap_span.stream == gr1.joint_state_topic and gap_span.steps == 3
    assert gap_span.start_s == pytest.approx(1.25) and gap_span.end_s == pytest.approx(1.45)
    # Not interpolated: each frame holds a real message, frames continue after the gap.
    n = gr1.state_dim
    after = collector.episodes[1]
    for k, t in enumerate(grid(1.55, 5)):
        np.testing.assert_allclose(after["state"][k], expected_state(t, n, gap), atol=1e-9)
    text = report.format()
    assert f"{gr1.joint_state_topic}: 1.250-1.450 s (3 steps)" in text


def test_compressed_jpeg_images(tmp_path, gr1, capsys):
    from twinbrain_ros.data.lerobot import LeRobotDataset

    bag = write_bag(tmp_path / "bag", "mcap", compressed=True, duration_s=2.5,
                    instructions=((0.05, TASK_A),), markers=())
    collector = EpisodeCollector()
    BagConverter(gr1, ConversionOptions(fps=FPS)).convert([bag], collector)
    images = collector.episodes[0]["images"][image_key_for_topic(CAMERA)]
    assert images.shape[1:] == (H, W, 3) and images.dtype == np.uint8
    np.testing.assert_allclose(images[0], camera_frame(0), atol=6)   # jpeg is lossy

    out = tmp_path / "dataset"
    assert main([str(bag), "--out", str(out), "--embodiment", "gr1", "--fps", str(FPS),
                 "--image-keys", "front"]) == 0, capsys.readouterr().err
    dataset = LeRobotDataset(out, horizon=2, embodiment=gr1)
    assert dataset.num_episodes == 1 and dataset.num_frames == len(images)
    assert dataset.image_keys == ["observation.images.front"]
    # videos are lossy too (libx264)
    np.testing.assert_allclose(dataset[0]["images"][0], camera_frame(0), atol=12)


def test_missing_topic_is_named_with_the_topics_the_bag_has(tmp_path, capsys):
    bag = write_bag(tmp_path / "bag", "sqlite3", duration_s=0.5)
    code = main([str(bag), "--out", str(tmp_path / "out"), "--embodiment", "gr1",
                 "--image-topics", CAMERA, "/wrist/image_raw"])
    err = capsys.readouterr().err
    assert code == 1
    assert "/wrist/image_raw" in err and "not in the bag" in err
    assert "/joint_states [sensor_msgs/msg/JointState]" in err
    assert not (tmp_path / "out").exists()


def test_unsupported_encoding_and_missing_instruction_fail_clearly(tmp_path, gr1):
    converter = BagConverter(gr1, ConversionOptions(fps=FPS))
    bag = write_bag(tmp_path / "depth", "mcap", duration_s=0.5, encoding="16UC1")
    with pytest.raises(BagError, match="unsupported image encoding '16UC1'"):
        converter.read(bag)
    quiet = write_bag(tmp_path / "quiet", "mcap", duration_s=0.5, instructions=(), markers=())
    with pytest.raises(BagError, match="--default-instruction"):
        converter.read(quiet)
    collector = EpisodeCollector()
    BagConverter(gr1, ConversionOptions(fps=FPS, default_instruction="wave")).convert(
        [quiet], collector)
    assert [e["task"] for e in collector.episodes] == ["wave"]


def test_widowx_end_effector_deltas_from_forward_kinematics(tmp_path):
    pytest.importorskip("pinocchio")
    from twinbrain_ros.robot.kinematics import ArmKinematics, rpy_matrix

    widowx = Embodiment.load("widowx")
    bag = write_bag(tmp_path / "bag", "mcap", embodiment=widowx, duration_s=3.0,
                    instructions=((0.05, TASK_A),), markers=())
    collector = EpisodeCollector()
    converter = BagConverter(widowx, ConversionOptions(fps=FPS))   # ee_delta: next-state
    converter.convert([bag], collector)
    episode = collector.episodes[0]
    state, action = episode["state"], episode["action"]
    assert action.shape == (len(state), 7)
    kinematics = ArmKinematics.widowx()
    arm = [widowx.joint_names.index(n) for n in kinematics.joint_names]
    gripper = widowx.joint_names.index(widowx.gripper_joint)
    middle = (widowx.gripper_open_position + widowx.gripper_closed_position) / 2
    for k in range(len(state) - 1):
        pose0, pose1 = kinematics.fk(state[k, arm]), kinematics.fk(state[k + 1, arm])
        np.testing.assert_allclose(action[k, :3], pose1[:3, 3] - pose0[:3, 3], atol=1e-9)
        np.testing.assert_allclose(rpy_matrix(*action[k, 3:6]) @ pose0[:3, :3],
                                   pose1[:3, :3], atol=1e-9)
        assert action[k, 6] == float(state[k + 1, gripper] > middle)


def test_markers_split_episodes_and_repeated_instructions_do_not(tmp_path, gr1):
    # A at 0.05 s, A again at 1.05 s (republished: same episode), marker "next" at 1.55 s
    # (new episode, same task), B at 2.05 s, "end" at 3.05 s, nothing recorded after it.
    bag = write_bag(tmp_path / "bag", "mcap",
                    instructions=((0.05, TASK_A), (1.05, TASK_A), (2.05, TASK_B)),
                    markers=((1.55, "next"), (3.05, "END")))
    collector = EpisodeCollector()
    BagConverter(gr1, ConversionOptions(fps=FPS)).convert([bag], collector)
    assert [(e["task"], len(e["state"])) for e in collector.episodes] == [
        (TASK_A, 15), (TASK_A, 5), (TASK_B, 10)]


def _rewrite_with_crcs(bag: Path) -> Path:
    """Rewrite a bag's MCAP file the way `ros2 bag record` writes it: chunked, with CRCs."""
    from mcap.records import Channel, Header, Message, Metadata, Schema
    from mcap.stream_reader import StreamReader
    from mcap.writer import CompressionType, Writer

    path = next(bag.glob("*.mcap"))
    with open(path, "rb") as f:
        records = list(StreamReader(f).records)
    schemas, channels = {}, {}
    with open(path.with_suffix(".tmp"), "wb") as out:
        writer = Writer(out, compression=CompressionType.NONE, chunk_size=64 * 1024)
        for r in records:
            if isinstance(r, Header):
                writer.start(profile=r.profile, library="rosbag2 test")
            elif isinstance(r, Schema):
                schemas[r.id] = writer.register_schema(r.name, r.encoding, r.data)
            elif isinstance(r, Channel):
                channels[r.id] = writer.register_channel(r.topic, r.message_encoding,
                                                         schemas[r.schema_id], r.metadata)
            elif isinstance(r, Message):
                writer.add_message(channels[r.channel_id], r.log_time, r.data, r.publish_time,
                                   r.sequence)
            elif isinstance(r, Metadata):
                writer.add_metadata(r.name, r.metadata)
        writer.finish()
    path.with_suffix(".tmp").replace(path)
    return path


def test_a_corrupted_mcap_chunk_is_detected_by_its_crc(tmp_path, gr1):
    bag = write_bag(tmp_path / "bag", "mcap")
    path = _rewrite_with_crcs(bag)
    _, reports = convert_bags([bag], tmp_path / "good", gr1)
    assert not any("CRC" in note for note in reports[0].notes)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 256] = bytes(256)
    path.write_bytes(bytes(data))
    with pytest.raises(BagError, match=f"{bag}: bag.mcap is corrupt.*crc validation failed"):
        convert_bags([bag], tmp_path / "bad", gr1)


def test_a_bag_without_crcs_is_converted_with_a_note(tmp_path, gr1):
    bag = write_bag(tmp_path / "bag", "mcap")  # rosbags writes no CRCs
    _, reports = convert_bags([bag], tmp_path / "out", gr1)
    assert any("carries no CRCs" in note for note in reports[0].notes)
