"""Released starVLA checkpoints: loaded as published, run as their authors' code runs them.

The fixtures in `test/fixtures/release/` were produced by starVLA's own code (see their
README.md): its layout of a tiny Qwen-GR00T, its inputs and its outputs. Our loader must
reproduce the action chunk from the same files and inputs.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from release_fixture import FIXTURES, release_base, release_run

from twinbrain_ros.model.backbone import QwenVLProcessor
from twinbrain_ros.model.release import starvla
from twinbrain_ros.model.release.starvla import ReleaseError, load_release, read_release
from twinbrain_ros.ros import diagnostic_keys as keys
from twinbrain_ros.transforms.ensemble import AdaptiveEnsembler

FAMILY = {"qwen25_gr00t": "qwen2_5_vl", "qwen3_gr00t": "qwen3_vl",
          "physbrain_qwen25": "qwen2_5_vl", "physbrain_qwen3": "qwen3_vl"}
SINGLE = sorted(name for name in FAMILY if not name.startswith("physbrain"))
TWIN = sorted(name for name in FAMILY if name.startswith("physbrain"))


@pytest.fixture(scope="module")
def bases(tiny_backbones, tmp_path_factory):
    """family -> the base VLM directory of the fixtures' runs (see `release_base`)."""
    root = tmp_path_factory.mktemp("release_bases")
    return {family: str(release_base(path, root / family))
            for family, path in tiny_backbones.items()}


@pytest.fixture(scope="module")
def cases():
    return {name: dict(np.load(FIXTURES / name / "cases.npz")) for name in FAMILY}


@pytest.mark.parametrize("name", SINGLE)
def test_the_loader_reproduces_the_authors_chunk(name, cases, bases, tmp_path):
    case = cases[name]
    run = release_run(name, tmp_path / "run")
    model = load_release(run, backbone_path=bases[FAMILY[name]])
    image = case["image"]
    # Their processor's tokens and pixels for the same frame and instruction.
    inputs = model.vl_inputs([image], "put the spoon on the towel")
    np.testing.assert_array_equal(inputs.input_ids.numpy(), case["input_ids"])
    np.testing.assert_allclose(inputs.pixel_values.numpy(), case["pixel_values"], atol=1e-5)
    np.testing.assert_array_equal(inputs.image_grid_thw.numpy(), case["image_grid_thw"])
    hidden, _ = model.context(inputs)
    np.testing.assert_allclose(hidden.numpy(), case["last_hidden"], atol=1e-4)
    # Their chunk without a state (SimplerEnv's Bridge protocol) and with one.
    chunk_a = model.sample([image], "put the spoon on the towel",
                           noise=torch.from_numpy(case["noise_a"]))
    np.testing.assert_allclose(chunk_a, case["normalized_a"][0], atol=1e-4)
    chunk_b = model.sample([image], "put the spoon on the towel", state=case["state"],
                           noise=torch.from_numpy(case["noise_b"]))
    np.testing.assert_allclose(chunk_b, case["normalized_b"][0], atol=1e-4)
    assert np.abs(chunk_a - chunk_b).max() > 1e-3  # the state token changes the chunk
    stats = read_release(run).stats["oxe_bridge"]["action"]
    np.testing.assert_allclose(starvla.unnormalize_actions(chunk_a, stats),
                               case["unnormalized_a"], atol=1e-4)


def test_weights_saved_before_transformers_4_52_load_by_their_old_names(bases, tmp_path,
                                                                        cases):
    def old_layout(state):
        out = {}
        for key, value in state.items():
            inner = key[len(starvla.VLM_PREFIX):]
            if key.startswith(starvla.VLM_PREFIX) and inner.startswith("model.visual."):
                key = starvla.VLM_PREFIX + inner[len("model."):]
            elif key.startswith(starvla.VLM_PREFIX) and inner.startswith("model.language_model."):
                key = starvla.VLM_PREFIX + "model." + inner[len("model.language_model."):]
            out[key] = value
        return out

    run = release_run("qwen25_gr00t", tmp_path / "run", edit_weights=old_layout)
    model = load_release(run, backbone_path=bases["qwen2_5_vl"])
    case = cases["qwen25_gr00t"]
    chunk = model.sample([case["image"]], "put the spoon on the towel",
                         noise=torch.from_numpy(case["noise_a"]))
    np.testing.assert_allclose(chunk, case["normalized_a"][0], atol=1e-4)


def _drop(key):
    def edit(state):
        del state[key]
        return state
    return edit


@pytest.mark.parametrize("edit, message", [
    (_drop("action_model.future_tokens.weight"), "1 tensor(s) missing: action_model.future"),
    (lambda s: {**s, "action_model.extra.weight": torch.zeros(2)},
     "1 tensor(s) unexpected: action_model.extra.weight"),
])
def test_a_weights_file_that_does_not_fit_names_the_tensors(edit, message, tiny_backbones,
                                                            tmp_path):
    run = release_run("qwen25_gr00t", tmp_path / "run", edit_weights=edit)
    with pytest.raises(ReleaseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_release(run, backbone_path=tiny_backbones["qwen2_5_vl"])


def test_a_release_on_another_backbone_is_refused_by_shapes(tiny_backbones, tmp_path):
    run = release_run("qwen25_gr00t", tmp_path / "run")
    with pytest.raises(ReleaseError, match="does not fit the model its config describes"):
        load_release(run, backbone_path=tiny_backbones["qwen3_vl"])


def test_a_missing_base_vlm_names_the_config_entry(tmp_path):
    run = release_run("qwen25_gr00t", tmp_path / "run")
    with pytest.raises(ReleaseError, match="framework.qwenvl.base_vlm"):
        load_release(run)


def test_statistics_that_do_not_fit_the_head_are_refused(tmp_path):
    def short(stats):
        stats["oxe_bridge"]["action"]["q99"] = stats["oxe_bridge"]["action"]["q99"][:6]

    run = release_run("qwen25_gr00t", tmp_path / "run", edit_stats=short)
    with pytest.raises(ReleaseError, match="lengths"):
        read_release(run)


def test_an_unknown_framework_is_refused(tmp_path):
    def other(config):
        config["framework"]["name"] = "QwenOFT"

    run = release_run("qwen25_gr00t", tmp_path / "run", edit_config=other)
    with pytest.raises(ReleaseError, match="framework 'QwenOFT'"):
        read_release(run)


def test_the_run_directory_or_its_weights_file_and_the_latest_step(tmp_path):
    run = release_run("qwen25_gr00t", tmp_path / "run")
    newest = run / "checkpoints" / "steps_30000_pytorch_model.pt"
    shutil.copy(run / "checkpoints" / "steps_0_pytorch_model.pt", newest)
    assert read_release(run).weights == newest
    older = run / "checkpoints" / "steps_0_pytorch_model.pt"
    assert read_release(older).weights == older and read_release(older).run_dir == run
    assert starvla.is_release_checkpoint(run) and starvla.is_release_checkpoint(older)
    assert not starvla.is_release_checkpoint(tmp_path)


def test_release_era_unnormalization():
    stats = {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "mask": [True] * 6 + [False]}
    stats["q01"][0], stats["q99"][0] = 0.0, 0.04
    actions = starvla.unnormalize_actions(np.array([[2.0, 0, 0, 0, 0, 0, 0.49],
                                                    [0.0, 0, 0, 0, 0, 0, 0.51]]), stats)
    assert actions[0, 0] == pytest.approx(0.04)  # clipped to 1, then scaled
    assert actions[1, 0] == pytest.approx(0.02)
    assert list(actions[:, 6]) == [0.0, 1.0]  # gripper thresholded, not scaled


@pytest.mark.parametrize("name", TWIN)
def test_the_loader_reproduces_the_authors_twin(name, cases, bases, tmp_path):
    """PhysBrain-VLA: two brains with their own prompts and positions, the Right Brain's
    queries over [Left ; Right] keys by index, the action-query states into the head."""
    case = cases[name]
    run = release_run(name, tmp_path / "run")
    model = load_release(run, backbone_path=bases[FAMILY[name]])
    left, right = model.vl_inputs([case["image"]], "put the spoon on the towel")
    np.testing.assert_array_equal(left.input_ids.numpy(), case["left_input_ids"])
    np.testing.assert_array_equal(right.input_ids.numpy(), case["right_input_ids"])
    np.testing.assert_allclose(right.pixel_values.numpy(), case["pixel_values"], atol=1e-5)
    queries, final = model.context(left, right)
    np.testing.assert_allclose(final.numpy(), case["right_hidden"], atol=1e-4)
    np.testing.assert_allclose(queries.numpy(), case["action_hidden"], atol=1e-4)
    chunk_a = model.sample([case["image"]], "put the spoon on the towel",
                           noise=torch.from_numpy(case["noise_a"]))
    np.testing.assert_allclose(chunk_a, case["normalized_a"][0], atol=1e-4)
    chunk_b = model.sample([case["image"]], "put the spoon on the towel", state=case["state"],
                           noise=torch.from_numpy(case["noise_b"]))
    np.testing.assert_allclose(chunk_b, case["normalized_b"][0], atol=1e-4)
    stats = read_release(run).stats["oxe_bridge"]["action"]
    np.testing.assert_allclose(starvla.unnormalize_actions(chunk_a, stats),
                               case["unnormalized_a"], atol=1e-4)
    # The Right Brain's keys: Left tokens by index, then all of them; its own causally.
    visible = model.joint_mask(*(model._prepare(brain, inputs)[2] for brain, inputs in
                                 ((model.left, left), (model.right, right)))) == 0
    np.testing.assert_array_equal(visible.numpy()[:, 0], case["joint_mask_visible"])


def test_an_instruction_holding_the_twins_query_token_is_refused(bases, tmp_path):
    from twinbrain_ros.model.backbone import InstructionError
    from twinbrain_ros.policy.release_runtime import ReleaseRuntime
    from twinbrain_ros.robot.embodiment import Embodiment

    runtime = ReleaseRuntime(str(release_run("physbrain_qwen25", tmp_path / "run")),
                             Embodiment.resolve("widowx"), device="cpu",
                             backbone_path=bases["qwen2_5_vl"])
    assert runtime.check_instruction("put the spoon on the towel", 128) > 0
    with pytest.raises(InstructionError, match="special tokens"):
        runtime.check_instruction("open it <|action|>", 128)
    assert "<|action|>" in runtime.contract(128)["special_tokens"]


def test_the_twin_refuses_a_mode_its_release_does_not_run(bases, tmp_path):
    def bidirectional(config):
        config["doublevla"]["mot_attention_mode"] = "bidirectional"

    run = release_run("physbrain_qwen25", tmp_path / "run", edit_config=bidirectional)
    with pytest.raises(ValueError, match="only 'unidirectional'"):
        load_release(run, backbone_path=bases["qwen2_5_vl"])


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_full_size_layout_matches_the_authors_code(name, bases, tmp_path):
    """The released models at full size (Qwen2.5-VL-3B, Qwen3-VL-4B), built on the meta device:
    every tensor their code creates, by name and shape."""
    from twinbrain_ros.model.presets import backbone_config

    full = {"qwen25_gr00t": "qwen25_gr00t_bridge", "qwen3_gr00t": "qwen3_gr00t_bridge",
            "physbrain_qwen25": "physbrain_qwen25", "physbrain_qwen3": "physbrain_qwen3"}[name]
    theirs = json.loads((FIXTURES / "full_size" / f"{full}.json").read_text())
    base = tmp_path / "base"
    backbone_config(FAMILY[name], "full").save_pretrained(base)
    config = yaml.safe_load((FIXTURES / "full_size" / f"{full}.yaml").read_text())
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "steps_0_pytorch_model.pt").touch()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "dataset_statistics.json").write_text(
        (FIXTURES / name / "dataset_statistics.json").read_text())
    spec = read_release(run)
    added = {}  # the twin's Right Brain holds two added tokens (rows as in their layout)
    right = "qwen_vl_interface.trainable_vlm.model.model.language_model.embed_tokens.weight"
    if right in theirs:
        added[right] = torch.empty(theirs[right], device="meta")
    processor = QwenVLProcessor.from_pretrained(bases[FAMILY[name]])  # a tokenizer to extend
    with torch.device("meta"):
        model, _ = starvla._build(spec, base, added, processor, torch.float32)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    if spec.framework == "QwenGR00T":
        ours = {starvla.VLM_PREFIX + k[len("vlm."):] if k.startswith("vlm.") else k: v
                for k, v in ours.items()}
    assert sorted(set(theirs) - set(ours)) == []
    assert sorted(set(ours) - set(theirs)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


def test_adaptive_ensembling_weights_each_steps_predictions():
    ensembler = AdaptiveEnsembler(horizon=3, alpha=0.0)  # alpha 0: a plain mean
    first = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    second = np.array([[10.0, 0.0], [20.0, 0.0], [30.0, 0.0]])
    np.testing.assert_allclose(ensembler.add(first), [1.0, 0.0])
    # Now: the first chunk's action 1 (this step) and the second chunk's action 0.
    np.testing.assert_allclose(ensembler.add(second), [(2.0 + 10.0) / 2, 0.0])
    # With alpha, a prediction pointing the other way counts less than one that agrees.
    sharp = AdaptiveEnsembler(horizon=2, alpha=5.0)
    sharp.add(np.array([[0.0, 0.0], [-1.0, 0.0]]))
    mixed = sharp.add(np.array([[1.0, 0.0]]))
    w_same, w_other = np.exp(5.0), np.exp(-5.0)
    assert mixed[0] == pytest.approx((w_same * 1.0 - w_other) / (w_same + w_other))
    sharp.reset()
    np.testing.assert_allclose(sharp.add(np.array([[4.0, 1.0]])), [4.0, 1.0])


# -- through ROS --------------------------------------------------------------------------------

@pytest.mark.ros
@pytest.mark.slow
@pytest.mark.parametrize("name, release", [("qwen25_gr00t", "starVLA QwenGR00T"),
                                           ("physbrain_qwen25", "PhysBrain-VLA twin")])
def test_a_released_checkpoint_drives_the_policy_node_with_its_protocol(name, release, ros_env,
                                                                         tiny_backbones,
                                                                         tmp_path):
    from ros_harness import RobotSide, policy_node_process, times

    run = release_run(name, tmp_path / "run")
    robot = RobotSide("widowx")
    try:
        with robot.watch(policy_node_process(tmp_path / "node.log", "widowx", checkpoint=run,
                                             backbone_path=tiny_backbones["qwen2_5_vl"],
                                             seed=0)) as node:
            robot.spin_until(lambda: len(robot.dry_run) >= 3, 120,
                             "three dry-run trajectories", feed=True)
            assert "its authors' protocol replaces the loop settings" in node.text()
            # One ensembled action per inference: each plan reaches one control period ahead.
            assert all(times(t)[-1] <= robot.emb.dt + 1e-6 for t in robot.dry_run[:3])
            robot.spin_until(lambda: robot.values().get(keys.MODEL_RELEASE), 30,
                             "the release in the diagnostics", feed=True)
            assert robot.values()[keys.MODEL_RELEASE] == release
    finally:
        robot.close()


@pytest.mark.ros
@pytest.mark.slow
def test_a_policy_server_serves_a_release_with_its_protocol(ros_env, tiny_backbones, tmp_path):
    from ros_harness import RobotSide, ServerProcess, policy_node_process

    run = release_run("qwen25_gr00t", tmp_path / "run")
    with ServerProcess(run, tmp_path / "server.log", 0, "--backbone-path",
                       tiny_backbones["qwen2_5_vl"], "--embodiment", "widowx") as server:
        robot = RobotSide("widowx", watch=[server])
        try:
            with robot.watch(policy_node_process(tmp_path / "node.log", "widowx",
                                                 server=server.address)) as node:
                robot.spin_until(lambda: len(robot.dry_run) >= 2, 120,
                                 "two dry-run trajectories", feed=True)
                assert "its authors' protocol replaces the loop settings" in node.text()
        finally:
            robot.close()


def test_real_time_chunking_is_refused_for_a_release_at_start(bases, tmp_path):
    from twinbrain_ros.policy.config import PolicyConfig
    from twinbrain_ros.policy.pipeline import PolicyPipeline
    from twinbrain_ros.policy.release_runtime import ReleaseRuntime
    from twinbrain_ros.robot.embodiment import Embodiment

    widowx = Embodiment.resolve("widowx")
    runtime = ReleaseRuntime(str(release_run("qwen25_gr00t", tmp_path / "run")), widowx,
                             device="cpu", backbone_path=bases["qwen2_5_vl"])
    with pytest.raises(ValueError, match="chunk_transition rtc is not available"):
        PolicyPipeline(runtime, widowx, PolicyConfig(chunk_transition="rtc"))
    assert runtime.protocol["chunk_transition"] == "ensemble"


def test_a_release_for_another_robot_is_refused_before_its_weights_are_read(tmp_path):
    from twinbrain_ros.policy.release_runtime import ReleaseRuntime
    from twinbrain_ros.robot.embodiment import Embodiment

    run = release_run("qwen25_gr00t", tmp_path / "run")
    (run / "checkpoints" / "steps_0_pytorch_model.pt").write_bytes(b"not read")
    with pytest.raises(ReleaseError, match="robot 'gr1' takes joint_position"):
        ReleaseRuntime(str(run), Embodiment.resolve("gr1"), device="cpu")


def test_a_release_that_takes_the_robot_state_is_refused(tmp_path):
    from twinbrain_ros.policy.release_runtime import ReleaseRuntime
    from twinbrain_ros.robot.embodiment import Embodiment

    def with_state(config):
        config["datasets"]["vla_data"]["include_state"] = True

    run = release_run("qwen25_gr00t", tmp_path / "run", edit_config=with_state)
    with pytest.raises(ReleaseError, match="include_state: true"):
        ReleaseRuntime(str(run), Embodiment.resolve("widowx"), device="cpu")


def test_the_release_runtime_returns_bridge_actions_in_the_robot_units(bases, tmp_path):
    from twinbrain_ros.policy.release_runtime import ReleaseRuntime
    from twinbrain_ros.robot.embodiment import Embodiment
    from twinbrain_ros.robot.observation import Observation

    widowx = Embodiment.resolve("widowx")
    run = release_run("qwen25_gr00t", tmp_path / "run")
    runtime = ReleaseRuntime(str(run), widowx, device="cpu",
                             backbone_path=bases["qwen2_5_vl"], seed=3)
    frame = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    chunk = runtime.infer(Observation([frame], np.zeros(widowx.state_dim), "open the drawer"))
    stats = read_release(run).stats["oxe_bridge"]["action"]
    assert chunk.actions.shape == (16, 7)
    # Arm deltas inside the statistics' q01..q99, the gripper 0 or 1.
    assert np.all(chunk.actions[:, :6] >= np.array(stats["q01"][:6]) - 1e-9)
    assert np.all(chunk.actions[:, :6] <= np.array(stats["q99"][:6]) + 1e-9)
    assert set(np.unique(chunk.actions[:, 6])) <= {0.0, 1.0}
    again = runtime.infer(Observation([frame], np.zeros(widowx.state_dim), "open the drawer"))
    np.testing.assert_array_equal(chunk.actions, again.actions)  # the runtime's seed
    # Bridge deltas are our WidowX's action space: inverse kinematics turns them into joints.
    home = np.array([-0.01841, 0.03988, 0.22243, -0.0046, 1.36524, 0.00153, 0.037])
    targets = widowx.actions.decode(chunk.actions, home)  # cut where the chain leaves reach
    assert targets.shape[1] == widowx.state_dim and 1 <= len(targets) <= 16
    assert np.abs(targets[0, :6] - home[:6]).max() < 0.3
