"""starVLA's GR00T-style flow-matching action head, with the parameter names of its checkpoints.

Written from the facts of starVLA's `FlowmatchingActionHead` (GR00T N1.5 lineage) so that a
released Qwen-GR00T checkpoint loads by name:

- the sequence the DiT reads is `[state token?, future tokens, action tokens]`; the action
  tokens are `action_encoder(noisy actions, discrete time)` plus a learned position embedding;
- the flow time t in [0, 1) is discretised to `int(t * num_timestep_buckets)` for both the DiT's
  timestep embedding (sinusoid over 256 channels, cos first, then an MLP) and the action
  encoder's sinusoid;
- each DiT block: an adaptive LayerNorm (scale, shift from the timestep), attention (cross to
  the VLM's last hidden states, or self-attention on odd blocks when
  `interleave_self_attention`), an un-modulated LayerNorm and a tanh-GELU feed-forward; the
  output layer is modulated by (shift, scale) of the timestep;
- sampling: Euler steps from Gaussian noise at t = k / N, velocity read from the last `horizon`
  outputs of the action decoder.

No dropout at inference; training is not implemented here (their loss repeats each sample over
`repeated_diffusion_steps` noise draws and is a plain velocity MSE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# starVLA's DiT size table (`DiTConfig` of its action head).
DIT_SIZES = {
    "DiT-B": {"input_embedding_dim": 768, "attention_head_dim": 64, "num_attention_heads": 12},
    "DiT-L": {"input_embedding_dim": 1536, "attention_head_dim": 48, "num_attention_heads": 32},
}


@dataclass
class GR00THeadConfig:
    """The head's sizes, as a starVLA `framework.action_model` section gives them."""

    action_dim: int
    action_horizon: int
    cross_attention_dim: int
    state_dim: int = 0
    hidden_size: int = 1024
    num_attention_heads: int = 12
    attention_head_dim: int = 64
    num_layers: int = 16
    output_dim: int = 1024
    interleave_self_attention: bool = False
    add_pos_embed: bool = True
    max_seq_len: int = 1024
    num_target_vision_tokens: int = 32
    num_timestep_buckets: int = 1000
    num_inference_timesteps: int = 4
    attention_bias: bool = True
    norm_eps: float = 1e-5

    @property
    def width(self) -> int:
        """The DiT's token width (`input_embedding_dim`)."""
        return self.num_attention_heads * self.attention_head_dim


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The action encoder's encoding of times `t` (any shape): [sin | cos], 10000 base."""
    half = dim // 2
    # The same float32 operations in the same order as the checkpoints' code.
    rate = torch.log(torch.tensor(10000.0)) / half
    freqs = (-torch.arange(half, dtype=torch.float32) * rate).exp().to(t.device)
    angles = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def timestep_sinusoid(t: torch.Tensor, channels: int = 256) -> torch.Tensor:
    """The DiT's timestep projection: [cos | sin] with frequencies exp(-ln(1e4) k / (half-1))."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                        device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TwoLayerMLP(nn.Module):
    """layer2(relu(layer1(x))): the state encoder and the action decoder."""

    def __init__(self, inp: int, hidden: int, out: int):
        super().__init__()
        self.layer1 = nn.Linear(inp, hidden)
        self.layer2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., inp) -> (..., out)."""
        return self.layer2(F.relu(self.layer1(x)))


class ActionEncoder(nn.Module):
    """Noisy actions and their (discrete) time -> tokens: W3(swish(W2([W1 a, sinusoid(t)])))."""

    def __init__(self, action_dim: int, width: int):
        super().__init__()
        self.width = width
        self.layer1 = nn.Linear(action_dim, width)
        self.layer2 = nn.Linear(2 * width, width)
        self.layer3 = nn.Linear(width, width)

    def forward(self, actions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, T, action_dim) actions at discrete times (B,) -> (B, T, width) tokens."""
        a = self.layer1(actions)
        tau = sinusoid(t[:, None].expand(-1, actions.shape[1]), self.width).to(a.dtype)
        return self.layer3(F.silu(self.layer2(torch.cat([a, tau], dim=-1))))


class TimestepEncoder(nn.Module):
    """The DiT's timestep embedding (an MLP on the 256-channel projection)."""

    def __init__(self, width: int):
        super().__init__()
        self.timestep_embedder = nn.Module()
        self.timestep_embedder.linear_1 = nn.Linear(256, width)
        self.timestep_embedder.linear_2 = nn.Linear(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Discrete times (B,) -> (B, width)."""
        dtype = self.timestep_embedder.linear_1.weight.dtype
        emb = self.timestep_embedder.linear_1(timestep_sinusoid(t).to(dtype))
        return self.timestep_embedder.linear_2(F.silu(emb))


class AdaNorm(nn.Module):
    """LayerNorm without affine, then x * (1 + scale) + shift from the timestep embedding."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)
        self.eps = eps

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Normalize `x` (B, T, width) and modulate it by the timestep embedding (B, width)."""
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention with `to_q`, `to_k`, `to_v`, `to_out.0` (diffusers' names)."""

    def __init__(self, width: int, heads: int, head_dim: int, kv_dim: int, bias: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(width, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, width)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from `x` to `context` (itself when None); `mask` (B, S): true = attend."""
        context = x if context is None else context
        b = x.shape[0]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        if mask is not None:
            mask = mask.to(torch.bool)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim))


class GELUProj(nn.Module):
    """diffusers' GELU module: a projection then tanh-approximated GELU."""

    def __init__(self, inp: int, out: int):
        super().__init__()
        self.proj = nn.Linear(inp, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(proj(x))."""
        return F.gelu(self.proj(x), approximate="tanh")


class Block(nn.Module):
    """One DiT block: ada-norm, attention, residual; plain norm, feed-forward, residual."""

    def __init__(self, cfg: GR00THeadConfig, cross: bool):
        super().__init__()
        width = cfg.width
        self.cross = cross
        self.eps = cfg.norm_eps
        self.norm1 = AdaNorm(width, cfg.norm_eps)
        self.attn1 = Attention(width, cfg.num_attention_heads, cfg.attention_head_dim,
                               cfg.cross_attention_dim if cross else width, cfg.attention_bias)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GELUProj(width, 4 * width), nn.Identity(),
                                     nn.Linear(4 * width, width)])

    def forward(self, x, temb, context, mask):
        """One block on tokens `x` (B, T, width)."""
        h = self.norm1(x, temb)
        x = x + (self.attn1(h, context, mask) if self.cross else self.attn1(h))
        h = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return x + self.ff.net[2](self.ff.net[0](h))


class DiT(nn.Module):
    """The blocks, the timestep encoder and the modulated output projection."""

    def __init__(self, cfg: GR00THeadConfig):
        super().__init__()
        width = cfg.width
        self.timestep_encoder = TimestepEncoder(width)
        self.transformer_blocks = nn.ModuleList(
            Block(cfg, cross=not (cfg.interleave_self_attention and i % 2 == 1))
            for i in range(cfg.num_layers))
        self.proj_out_1 = nn.Linear(width, 2 * width)
        self.proj_out_2 = nn.Linear(width, cfg.output_dim)

    def forward(self, x, context, t, mask=None):
        """Tokens (B, T, width), VLM context, discrete times (B,) -> (B, T, output_dim)."""
        temb = self.timestep_encoder(t)
        for block in self.transformer_blocks:
            x = block(x, temb, context, mask)
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=1)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return self.proj_out_2(x)


class GR00TFlowHead(nn.Module):
    """The action head of a starVLA Qwen-GR00T checkpoint (`action_model.*`)."""

    def __init__(self, cfg: GR00THeadConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.model = DiT(cfg)
        self.state_encoder = (TwoLayerMLP(cfg.state_dim, cfg.hidden_size, width)
                              if cfg.state_dim else None)
        self.action_encoder = ActionEncoder(cfg.action_dim, width)
        self.action_decoder = TwoLayerMLP(cfg.output_dim, cfg.hidden_size, cfg.action_dim)
        self.future_tokens = nn.Embedding(cfg.num_target_vision_tokens, width)
        if cfg.add_pos_embed:
            self.position_embedding = nn.Embedding(cfg.max_seq_len, width)

    @torch.no_grad()
    def sample(self, context: torch.Tensor, noise: torch.Tensor,
               state: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               steps: int | None = None) -> torch.Tensor:
        """Integrate the flow from `noise` (B, horizon, action_dim) to normalized actions.

        `context`: the VLM's last hidden states (B, L, cross_attention_dim); `mask`: (B, L),
        true where a token is real; `state`: (B, 1, state_dim) or None (no state token).
        """
        cfg = self.cfg
        steps = int(steps or cfg.num_inference_timesteps)
        b, horizon = noise.shape[0], noise.shape[1]
        actions = noise
        prefix = [self.future_tokens.weight.unsqueeze(0).expand(b, -1, -1)]
        if state is not None:
            if self.state_encoder is None:
                raise ValueError("this checkpoint's action head takes no state (state_dim 0)")
            prefix.insert(0, self.state_encoder(state))
        for k in range(steps):
            t = torch.full((b,), int(k / float(steps) * cfg.num_timestep_buckets),
                           device=noise.device)
            tokens = self.action_encoder(actions, t)
            if cfg.add_pos_embed:
                tokens = tokens + self.position_embedding.weight[:horizon].unsqueeze(0)
            out = self.model(torch.cat([*prefix, tokens], dim=1), context, t, mask)
            velocity = self.action_decoder(out)[:, -horizon:]
            actions = actions + (1.0 / steps) * velocity
        return actions
