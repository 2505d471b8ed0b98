"""Training: loss goes down, checkpoints load in the policy, DDP and resume are exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from waiting import wait_until

from twinbrain_ros.model.backbone import load_vlm
from twinbrain_ros.robot.embodiment import Embodiment
from twinbrain_ros.training import TrainConfig, checkpoint_dirs, load_config, train

pytestmark = pytest.mark.slow
GR1 = Embodiment.load("gr1")
IMAGE_KEY = "observation.images.camera"


@pytest.fixture(scope="module")
def gr1_dataset(tmp_path_factory):
    """Four short GR1 episodes whose actions depend on the image colour and the instruction."""
    from twinbrain_ros.data.lerobot import LeRobotWriter

    root = tmp_path_factory.mktemp("data") / "gr1"
    writer = LeRobotWriter(root, fps=GR1.control_rate_hz, embodiment=GR1,
                           image_keys=[IMAGE_KEY], version="v2.1", use_videos=False)
    rng = np.random.default_rng(0)
    for episode in range(4):
        length = 10
        side = 1.0 if episode % 2 else -1.0
        image = np.zeros((length, 32, 32, 3), dtype=np.uint8)
        image[..., 0 if side > 0 else 2] = 200
        start = rng.uniform(-0.2, 0.2, GR1.state_dim)
        steps = np.arange(length)[:, None]
        state = np.clip(start + 0.02 * side * steps, GR1.lower, GR1.upper)
        action = np.clip(state + 0.02 * side, GR1.lower, GR1.upper)
        writer.add_episode({IMAGE_KEY: image}, state.astype(np.float32),
                           action.astype(np.float32),
                           task="reach right" if side > 0 else "reach left")
    return writer.finalize()


def _config(backbone, data, out, **overrides) -> TrainConfig:
    values = dict(backbone_path=backbone, datasets=[{"path": str(data), "embodiment": "gr1"}],
                  output_dir=str(out), horizon=4, image_size=[56, 56],
                  action_expert={"hidden_size": 32, "num_layers": 2, "num_heads": 2},
                  batch_size=4, steps=30, lr_right=1e-4, lr_expert=1e-3, warmup_steps=2,
                  save_every=10, keep_last=2, num_workers=0, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def _overrides(config: TrainConfig) -> list[str]:
    """The config as command-line key=value overrides."""
    from dataclasses import asdict

    return [f"{k}={json.dumps(v)}" for k, v in asdict(config).items()]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def _free_port() -> int:
    """A TCP port nobody listens on now (tests in parallel processes each get their own)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(config: TrainConfig, nproc: int = 1, wait: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "twinbrain_ros.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port", str(_free_port()), "-m", "twinbrain_ros.train"]
    proc = subprocess.Popen(cmd + _overrides(config), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def test_short_run_lowers_the_loss_and_the_policy_loads_it(tiny_backbones, gr1_dataset,
                                                          tmp_path):
    from twinbrain_ros.policy.runtime import Observation, PolicyRuntime

    config = _config(tiny_backbones["qwen2_5_vl"], gr1_dataset, tmp_path / "run", steps=100,
                     lr_expert=3e-3, lr_right=3e-4, warmup_steps=5, save_every=25)
    last = train(config)
    assert last == checkpoint_dirs(config.output_dir)[-1]
    # keep_last=2: older checkpoints are gone.
    assert [p.name for p in checkpoint_dirs(config.output_dir)] == ["step_00000075",
                                                                      "step_00000100"]
    losses = torch.load(last / "training_state.pt", weights_only=False)["losses"]
    assert len(losses) == 100
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:10]), losses
    assert (Path(config.output_dir) / "tensorboard").is_dir()

    runtime = PolicyRuntime(str(last), GR1, device="cpu", seed=0)
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    chunk = runtime.infer(Observation(images=[image], state=np.zeros(GR1.state_dim),
                                      instruction="reach left"))
    assert chunk.actions.shape == (4, GR1.state_dim) and np.isfinite(chunk.actions).all()
    # The statistics the policy uses are the ones computed from the training data.
    assert runtime.model.norm_stats["gr1"].action.mode == "min_max"


@pytest.mark.parametrize("strategy,left_dtype", [("ddp", "fp32"), ("fsdp", "fp32"),
                                                 ("fsdp", "bf16")])
def test_two_processes_match_one_with_the_same_global_batch(tiny_backbones, gr1_dataset,
                                                            tmp_path, strategy, left_dtype):
    # bf16: the frozen Left Brain held in bf16 beside fp32 trained weights, sharded apart.
    one = _config(tiny_backbones["qwen2_5_vl"], gr1_dataset, tmp_path / "one", steps=4,
                  batch_size=4, save_every=4, left_dtype=left_dtype)
    two = _config(tiny_backbones["qwen2_5_vl"], gr1_dataset, tmp_path / "two", steps=4,
                  batch_size=2, save_every=4, strategy=strategy, left_dtype=left_dtype)
    _run(one)
    _run(two, nproc=2)
    a = _weights(checkpoint_dirs(one.output_dir)[-1])
    b = _weights(checkpoint_dirs(two.output_dir)[-1])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # Training moved the Right Brain away from the backbone it started from.
    base = load_vlm(tiny_backbones["qwen2_5_vl"]).state_dict()
    moved = [n for n in base if not torch.equal(a[f"right.vlm.{n}"], base[n])]
    assert len(moved) > len(base) // 2


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tiny_backbones, gr1_dataset,
                                                            tmp_path):
    # With a moving average of the weights and two flow-matching draws per sample: the
    # average resumes too.
    steps = 24
    options = dict(steps=steps, save_every=4, ema_decay=0.9, flow_draws_per_sample=2)
    straight = _config(tiny_backbones["qwen2_5_vl"], gr1_dataset, tmp_path / "straight",
                       **options)
    killed = _config(tiny_backbones["qwen2_5_vl"], gr1_dataset, tmp_path / "killed",
                     **options)
    _run(straight)

    proc = _run(killed, wait=False)
    def saved_step_8():
        done = checkpoint_dirs(killed.output_dir)
        return (done and int(done[-1].name.split("_")[1]) >= 8) or proc.poll() is not None

    wait_until(saved_step_8, 300, "the checkpoint of step 8",
               show=lambda: [d.name for d in checkpoint_dirs(killed.output_dir)])
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = int(checkpoint_dirs(killed.output_dir)[-1].name.split("_")[1])
    assert 8 <= interrupted_at < steps

    killed.resume = True
    out = _run(killed)
    assert "resuming from" in out and f"at step {interrupted_at}" in out
    a = _weights(checkpoint_dirs(straight.output_dir)[-1])
    b = _weights(checkpoint_dirs(killed.output_dir)[-1])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    ema_a = load_file(str(checkpoint_dirs(straight.output_dir)[-1] / "ema.safetensors"))
    ema_b = load_file(str(checkpoint_dirs(killed.output_dir)[-1] / "ema.safetensors"))
    assert ema_a.keys() == ema_b.keys() and len(ema_a) > 50
    for name in ema_a:
        torch.testing.assert_close(ema_a[name], ema_b[name], rtol=0, atol=1e-6, msg=name)
    la = torch.load(checkpoint_dirs(straight.output_dir)[-1] / "training_state.pt",
                    weights_only=False)["losses"]
    lb = torch.load(checkpoint_dirs(killed.output_dir)[-1] / "training_state.pt",
                    weights_only=False)["losses"]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_dataset_problems_stop_before_the_first_step(tiny_backbones, gr1_dataset, tmp_path):
    widowx_data = [{"path": str(gr1_dataset), "embodiment": "widowx"}]
    config = _config(tiny_backbones["qwen2_5_vl"], gr1_dataset, tmp_path / "bad",
                     datasets=widowx_data)
    with pytest.raises(ValueError, match="widowx"):
        train(config)
    assert checkpoint_dirs(config.output_dir) == []


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("steps: 10\naction_expert: {hidden_size: 64}\n")
    config = load_config(str(path), ["steps=20", "action_expert.num_layers=3",
                                     "datasets=[{path: /d, embodiment: gr1}]"])
    assert config.steps == 20
    assert config.action_expert == {"hidden_size": 64, "num_layers": 3}
    assert config.datasets[0].embodiment == "gr1"
    with pytest.raises(ValueError, match="unknown training config keys"):
        load_config(None, ["stepz=3"])
    with pytest.raises(ValueError, match="strategy"):
        load_config(None, ["strategy=horovod"])


def test_a_mixture_of_two_embodiments_trains(tiny_backbones, gr1_dataset, tmp_path):
    from twinbrain_ros.data.lerobot import LeRobotWriter
    from twinbrain_ros.model.checkpoint import read_norm_stats

    widowx = Embodiment.load("widowx")
    root = tmp_path / "widowx_data"
    writer = LeRobotWriter(root, fps=widowx.control_rate_hz, embodiment=widowx,
                           image_keys=[IMAGE_KEY], version="v3.0", use_videos=False)
    rng = np.random.default_rng(1)
    for _ in range(2):
        state = np.clip(rng.normal(0, 0.2, (8, 7)), widowx.lower, widowx.upper)
        action = np.concatenate([rng.normal(0, 0.01, (8, 6)), rng.integers(0, 2, (8, 1))], 1)
        writer.add_episode({IMAGE_KEY: np.full((8, 32, 32, 3), 90, np.uint8)},
                           state.astype(np.float32), action.astype(np.float32),
                           task="put the spoon on the towel")
    writer.finalize()
    datasets = [{"path": str(gr1_dataset), "embodiment": "gr1", "weight": 1.0},
                {"path": str(root), "embodiment": "widowx", "weight": 1.0}]
    config = _config(tiny_backbones["qwen3_vl"], gr1_dataset, tmp_path / "mix",
                     datasets=datasets, steps=6, save_every=6)
    last = train(config)
    weights = _weights(last)
    for key in ("gr1", "widowx"):
        assert any(n.startswith(f"state_encoders.{key}.") for n in weights), key
    stats = read_norm_stats(last)
    assert stats["widowx"].action.mode == "q01_q99" and stats["widowx"].action.binary == [6]
    assert stats["gr1"].action.mode == "min_max"


def test_resume_skips_a_corrupt_checkpoint_and_removes_half_written_ones(
        tiny_backbones, gr1_dataset, tmp_path, capsys):
    config = _config(tiny_backbones["qwen2_5_vl"], gr1_dataset, tmp_path / "run", steps=12,
                     save_every=4, keep_last=3)
    train(config)
    done = checkpoint_dirs(config.output_dir)
    assert [p.name for p in done] == ["step_00000004", "step_00000008", "step_00000012"]
    # A kill inside a checkpoint write leaves a temporary directory; a disk error flips a bit
    # of the newest checkpoint's weights.
    stale = done[-1].parent / ".step_00000016.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    data = bytearray((done[-1] / "model.safetensors").read_bytes())
    data[-50] ^= 0xFF
    (done[-1] / "model.safetensors").write_bytes(bytes(data))
    capsys.readouterr()

    config.resume, config.steps = True, 16
    last = train(config)
    out = capsys.readouterr().out
    assert f"removed {stale}" in out and not stale.exists()
    assert f"checkpoint {done[-1]} is unusable" in out and "SHA-256" in out
    assert f"resuming from {done[-2]} at step 8" in out
    assert last.name == "step_00000016"
    # Training went on from step 8: the rewritten step 12 is a complete, valid checkpoint.
    from twinbrain_ros.model.checkpoint import verify_weights

    for directory in checkpoint_dirs(config.output_dir):
        verify_weights(directory)


def test_config_values_are_converted_to_the_field_types_or_refused_by_name():
    config = load_config(None, ["lr_right=1e-4", "steps=100.0", "resume=true",
                                "betas=[0.9, '0.99']", "datasets=[{path: /d, embodiment: gr1, "
                                "weight: 2}]"])
    assert config.lr_right == 1e-4 and isinstance(config.lr_right, float)
    assert config.steps == 100 and isinstance(config.steps, int)
    assert config.resume is True and config.betas == [0.9, 0.99]
    assert config.datasets[0].weight == 2.0
    # The frozen Left Brain follows the compute precision unless told otherwise.
    from twinbrain_ros.training.distributed import Dist, left_dtype

    cpu, cuda = Dist(device=torch.device("cpu")), Dist(device=torch.device("cuda"))
    assert left_dtype(config, cpu) == torch.float32 and left_dtype(config, cuda) == torch.bfloat16
    assert left_dtype(load_config(None, ["left_dtype=bf16"]), cpu) == torch.bfloat16
    assert left_dtype(load_config(None, ["left_dtype=fp32"]), cuda) == torch.float32
    for bad, key in [("steps=1.5", "steps"), ("lr_expert=fast", "lr_expert"),
                     ("resume=sometimes", "resume"), ("betas=0.9", "betas"),
                     ("datasets=[{path: /d}]", "datasets"), ("left_dtype=fp16", "left_dtype")]:
        with pytest.raises(ValueError, match=key):
            load_config(None, [bad])


def test_config_train_yaml_documents_every_key_and_loads():
    from dataclasses import fields

    from twinbrain_ros.robot.embodiment import config_dir

    path = config_dir() / "train.yaml"
    document = yaml.safe_load(path.read_text())
    assert set(document) == {f.name for f in fields(TrainConfig)}
    config = load_config(str(path), ["backbone_path=/ckpt"])
    assert config == TrainConfig(backbone_path="/ckpt")


def test_flow_draws_of_two_ranks_are_the_single_process_draws():
    from twinbrain_ros.model.action_expert import ActionExpertConfig, FlowMatchingActionExpert
    from twinbrain_ros.training.distributed import Dist
    from twinbrain_ros.training.loop import flow_draws

    class Model:
        action_expert = FlowMatchingActionExpert(ActionExpertConfig(
            action_dim=8, horizon=4, hidden_size=32, num_layers=1, num_heads=2), cond_dim=16)

    config = TrainConfig(backbone_path="/ckpt", batch_size=2, horizon=4, max_action_dim=8,
                         flow_draws_per_sample=3)
    noise, t = flow_draws(config, 7, Dist(), Model())
    assert noise.shape == (6, 4, 8) and t.shape == (6,)
    config.batch_size = 1  # the same global batch over two processes
    parts = [flow_draws(config, 7, Dist(rank=r, world=2), Model()) for r in (0, 1)]
    assert torch.equal(torch.cat([p[0] for p in parts]), noise)
    assert torch.equal(torch.cat([p[1] for p in parts]), t)
    # One draw per sample: the draws of the runs before the option existed.
    config = TrainConfig(backbone_path="/ckpt", batch_size=2, horizon=4, max_action_dim=8,
                         flow_draws_per_sample=1)
    one, _ = flow_draws(config, 7, Dist(), Model())
    generator = torch.Generator().manual_seed(7)
    Model.action_expert.sample_timesteps(2, device="cpu", generator=generator)
    assert torch.equal(one, torch.randn((2, 4, 8), generator=generator))


def test_the_moving_average_is_saved_and_used_for_inference(tiny_backbones, gr1_dataset,
                                                          tmp_path):
    from twinbrain_ros.model.checkpoint import CheckpointError, load_checkpoint

    config = _config(tiny_backbones["qwen2_5_vl"], gr1_dataset, tmp_path / "ema", steps=6,
                     save_every=6, ema_decay=0.5)
    last = train(config)
    raw, ema = _weights(last), load_file(str(last / "ema.safetensors"))
    name = "action_expert.final_layer.proj.weight"
    assert not torch.equal(raw[name], ema[name])  # the average lags the weights
    assert set(ema) <= set(raw) and len(ema) > 50  # the trainable weights
    averaged = load_checkpoint(last)
    assert torch.equal(averaged.state_dict()[name], ema[name])
    assert torch.equal(load_checkpoint(last, use_ema=False).state_dict()[name], raw[name])
    # A flipped bit in the average is named, as in the weights.
    data = bytearray((last / "ema.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (last / "ema.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ema.safetensors is corrupt"):
        load_checkpoint(last)


def test_the_average_warms_up_then_decays_as_configured():
    from twinbrain_ros.training.loop import WeightAverage

    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    average = WeightAverage(layer, decay=0.9)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average.update()  # decay min(0.9, 2/11)
    assert average.state_dict()["weight"].item() == pytest.approx(1 - 2 / 11)
    for _ in range(100):
        average.update()
    assert average.state_dict()["weight"].item() == pytest.approx(1.0, abs=1e-4)
    assert average.updates == 101


def test_resuming_with_other_flow_draws_is_refused():
    from twinbrain_ros.training.checkpoints import check_resumable

    config = TrainConfig(backbone_path="/ckpt", flow_draws_per_sample=4)
    check_resumable(config, {"config": {"flow_draws_per_sample": 4}})
    with pytest.raises(ValueError, match="flow_draws_per_sample=1"):
        check_resumable(config, {"config": {}})  # saved before the option existed: 1
