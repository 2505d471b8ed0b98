"""The static-shape inference engine gives the eager path's answers, compiled or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import build_model, camera_frame

from twinbrain_ros.model.backbone import InstructionError
from twinbrain_ros.model.engine import InferenceEngine

pytestmark = pytest.mark.slow
INSTRUCTIONS = ("pick up the red cup",
                "put the green block on the yellow plate, then return to where you started")


def _model(backbone, **kwargs):
    """A tiny model whose actions depend on the brains.

    The action expert starts at zero (adaLN-Zero: its chunk is the initial noise, whatever
    the brains say); a perturbation makes every path's attention masks, positions and
    features show up in the actions.
    """
    model = build_model(backbone, **kwargs)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.action_expert.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _observation(model, cameras):
    spec = model.config.embodiments["arm"]
    state = np.random.default_rng(cameras).uniform(-1, 1, spec.state_dim).astype(np.float32)
    return [camera_frame(10 + k) for k in range(cameras)], state


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("brain_mode", ["twin", "single"])
@pytest.mark.parametrize("cameras", [1, 2])
def test_static_buckets_give_the_eager_actions(tiny_backbones, family, brain_mode, cameras):
    model = _model(tiny_backbones[family], brain_mode=brain_mode).eval()
    engine = InferenceEngine(model, num_cameras=cameras, token_budgets=(8, 32))
    images, state = _observation(model, cameras)
    for instruction in INSTRUCTIONS:  # the short one in the 8-token bucket, the long in 32
        eager = model.predict_action(images, instruction, state, "arm", seed=5)
        static = engine.predict_action(images, instruction, state, "arm", seed=5)
        np.testing.assert_allclose(static, eager, atol=1e-5)
    assert len(engine.buckets[0].layouts) == 1 and len(engine.buckets[1].layouts) == 1


def test_static_buckets_give_the_eager_actions_with_causal_left_visibility(tiny_backbones):
    model = _model(tiny_backbones["qwen3_vl"], left_visibility="causal").eval()
    engine = InferenceEngine(model, num_cameras=1, token_budgets=(8, 32))
    images, state = _observation(model, 1)
    for instruction in INSTRUCTIONS:
        eager = model.predict_action(images, instruction, state, "arm", seed=5)
        static = engine.predict_action(images, instruction, state, "arm", seed=5)
        np.testing.assert_allclose(static, eager, atol=1e-5)
    # And the visibility matters: "all" gives other actions for the same inputs.
    model.config.left_visibility = "all"
    other = model.predict_action(images, INSTRUCTIONS[1], state, "arm", seed=5)
    assert np.abs(other - eager).max() > 1e-4


# Every family, brain mode and camera count, with the compiler's cost (about a minute for the
# first, half that for the next with the shared cache, on two cores) paid four times, not eight.
@pytest.mark.xdist_group("inductor")  # one process: the compiler's warm state is reused
@pytest.mark.parametrize("family, brain_mode, cameras", [
    ("qwen2_5_vl", "twin", 1), ("qwen2_5_vl", "single", 2),
    ("qwen3_vl", "twin", 2), ("qwen3_vl", "single", 1)])
def test_the_compiled_engine_gives_the_eager_actions(tiny_backbones, family, brain_mode, cameras,
                                                     inductor_cache, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))
    before = set(inductor_cache.rglob("*"))
    model = _model(tiny_backbones[family], brain_mode=brain_mode).eval()
    engine = InferenceEngine(model, num_cameras=cameras, token_budgets=(32,), compile=True)
    assert engine.cache_dir == inductor_cache
    assert engine.warmup("arm") > 0 and engine.state == "compiled"
    assert engine.buckets[0].compiled and engine.buckets[0].compile_s > 0
    images, state = _observation(model, cameras)
    for instruction in INSTRUCTIONS:
        eager = model.predict_action(images, instruction, state, "arm", seed=9)
        compiled = engine.predict_action(images, instruction, state, "arm", seed=9)
        np.testing.assert_allclose(compiled, eager, atol=1e-4)
    assert set(inductor_cache.rglob("*")) - before, "inductor's cache is where it was told"


def test_bf16_static_actions_stay_within_one_percent_of_bf16_eager(tiny_backbones):
    model = _model(tiny_backbones["qwen3_vl"]).eval().to(torch.bfloat16)
    engine = InferenceEngine(model, num_cameras=1, token_budgets=(32,))
    images, state = _observation(model, 1)
    eager = model.predict_action(images, INSTRUCTIONS[0], state, "arm", seed=2)
    static = engine.predict_action(images, INSTRUCTIONS[0], state, "arm", seed=2)
    scale = np.abs(eager).max()
    assert np.abs(static - eager).max() <= 1e-2 * scale


def test_an_instruction_longer_than_the_largest_bucket_is_refused(tiny_backbones):
    model = _model(tiny_backbones["qwen2_5_vl"]).eval()
    engine = InferenceEngine(model, token_budgets=(4,))
    images, state = _observation(model, 1)
    engine.predict_action(images, "pick up", state, "arm", seed=0)
    with pytest.raises(InstructionError, match="takes 1[0-9] tokens; the largest inference "
                                               "bucket takes 4") as info:
        engine.predict_action(images, INSTRUCTIONS[1], state, "arm", seed=0)
    assert info.value.cause == "instruction_too_long"
    with pytest.raises(ValueError, match="built for 1 camera"):
        engine.predict_action(images * 2, "pick up", state, "arm", seed=0)


def test_a_compiler_that_fails_falls_back_to_the_same_answers(tiny_backbones, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    lines = []
    model = _model(tiny_backbones["qwen2_5_vl"]).eval()
    engine = InferenceEngine(model, token_budgets=(32,), compile=True, log=lines.append)
    engine.warmup("arm")
    assert engine.state.startswith("fallback: RuntimeError: no C++ compiler")
    assert any("running uncompiled" in line for line in lines)
    images, state = _observation(model, 1)
    np.testing.assert_allclose(engine.predict_action(images, "pick", state, "arm", seed=1),
                               model.predict_action(images, "pick", state, "arm", seed=1),
                               atol=1e-5)


def test_the_runtime_compiles_before_it_is_ready_and_falls_back_to_eager(tiny_backbones,
                                                                         tmp_path, monkeypatch):
    from helpers import save_policy_checkpoint

    from twinbrain_ros.policy.runtime import Observation, PolicyRuntime
    from twinbrain_ros.robot.embodiment import Embodiment

    gr1 = Embodiment.load("gr1")
    checkpoint = save_policy_checkpoint(tiny_backbones["qwen2_5_vl"], tmp_path / "gr1", gr1)
    assert PolicyRuntime(str(checkpoint), gr1, device="cpu").inference == "eager"  # auto on CPU

    def broken(*args, **kwargs):
        raise RuntimeError("inductor is unavailable")

    monkeypatch.setattr(torch, "compile", broken)
    lines = []
    runtime = PolicyRuntime(str(checkpoint), gr1, device="cpu", inference="compiled", seed=0,
                            max_instruction_tokens=48, log=lines.append)
    assert runtime.inference_state.startswith("fallback: RuntimeError: inductor is unavailable")
    assert runtime.identity["inference"] == runtime.inference_state
    assert [b.budget for b in runtime.engine.buckets] == [32, 48]
    assert any("inference engine ready" in line for line in lines)
    observation = Observation(images=[camera_frame(0)], instruction="pick up the cup",
                              state=np.clip(np.zeros(gr1.state_dim), gr1.lower, gr1.upper))
    chunk = runtime.infer(observation)
    assert chunk.actions.shape == (8, gr1.action_dim) and np.isfinite(chunk.actions).all()
