"""The Diffusion Transformer's parts: timestep embedding, attention, adaLN-Zero blocks.

`FlowMatchingActionExpert` (`action_expert.py`) stacks them: self-attention over the action
tokens and, every `cross_attention_every` blocks, cross-attention to the Right Brain's hidden
states, each block modulated (shift, scale, gate) by the flow timestep's embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a batch of scalar positions (Transformer / DDPM style).

    Args:
        t: Positions of shape ``(B,)``; any float values.
        dim: Embedding size.
        max_period: Controls the lowest frequency.

    Returns:
        Float32 tensor of shape ``(B, dim)``.
    """
    half = dim // 2
    # Always float32: bf16 cannot resolve the high-frequency phases of t * 1000.
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Apply a per-sample affine modulation ``x * (1 + scale) + shift`` over the token axis."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class TimestepEmbedder(nn.Module):
    """Maps flow time ``t`` in [0, 1] to a ``hidden_size`` conditioning vector."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256) -> None:
        """Create the embedder.

        Args:
            hidden_size: Output size.
            frequency_dim: Size of the intermediate sinusoidal embedding.
        """
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed ``t`` of shape ``(B,)`` into ``(B, hidden_size)``."""
        # Scale to [0, 1000] so the standard sinusoid frequencies (tuned for integer diffusion
        # steps) spread distinct t values across many phases.
        emb = sinusoidal_embedding(t * 1000.0, self.frequency_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head attention; self-attention by default, cross-attention when given a context."""

    def __init__(self, hidden_size: int, num_heads: int, context_dim: int | None = None) -> None:
        """Create the attention layer.

        Args:
            hidden_size: Width of the query tokens and of the output.
            num_heads: Number of heads.
            context_dim: Width of the key/value tokens; ``None`` means self-attention.
        """
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.is_cross = context_dim is not None
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.kv_proj = nn.Linear(
            context_dim if context_dim is not None else hidden_size, 2 * hidden_size
        )
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` to ``context`` (or to ``x`` itself).

        Args:
            x: Query tokens ``(B, L, hidden_size)``.
            context: Key/value tokens ``(B, S, context_dim)``; ``None`` for self-attention.
            key_mask: Boolean ``(B, S)``, True where a key may be attended to.
            kv: Keys and values already projected from ``context`` (see ``project_kv``).

        Returns:
            Tensor ``(B, L, hidden_size)``.
        """
        batch, length, width = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = kv if kv is not None else self.project_kv(x if context is None else context)
        # SDPA's boolean mask means "may attend"; broadcast it over heads and queries.
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, heads, S, head_dim)`` of ``source`` tokens."""
        batch, tokens, _ = source.shape
        k, v = (self.kv_proj(source).view(batch, tokens, 2, self.num_heads, self.head_dim)
                .permute(2, 0, 3, 1, 4))
        return k, v


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero timestep conditioning (Peebles & Xie, 2023)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        context_dim: int | None = None,
    ) -> None:
        """Create the block.

        Args:
            hidden_size: Token width.
            num_heads: Attention heads.
            mlp_ratio: MLP width multiplier.
            context_dim: Width of the cross-attention tokens; ``None`` for self-attention.
        """
        super().__init__()
        # Affine-free norms: the scale/shift come from the timestep instead.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, context_dim)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size),
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    @property
    def is_cross_attention(self) -> bool:
        """Whether this block attends to the VLM tokens rather than to the action tokens."""
        return self.attn.is_cross

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Action tokens ``(B, H, hidden_size)``.
            temb: Timestep embedding ``(B, hidden_size)``.
            context: Normed VLM tokens ``(B, S, cond_dim)``; used only by cross-attention blocks.
            key_mask: Boolean ``(B, S)`` validity mask of ``context``.
            context_kv: ``context`` already projected to keys/values by this block's
                attention (cross-attention blocks; reused across Euler steps).

        Returns:
            Updated action tokens ``(B, H, hidden_size)``.
        """
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(temb).chunk(6, -1)
        h = modulate(self.norm1(x), shift_a, scale_a)
        if self.is_cross_attention:
            h = self.attn(h, context, key_mask, kv=context_kv)
        else:
            h = self.attn(h)
        x = x + gate_a[:, None, :] * h
        h = self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x + gate_m[:, None, :] * h


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by a projection to the action space."""

    def __init__(self, hidden_size: int, action_dim: int) -> None:
        """Create the output layer.

        Args:
            hidden_size: Token width.
            action_dim: Output size per action step.
        """
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.proj = nn.Linear(hidden_size, action_dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Map tokens ``(B, H, hidden_size)`` to velocities ``(B, H, action_dim)``."""
        shift, scale = self.modulation(temb).chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


# --------------------------------------------------------------------------------------------
# The action expert
# --------------------------------------------------------------------------------------------
