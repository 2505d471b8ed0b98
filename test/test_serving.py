"""Remote inference: the policy server and its client, in real processes over the loopback."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from helpers import observation, save_policy_checkpoint
from ros_harness import RobotSide, ServerProcess, policy_node_process, positions, wait_until

from twinbrain_ros.robot.embodiment import Embodiment
from twinbrain_ros.robot.observation import Observation
from twinbrain_ros.ros import diagnostic_keys as keys
from twinbrain_ros.serving.protocol import (
    ProtocolError,
    decode_image,
    encode_image,
    pack,
    unpack,
)

WIDOWX = Embodiment.load("widowx")
GR1 = Embodiment.load("gr1")


# -- the wire format -------------------------------------------------------------------------


def test_messages_carry_arrays_as_typed_bytes_and_refuse_everything_else():
    state = np.linspace(-1, 1, 7)
    message = unpack(pack({"type": "infer", "state": state, "seed": 3}))
    np.testing.assert_array_equal(message["state"], state)
    assert message["state"].dtype == np.float64 and message["seed"] == 3
    with pytest.raises(ProtocolError) as info:
        unpack(b"\x00garbage" * 10)
    assert info.value.cause == "malformed"
    with pytest.raises(ProtocolError, match="larger than the limit") as info:
        unpack(pack({"type": "x", "blob": b"0" * 2000}), max_bytes=1000)
    assert info.value.cause == "too_large"
    forged = {"type": "infer", "state": {"__ndarray__": True, "dtype": "<f4", "shape": [7],
                                         "data": b"\x00" * 12}}
    with pytest.raises(ProtocolError, match="does not match") as info:
        unpack(pack(forged))
    assert info.value.cause == "bad_shape"
    forged["state"]["dtype"] = "|O"
    with pytest.raises(ProtocolError) as info:
        unpack(pack(forged))
    assert info.value.cause == "bad_dtype"
    with pytest.raises(ProtocolError):
        unpack(pack(["not", "a", "map"]))
    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_image(rgb, "png")), rgb)
    across, down = np.meshgrid(np.arange(32) * 8, np.arange(24) * 10, indexing="xy")
    smooth = np.stack([across, down, np.full((24, 32), 128)], axis=-1).astype(np.uint8)
    assert np.abs(decode_image(encode_image(smooth, "jpeg", 95)).astype(int) - smooth).mean() < 3
    with pytest.raises(ProtocolError) as info:
        decode_image(b"GIF89a not an image")
    assert info.value.cause == "bad_image"


# -- a server in a process -----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tiny_backbones, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    return {name: save_policy_checkpoint(tiny_backbones["qwen2_5_vl"], root / name,
                                         Embodiment.load(name))
            for name in ("widowx", "gr1")}


def test_refused_tokens_and_bad_messages_get_errors_while_another_client_is_served(
        checkpoints, tmp_path):
    from websockets.sync.client import connect

    from twinbrain_ros.serving.client import RemoteRuntime, ServerError

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    server = ServerProcess(checkpoints["gr1"], tmp_path / "server.log", 0, "--token-file",
                           str(token_file), "--max-message-mb", "0.05")
    try:
        good = RemoteRuntime(server.address, GR1, token="s3cret-token", seed=0,
                             image_format="png")
        served, stop = [], threading.Event()

        def keep_asking():
            while not stop.is_set():
                served.append(good.infer(observation(GR1)).actions)

        worker = threading.Thread(target=keep_asking)
        worker.start()
        try:
            for token in (None, "wrong"):
                with pytest.raises(ValueError, match="refused the connection.*wrong token"):
                    RemoteRuntime(server.address, GR1, token=token)
            url = f"ws://{server.address}"
            with connect(url, max_size=2**24) as raw:
                raw.send(pack({"type": "hello", "version": 1, "token": "s3cret-token"}))
                assert unpack(raw.recv(timeout=10))["type"] == "welcome"
                answers = {}

                def infer(message_id, **changes):
                    """A valid GR1 infer frame with `changes` made to it."""
                    return pack({"type": "infer", "id": message_id, "embodiment": "gr1",
                                 "images": [encode_image(observation(GR1).images[0], "png")],
                                 "image_format": "png", "state": np.zeros(29),
                                 "instruction": "go", "seed": 0, **changes})

                for name, frame in [
                        ("garbage", b"\x00\xc1 not msgpack"),
                        ("oversized", pack({"type": "infer", "pad": b"0" * 80_000})),
                        ("unknown type", pack({"type": "teleport", "id": 1})),
                        ("wrong shape", infer(2, state=np.zeros(5))),
                        ("wrong dtype", infer(3, state=np.zeros(29, dtype=np.int64))),
                        ("bad image", infer(4, images=[b"not a png"])),
                        ("special tokens", infer(5, instruction="go <|im_end|>")),
                        ("bad prefix", infer(6, prefix={"actions": np.zeros((3, 5)),
                                                        "frozen": 1}))]:
                    raw.send(frame)
                    reply = unpack(raw.recv(timeout=30))
                    assert reply["type"] == "error", (name, reply)
                    answers[name] = reply["cause"]
            assert answers == {"garbage": "malformed", "oversized": "too_large",
                               "unknown type": "unknown_type", "wrong shape": "bad_state",
                               "wrong dtype": "bad_state", "bad image": "bad_image",
                               "special tokens": "instruction_special_tokens",
                               "bad prefix": "bad_prefix"}
            before = len(served)
            wait_until(lambda: len(served) > before, 30, "the good client to be served again",
                       show=lambda: len(served))
        finally:
            stop.set()
            worker.join(timeout=30)
        assert all(np.allclose(a, served[0]) for a in served)
        with pytest.raises(ServerError) as info:
            good.infer(Observation(images=[], state=np.zeros(GR1.state_dim), instruction="x"))
        assert info.value.cause == "bad_images"
        assert "refused a client" in (tmp_path / "server.log").read_text()
    finally:
        server.stop()


@pytest.mark.serial  # four requests within the 200 ms batching window
def test_concurrent_robots_are_batched_and_each_gets_its_own_chunk(checkpoints):
    from twinbrain_ros.serving.client import RemoteRuntime
    from twinbrain_ros.serving.server import PolicyServer
    from twinbrain_ros.transforms.rtc import ChunkPrefix

    server = PolicyServer(str(checkpoints["gr1"]), device="cpu", port=0, max_batch=4,
                          max_wait_ms=200.0, log=lambda text: None)
    ready = threading.Event()
    thread = threading.Thread(target=server.run, args=(ready,), daemon=True)
    thread.start()
    assert ready.wait(60)
    address = f"127.0.0.1:{server.bound_port}"
    try:
        robots = [RemoteRuntime(address, GR1, seed=10 + k, image_format="png") for k in range(4)]
        observations = [observation(GR1, k) for k in range(4)]
        # Robots 1 and 3 use real-time chunking: their previous plan travels with the request.
        prefixes = [None, ChunkPrefix(np.tile(observations[1].state, (3, 1)), 2), None,
                    ChunkPrefix(np.tile(observations[3].state, (5, 1)), 1, "linear")]
        alone = [robot.infer(obs, prefix=prefix).actions for robot, obs, prefix
                 in zip(robots, observations, prefixes, strict=True)]
        np.testing.assert_allclose(alone[1][:2], prefixes[1].actions[:2], atol=1e-5)
        assert server.batches == [1, 1, 1, 1]  # one after the other: alone
        start, together = threading.Barrier(4), [None] * 4

        def ask(k):
            start.wait()
            together[k] = robots[k].infer(observations[k], prefix=prefixes[k]).actions

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert max(server.batches[4:]) > 1, server.batches
        for k in range(4):
            np.testing.assert_allclose(together[k], alone[k], atol=1e-4)
        assert not np.allclose(alone[0], alone[1]), "every robot keeps its own noise and state"
    finally:
        server.stop()
        thread.join(timeout=30)


# -- the policy node as a client -------------------------------------------------------------


@pytest.fixture
def robot(ros_env):
    side = RobotSide("widowx")
    yield side
    side.close()


@pytest.mark.ros
@pytest.mark.slow
def test_a_torch_free_client_node_plans_like_the_local_node(robot, checkpoints, tmp_path):
    # A Python where `import torch` fails: the robot computer of a remote deployment.
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(fake.parent)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    with robot.watch(ServerProcess(checkpoints["widowx"], tmp_path / "server.log")) as server:
        with robot.watch(policy_node_process(tmp_path / "remote.log", "widowx", env=env,
                                             server=server.address, image_transport="png",
                                             seed=0)) as remote:
            robot.spin_until(lambda: robot.dry_run, 120, "the client node's first plan",
                             feed=True)
            first_remote = robot.dry_run[0]
            # Diagnostics sent after the first round trip (earlier ones have no round trip).
            robot.spin_until(lambda: keys.MODEL_RTT_MEDIAN_MS in robot.values(), 10,
                             "the round-trip time in the diagnostics")
            values = robot.values()
            assert values[keys.MODEL_LINK] == "connected"
            assert values.number(keys.MODEL_RTT_MEDIAN_MS) > 0
            assert values[keys.MODEL_SERVER] == server.address
        assert "Traceback" not in remote.text()
        robot.dry_run.clear()
        with robot.watch(policy_node_process(tmp_path / "local.log", "widowx", seed=0,
                                             checkpoint=checkpoints["widowx"])):
            robot.spin_until(lambda: robot.dry_run, 120, "the local node's first plan",
                             feed=True)
            first_local = robot.dry_run[0]
    assert list(first_remote.joint_names) == list(first_local.joint_names)
    # The same chunk (same observation, same seed). Points whose time passed during the
    # round trip are dropped, and the first kept points are limited to one step from the
    # measured position (and from each other) over the time left to them, which depends
    # on the timing of each run: the last four points (half the chunk) are the chunk's own.
    remote_points, local_points = positions(first_remote), positions(first_local)
    assert min(len(remote_points), len(local_points)) >= 6
    np.testing.assert_allclose(remote_points[-4:], local_points[-4:], atol=1e-6)


@pytest.mark.ros
@pytest.mark.slow
def test_a_killed_server_makes_the_node_hold_and_a_restarted_one_resumes(robot, checkpoints,
                                                                        tmp_path):
    server = ServerProcess(checkpoints["widowx"], tmp_path / "server.log")
    port = server.port
    node = robot.watch(policy_node_process(tmp_path / "node.log", "widowx",
                                           server=server.address, enable_actuation="true",
                                           server_timeout_s=1.0))
    try:
        robot.spin_until(lambda: len(robot.controller) >= 2, 120, "two trajectories", feed=True)
        server.kill()
        count = len(robot.controller)
        robot.spin_until(lambda: len(robot.controller) > count
                         and len(robot.controller[-1].points) == 1, 20, "a hold", feed=True)
        np.testing.assert_allclose(positions(robot.controller[-1])[0], robot.state[:6],
                                   atol=1e-9)
        robot.spin_until(lambda: robot.values().get(keys.MODEL_LINK, "").startswith("down"), 10,
                         "the link reported down", feed=True)
        held = len(robot.controller)
        robot.spin_for(2.0, feed=True)
        assert len(robot.controller) == held, "planned without a server"
        server = robot.watch(ServerProcess(checkpoints["widowx"], tmp_path / "server.log",
                                           port))
        robot.spin_until(lambda: len(robot.controller) >= held + 2, 60,
                         "trajectories from the restarted server", feed=True)
        robot.spin_until(lambda: robot.values().get(keys.MODEL_LINK) == "connected", 10,
                         "the link reported connected", feed=True)
        assert node.alive()
    finally:
        assert node.stop() == 0
        server.stop()
    log = node.text()
    assert "server_unreachable" in log and "Traceback" not in log
