"""Specification of the TwinBrainVLA model core, for both backbone families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FAMILIES, build_model, camera_frame, make_batch


def _loss(model, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return model.compute_loss(batch["inputs"], batch["state"], batch["state_mask"],
                              batch["embodiments"], batch["actions"], batch["action_mask"],
                              generator=gen)


def _left_output(model, batch):
    """The Left Brain's own final hidden states on the batch's prompts (stock forward)."""
    inputs = batch["inputs"]
    with torch.no_grad():
        out = model.left.vlm(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                             pixel_values=inputs.pixel_values,
                             image_grid_thw=inputs.image_grid_thw,
                             mm_token_type_ids=inputs.mm_token_type_ids)
    return out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_left_brain_never_changes_and_everything_else_trains(tiny_backbones, family):
    model = build_model(tiny_backbones[family])
    model.train()
    batch = make_batch(model)
    left_before = {k: v.clone() for k, v in model.left.state_dict().items()}
    left_out_before = _left_output(model, batch)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("left.") for n in trainable)
    assert any(n.startswith("right.vlm.language_model") for n in trainable)
    assert any(n.startswith("right.vlm.visual") for n in trainable)

    # No weight decay, so a parameter only moves if a gradient reached it.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=1e-3, weight_decay=0.0)
    for step in range(3):
        optimizer.zero_grad()
        _loss(model, batch, seed=step).backward()
        assert all(p.grad is None for p in model.left.parameters())
        optimizer.step()

    for name, before in left_before.items():
        assert torch.equal(model.left.state_dict()[name], before), name
    assert not model.left.training
    assert torch.equal(_left_output(model, batch), left_out_before)
    unchanged = [n for n, p in model.named_parameters()
                 if p.requires_grad and torch.equal(p.detach(), trainable[n])]
    assert unchanged == []
    for prefix in ("right.", "state_encoders.", "action_expert."):
        assert any(n.startswith(prefix) for n in trainable), prefix


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def _reference_attention(attn, x, position_embeddings, prefix_kv=None, prefix_valid=None,
                         valid=None):
    """Eager attention of one decoder layer written out; returns (output, (k, v))."""
    batch, length, _ = x.shape
    head_dim = attn.head_dim
    q = attn.q_proj(x).view(batch, length, -1, head_dim)
    k = attn.k_proj(x).view(batch, length, -1, head_dim)
    v = attn.v_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises queries and keys per head
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    own_kv = (k, v)
    # Allowed keys: own tokens causally and valid; all valid prefix (Left Brain) tokens.
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None] & valid[:, None, :]
    if prefix_kv is not None:
        k = torch.cat([prefix_kv[0], k], dim=2)
        v = torch.cat([prefix_kv[1], v], dim=2)
        prefix_allowed = prefix_valid[:, None, :].expand(-1, length, -1)
        allowed = torch.cat([prefix_allowed, allowed], dim=2)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = (probs @ v).transpose(1, 2).reshape(batch, length, -1)
    return attn.o_proj(out), own_kv


def _reference_decoder(lm, embeds, positions, valid, visual, deepstack, prefix_kvs=None,
                       prefix_valid=None):
    """Per-layer reference of a Qwen decoder; returns final hidden states and per-layer K/V."""
    h = embeds
    position_embeddings = lm.rotary_emb(h, positions)
    kvs = []
    for i, layer in enumerate(lm.layers):
        prefix = prefix_kvs[i] if prefix_kvs is not None else None
        attn_out, kv = _reference_attention(layer.self_attn, layer.input_layernorm(h),
                                            position_embeddings, prefix, prefix_valid, valid)
        kvs.append(kv)
        h = h + attn_out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if deepstack is not None and i < len(deepstack):
            h = h.clone()
            h[visual] = h[visual] + deepstack[i]
    return lm.norm(h), kvs


@pytest.mark.parametrize("family", FAMILIES)
def test_asymot_matches_per_layer_reference(tiny_backbones, family):
    model = build_model(tiny_backbones[family])
    model.eval()
    batch = make_batch(model)
    inputs = batch["inputs"]
    assert (inputs.attention_mask == 0).any(), "the batch must contain left padding"
    with torch.no_grad():
        hidden, mask = model.encode(inputs, batch["state"], batch["state_mask"],
                                    batch["embodiments"])

        positions = model.right.rope_index(inputs)
        valid = inputs.attention_mask.bool()
        visual = inputs.visual_mask
        left_img, left_ds = model.left.encode_images(inputs.pixel_values, inputs.image_grid_thw)
        _, left_kvs = _reference_decoder(
            model.left.vlm.language_model, model.left.embed(inputs.input_ids, left_img),
            positions, valid, visual, left_ds)

        right_img, right_ds = model.right.encode_images(inputs.pixel_values,
                                                        inputs.image_grid_thw)
        state_token = model.encode_state(batch["state"], batch["state_mask"],
                                         batch["embodiments"])
        right_embeds = torch.cat([model.right.embed(inputs.input_ids, right_img), state_token],
                                 dim=1)
        state_pos = positions.amax(dim=(0, 2)) + 1
        right_positions = torch.cat(
            [positions, state_pos.view(1, -1, 1).expand(3, -1, 1)], dim=2)
        right_valid = torch.cat([valid, torch.ones(valid.shape[0], 1, dtype=torch.bool)], dim=1)
        right_visual = torch.cat([visual, torch.zeros_like(right_valid[:, :1])], dim=1)
        expected, _ = _reference_decoder(
            model.right.vlm.language_model, right_embeds, right_positions, right_valid,
            right_visual, right_ds, prefix_kvs=left_kvs, prefix_valid=valid)

    assert torch.equal(mask, right_valid)
    diff = (hidden - expected).abs()[right_valid]
    assert diff.max().item() < 1e-4
    # The reference is sensitive: without the Left Brain's K/V it is far off.
    with torch.no_grad():
        alone, _ = _reference_decoder(model.right.vlm.language_model, right_embeds,
                                      right_positions, right_valid, right_visual, right_ds)
    assert (hidden - alone).abs()[right_valid].max().item() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_a_sample(tiny_backbones, family):
    model = build_model(tiny_backbones[family])
    model.eval()
    batch = make_batch(model)
    with torch.no_grad():
        hidden, mask = model.encode(batch["inputs"], batch["state"], batch["state_mask"],
                                    batch["embodiments"])
        alone = model.processor([[camera_frame(0)]], ["pick up the red can"])
        single, _ = model.encode(alone, batch["state"][:1], batch["state_mask"][:1],
                                 batch["embodiments"][:1])
    padded_sample = hidden[0][mask[0]]
    assert padded_sample.shape == single[0].shape
    assert (padded_sample - single[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("brain_mode", ["twin", "single"])
@pytest.mark.parametrize("family", FAMILIES)
def test_overfits_one_batch(tiny_backbones, family, brain_mode):
    model = build_model(tiny_backbones[family], brain_mode=brain_mode)
    model.train()
    batch = make_batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        loss = _loss(model, batch, seed=0)  # same noise and timesteps every step
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert min(losses) < losses[0] / 10, (losses[0], min(losses))


@pytest.mark.parametrize("brain_mode", ["twin", "single"])
@pytest.mark.parametrize("family", FAMILIES)
def test_predict_action_shape_finite_and_seeded(tiny_backbones, family, brain_mode):
    model = build_model(tiny_backbones[family], brain_mode=brain_mode)
    model.eval()
    images = [camera_frame(3, 120, 160)]
    state = np.linspace(-0.5, 0.5, 5)
    chunk = model.predict_action(images, "open the drawer", state, "arm", seed=7)
    horizon = model.config.action_expert.horizon
    assert chunk.shape == (horizon, 7)
    assert np.isfinite(chunk).all()
    again = model.predict_action(images, "open the drawer", state, "arm", seed=7)
    np.testing.assert_array_equal(chunk, again)
    other = model.predict_action(images, "open the drawer", state, "arm", seed=8)
    assert not np.allclose(chunk, other)
    assert (model.left is None) == (brain_mode == "single")


def test_predict_action_rejects_bad_input(tiny_backbones):
    model = build_model(tiny_backbones["qwen2_5_vl"], brain_mode="single")
    image = camera_frame(0)
    with pytest.raises(ValueError, match="state of shape"):
        model.predict_action([image], "go", np.zeros(3), "arm")
    with pytest.raises(ValueError, match="non-finite"):
        model.predict_action([image], "go", np.array([0, 0, np.nan, 0, 0]), "arm")
    with pytest.raises(KeyError, match="unknown embodiment"):
        model.predict_action([image], "go", np.zeros(5), "hexapod")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        model.predict_action([image[..., 0]], "go", np.zeros(5), "arm")


def test_state_token_reaches_the_action_chunk(tiny_backbones):
    model = build_model(tiny_backbones["qwen3_vl"])
    model.eval()
    # The expert starts as adaLN-zero (blocks are identity, output layer zero), so its output
    # ignores the conditioning until trained: stand in for training with a perturbation.
    with torch.no_grad():
        for p in model.action_expert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image = [camera_frame(0)]
    a = model.predict_action(image, "go", np.zeros(5), "arm", seed=0)
    b = model.predict_action(image, "go", np.ones(5) * 0.9, "arm", seed=0)
    assert not np.allclose(a, b)


def test_frozen_right_vision_shares_the_left_features(tiny_backbones):
    model = build_model(tiny_backbones["qwen3_vl"], freeze_right_vision=True)
    assert model.share_vision and model.right.vlm.visual is None
    assert not any(n.startswith("right.vlm.visual") for n, _ in model.named_parameters())
    chunk = model.predict_action([camera_frame(0)], "go", np.zeros(5), "arm", seed=0)
    assert chunk.shape == (model.config.action_expert.horizon, 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_backbones, family):
    plain = build_model(tiny_backbones[family], seed=3).train()
    checkpointed = build_model(tiny_backbones[family], seed=3).train()
    checkpointed.enable_activation_checkpointing()
    batch = make_batch(plain)
    loss_plain = _loss(plain, batch)
    loss_plain.backward()
    loss_ckpt = _loss(checkpointed, batch)
    loss_ckpt.backward()
    assert torch.allclose(loss_plain, loss_ckpt, atol=1e-6)
    grads = dict(checkpointed.named_parameters())
    compared = 0
    for name, p in plain.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, grads[name].grad, atol=1e-5), name
            compared += 1
    assert compared > 50


def test_left_cache_is_not_grown_by_the_right_brain(tiny_backbones):
    model = build_model(tiny_backbones["qwen3_vl"])
    batch = make_batch(model)
    inputs = batch["inputs"]
    positions = model.right.rope_index(inputs)
    image_embeds, deepstack = model.left.encode_images(inputs.pixel_values, inputs.image_grid_thw)
    cache = model.left_cache(inputs, positions, image_embeds, deepstack)
    length = cache.get_seq_length()
    assert length == inputs.input_ids.shape[1]
    with torch.no_grad():
        for _ in range(2):
            model.encode(inputs, batch["state"], batch["state_mask"], batch["embodiments"])
            embeds = model.right.embed(inputs.input_ids, image_embeds)
            model.right.decode(embeds, torch.cat([inputs.attention_mask] * 2, dim=1),
                               positions, past_key_values=cache,
                               visual_pos_masks=inputs.visual_mask, deepstack_embeds=deepstack)
    assert cache.get_seq_length() == length


def test_instructions_cannot_smuggle_image_tokens(tiny_backbones):
    model = build_model(tiny_backbones["qwen2_5_vl"], brain_mode="single")
    with pytest.raises(ValueError, match="must not contain '<\\|image_pad\\|>'"):
        model.predict_action([camera_frame(0)], "go <|image_pad|> now", np.zeros(5), "arm")


def test_positions_computed_ahead_give_the_same_hidden_states(tiny_backbones):
    model = build_model(tiny_backbones["qwen3_vl"]).eval()
    batch = make_batch(model)
    ahead = model.right.with_positions(batch["inputs"])
    assert ahead.position_ids is not None and batch["inputs"].position_ids is None
    with torch.no_grad():
        a, _ = model.encode(batch["inputs"], batch["state"], batch["state_mask"],
                            batch["embodiments"])
        b, _ = model.encode(ahead, batch["state"], batch["state_mask"], batch["embodiments"])
    assert torch.equal(a, b)


def test_several_flow_draws_per_sample_share_one_pass_of_the_brains(tiny_backbones):
    model = build_model(tiny_backbones["qwen2_5_vl"]).eval()  # no dropout: exact comparison
    batch = make_batch(model)
    samples, draws = batch["actions"].shape[0], 3
    expert = model.config.action_expert
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(samples * draws, expert.horizon, expert.action_dim, generator=gen)
    t = torch.rand(samples * draws, generator=gen)
    args = (batch["inputs"], batch["state"], batch["state_mask"], batch["embodiments"],
            batch["actions"], batch["action_mask"])
    calls = []
    encode = model.encode
    model.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    loss = model.compute_loss(*args, noise=noise, t=t, draws=draws)
    assert len(calls) == 1  # the brains ran once for all draws
    model.encode = encode
    # The same as each draw on its own (rows sample-major: sample i, draw k is row i*draws+k),
    # with the brains' conditioning computed once.
    with torch.no_grad():
        hidden, mask = model.encode(batch["inputs"], batch["state"], batch["state_mask"],
                                    batch["embodiments"])
        per_draw = [model.action_expert.loss(batch["actions"], batch["action_mask"], hidden,
                                             mask, noise=noise[k::draws], t=t[k::draws])
                    for k in range(draws)]
    assert torch.allclose(loss, torch.stack(per_draw).mean(), atol=1e-6)
    assert not torch.allclose(per_draw[0], per_draw[1])  # the draws differ
    loss.backward()  # one backward through the brains for all draws
    assert any(p.grad is not None for p in model.right.parameters())
    with pytest.raises(ValueError, match="draws"):
        model.compute_loss(*args, draws=0)


def test_causal_left_visibility_hides_later_left_tokens_from_a_right_token(tiny_backbones):
    # Two prompts that differ only in their last instruction token: with "causal" the Right
    # Brain's states before it cannot tell them apart (both brains are causal up to it); with
    # "all" every Right token sees the whole Left prompt, so they can.
    results = {}
    for visibility in ("all", "causal"):
        model = build_model(tiny_backbones["qwen2_5_vl"], left_visibility=visibility).eval()
        images = [[camera_frame(0)], [camera_frame(0)]]
        inputs = model.processor(images, ["pick up the red cup", "pick up the red can"])
        assert inputs.input_ids.shape[1] == inputs.attention_mask.sum(1).min()  # no padding
        differs = (inputs.input_ids[0] != inputs.input_ids[1]).nonzero()[:, 0]
        first = int(differs[0])
        state, mask = model.state_tensors(np.zeros((2, 5), dtype=np.float32), "arm")
        with torch.no_grad():
            hidden, _ = model.encode(inputs, state, mask, ["arm", "arm"])
        results[visibility] = (hidden[0, :first] - hidden[1, :first]).abs().max().item()
    assert results["causal"] < 1e-6
    assert results["all"] > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("autocast", [False, True])
def test_a_bf16_left_brain_gives_the_fp32_loss_and_gradients_within_bf16_rounding(
        tiny_backbones, family, autocast):
    # Full-size training holds the frozen Left Brain in bf16 next to fp32 Right weights; the
    # Left K/V then join the Right Brain's attention in the Right's dtype.
    reference = build_model(tiny_backbones[family])
    half = build_model(tiny_backbones[family]).cast_left(torch.bfloat16)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # an expert at its zero init would ignore the brains
        for a, b in zip(reference.action_expert.parameters(), half.action_expert.parameters(),
                        strict=True):
            a.add_(0.05 * torch.randn(a.shape, generator=generator))
            b.copy_(a)
    assert {p.dtype for p in half.left.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.right.parameters()} == {torch.float32}
    batch = make_batch(reference)
    results = []
    for model in (reference, half):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(model, batch)
        loss.backward()
        assert all(p.grad is None for p in model.left.parameters())
        grads = torch.cat([p.grad.flatten() for p in model.right.parameters()
                           if p.grad is not None])
        results.append((loss.detach(), grads))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert loss_b.dtype == torch.float32 and torch.isfinite(loss_b)
    torch.testing.assert_close(loss_b, loss_a, rtol=3e-2, atol=1e-3)
    cosine = torch.nn.functional.cosine_similarity(grad_a, grad_b, dim=0)
    assert cosine > 0.98, cosine
    if not autocast:
        # fp32 throughout but the Left weights: the difference is the Left's rounding alone.
        assert not torch.equal(loss_a, loss_b)
