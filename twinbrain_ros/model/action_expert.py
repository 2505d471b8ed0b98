"""Diffusion Transformer (DiT) action expert trained with flow matching.

The expert turns VLM hidden states into a chunk of ``horizon`` future actions, in the style of
the GR00T / starVLA action heads.

Flow-matching convention used throughout this module:

* ``t`` runs from 0 to 1. ``t = 0`` is pure Gaussian noise, ``t = 1`` is the clean
  (normalised) action chunk.
* The probability path is the straight line ``x_t = (1 - t) * noise + t * actions``, so the
  velocity the network must predict is constant along a path: ``v = actions - noise``.
* Training draws ``t = (s - u) / s`` with ``u ~ Beta(alpha, beta)`` (clamped to [0, 1]).
  With the default ``alpha > beta`` this puts more weight on the noisy end, where predicting
  the velocity is hardest. ``s`` slightly below 1 keeps a sliver of noise in the cleanest
  samples.
* Inference integrates ``dx/dt = v(x, t)`` with explicit Euler steps from ``t = 0``
  (``x = noise``) to ``t = 1``.
* Real-time chunking (RTC, Black et al. 2025, "Real-Time Execution of Action Chunking Flow
  Policies"): when the robot is still executing the previous chunk while the next one is
  sampled, the sampler inpaints the part of the new chunk that overlaps the previous plan. At
  each Euler step the clean chunk the step points at, ``x1 = x + (1 - t) v``, is pulled towards
  the previous plan ``p`` by per-action weights ``w``: ``v <- v + w (p - x1) / (1 - t)``. With
  ``w = 1`` the step lands on the straight path to ``p`` (the final step lands on ``p`` itself:
  the actions that execute while the model runs are reproduced exactly); smaller weights let the
  model depart from the old plan where it has had time to see something new. Since every action
  token attends to the others, the free actions follow from the inpainted ones. The weights
  (`twinbrain_ros.transforms.rtc.rtc_weights`) are 1 over the frozen prefix, ramp down over the
  rest of the overlap and are 0 after it. This is the guidance-free form of the paper's inpainting
  (no Jacobian through the network): with 4 Euler steps it costs nothing measurable.

Architecture: per-step MLP action encoder plus learned positional embedding, a sinusoidal
timestep embedding, a stack of adaLN-Zero DiT blocks that alternate between cross-attention to
the (LayerNormed) VLM tokens and bidirectional self-attention over the action tokens, and an
adaLN'd output projection. All attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from .dit import DiTBlock, FinalLayer, TimestepEmbedder

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class ActionExpertConfig:
    """Hyper-parameters of :class:`FlowMatchingActionExpert`.

    Attributes:
        action_dim: Padded maximum action dimension across embodiments.
        horizon: Number of actions per predicted chunk.
        hidden_size: DiT width.
        num_layers: Number of DiT blocks.
        num_heads: Attention heads per block; must divide ``hidden_size``.
        cross_attention_every: Block ``i`` cross-attends to the VLM tokens when
            ``i % cross_attention_every == 0``, otherwise it self-attends over the action tokens.
        mlp_ratio: Width multiplier of the per-block MLP.
        num_inference_steps: Default number of Euler steps in :meth:`~FlowMatchingActionExpert.
            sample`.
        timestep_beta_alpha: ``alpha`` of the Beta distribution for training timesteps.
        timestep_beta_beta: ``beta`` of the Beta distribution for training timesteps.
        timestep_s: Scale ``s`` in ``t = (s - u) / s``.
    """

    action_dim: int = 32
    horizon: int = 16
    hidden_size: int = 768
    num_layers: int = 16
    num_heads: int = 12
    cross_attention_every: int = 2
    mlp_ratio: float = 4.0
    num_inference_steps: int = 4
    timestep_beta_alpha: float = 1.5
    timestep_beta_beta: float = 1.0
    timestep_s: float = 0.999

    def __post_init__(self) -> None:
        """Validate the configuration so that mistakes fail at construction time."""
        for name in (
            "action_dim",
            "horizon",
            "hidden_size",
            "num_layers",
            "num_heads",
            "cross_attention_every",
            "num_inference_steps",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.timestep_beta_alpha <= 0 or self.timestep_beta_beta <= 0:
            raise ValueError("timestep_beta_alpha and timestep_beta_beta must be > 0")
        if not 0.0 < self.timestep_s <= 1.0:
            raise ValueError(f"timestep_s must be in (0, 1], got {self.timestep_s}")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dictionary of the configuration."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActionExpertConfig:
        """Build a configuration from a dictionary produced by :meth:`to_dict`.

        Args:
            data: Mapping from field name to value. Missing fields take their defaults.

        Returns:
            The configuration.

        Raises:
            ValueError: If ``data`` contains keys that are not configuration fields; silently
                dropping them would hide typos in config files.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ActionExpertConfig keys: {unknown}")
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class FlowMatchingActionExpert(nn.Module):
    """DiT that predicts the flow-matching velocity of an action chunk given VLM tokens.

    Example:
        >>> cfg = ActionExpertConfig(action_dim=7, horizon=8, hidden_size=64, num_layers=2,
        ...                          num_heads=4)
        >>> expert = FlowMatchingActionExpert(cfg, cond_dim=48)
        >>> cond, mask = torch.randn(2, 5, 48), torch.ones(2, 5, dtype=torch.bool)
        >>> expert.sample(cond, mask).shape
        torch.Size([2, 8, 7])
    """

    def __init__(self, config: ActionExpertConfig, cond_dim: int) -> None:
        """Build the expert.

        Args:
            config: Hyper-parameters.
            cond_dim: Width of the VLM hidden states used as cross-attention keys/values.
        """
        super().__init__()
        if cond_dim < 1:
            raise ValueError(f"cond_dim must be >= 1, got {cond_dim}")
        self.config = config
        self.cond_dim = cond_dim
        hidden = config.hidden_size

        self.action_encoder = nn.Sequential(
            nn.Linear(config.action_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, config.horizon, hidden))
        self.time_embedder = TimestepEmbedder(hidden)
        # VLM hidden states can have large, layer-dependent magnitudes; normalise them once
        # here rather than in every cross-attention block.
        self.cond_norm = nn.LayerNorm(cond_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(
                hidden,
                config.num_heads,
                config.mlp_ratio,
                context_dim=cond_dim if i % config.cross_attention_every == 0 else None,
            )
            for i in range(config.num_layers)
        )
        self.final_layer = FinalLayer(hidden, config.action_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        def _init_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_init_linear)
        nn.init.normal_(self.pos_embed, std=0.02)
        for layer in (self.time_embedder.mlp[0], self.time_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: all gates/shifts/scales start at zero so each block is the identity and
        # the untrained expert predicts zero velocity; training opens the residual branches.
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        nn.init.zeros_(self.final_layer.modulation[-1].weight)
        nn.init.zeros_(self.final_layer.modulation[-1].bias)
        nn.init.zeros_(self.final_layer.proj.weight)
        nn.init.zeros_(self.final_layer.proj.bias)

    @property
    def _dtype(self) -> torch.dtype:
        return self.pos_embed.dtype

    @property
    def _device(self) -> torch.device:
        return self.pos_embed.device

    # ---------------------------------------------------------------------------- forward

    def forward(
        self,
        noisy_actions: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the velocity ``d x_t / d t`` at ``(x_t, t)``.

        Inputs are cast to the parameter dtype internally.

        Args:
            noisy_actions: ``x_t`` of shape ``(B, H, action_dim)`` with ``H <= horizon``.
            t: Flow time of shape ``(B,)`` (or a scalar), in [0, 1]; 0 is pure noise.
            cond: VLM hidden states ``(B, S, cond_dim)``.
            cond_mask: Boolean ``(B, S)``, True for valid tokens.

        Returns:
            Predicted velocity ``(B, H, action_dim)`` in the dtype of ``noisy_actions``.

        Raises:
            ValueError: On shape mismatches or if a sample has no valid cond token.
        """
        batch, steps, action_dim = noisy_actions.shape
        if action_dim != self.config.action_dim:
            raise ValueError(f"noisy_actions last dim {action_dim} != {self.config.action_dim}")
        if steps > self.config.horizon:
            raise ValueError(f"noisy_actions has {steps} steps > horizon {self.config.horizon}")
        key_mask = self._check_cond(cond, cond_mask, batch)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")

        return self._velocity(noisy_actions, t, self.cond_norm(cond.to(self._dtype)), key_mask)

    def _velocity(self, noisy_actions: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  key_mask: torch.Tensor, context_kv: list | None = None) -> torch.Tensor:
        """The network itself, on checked inputs and already-normed context (no host sync).

        ``context_kv`` holds each cross-attention block's keys/values of the context: they do
        not depend on ``t`` or ``x``, so sampling projects them once per chunk.
        """
        steps = noisy_actions.shape[1]
        x = self.action_encoder(noisy_actions.to(self._dtype)) + self.pos_embed[:, :steps]
        temb = self.time_embedder(t)
        context_kv = context_kv or [None] * len(self.blocks)
        for block, kv in zip(self.blocks, context_kv, strict=True):
            x = block(x, temb, context, key_mask, context_kv=kv)
        return self.final_layer(x, temb).to(noisy_actions.dtype)

    def context_kv(self, context: torch.Tensor) -> list:
        """Per block: the cross-attention keys/values of the normed context, or None."""
        return [block.attn.project_kv(context) if block.is_cross_attention else None
                for block in self.blocks]

    def _check_cond(self, cond: torch.Tensor, cond_mask: torch.Tensor, batch: int) -> torch.Tensor:
        """Validate the conditioning and return the mask as bool."""
        if cond.ndim != 3 or cond.shape[0] != batch or cond.shape[2] != self.cond_dim:
            raise ValueError(
                f"cond must have shape ({batch}, S, {self.cond_dim}), got {tuple(cond.shape)}"
            )
        if cond_mask.shape != cond.shape[:2]:
            raise ValueError(
                f"cond_mask shape {tuple(cond_mask.shape)} != cond shape {tuple(cond.shape[:2])}"
            )
        key_mask = cond_mask.to(device=cond.device, dtype=torch.bool)
        # A row with no valid key would make SDPA softmax over nothing and return NaN.
        empty = ~key_mask.any(dim=1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(f"cond_mask has no valid token in batch rows {rows}")
        return key_mask

    # ---------------------------------------------------------------------------- training

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw training flow times ``t = (s - u) / s`` with ``u ~ Beta(alpha, beta)``.

        Args:
            batch_size: Number of timesteps.
            device: Device of the result; defaults to the parameters' device. Must match the
                device of ``generator`` if one is given.
            generator: Optional generator for reproducible draws.

        Returns:
            Float32 tensor ``(batch_size,)`` in [0, 1], skewed towards 0 (noisier) by default.
        """
        device = self._device if device is None else torch.device(device)
        cfg = self.config
        beta = torch.distributions.Beta(
            torch.tensor(cfg.timestep_beta_alpha, device=device),
            torch.tensor(cfg.timestep_beta_beta, device=device))
        if generator is None:
            u = beta.sample((batch_size,))
        else:
            # torch's Beta sampler only reads the global RNG: seed a forked one from `generator`.
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            cuda = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):
                torch.manual_seed(seed)
                u = beta.sample((batch_size,))
        return ((cfg.timestep_s - u) / cfg.timestep_s).clamp(0.0, 1.0)

    def loss(
        self,
        actions: torch.Tensor,
        action_mask: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow-matching loss: masked MSE between predicted and straight-path velocity.

        Draws ``t`` first and then ``noise`` from ``generator`` (unless given).

        Args:
            actions: Normalised target chunk ``(B, H, action_dim)``.
            action_mask: Bool or 0/1 mask broadcastable to ``actions``; False marks padded
                action dims and steps past the episode end.
            cond: VLM hidden states ``(B, S, cond_dim)``.
            cond_mask: Boolean ``(B, S)``, True for valid tokens.
            generator: Optional generator for ``t`` and ``noise``.
            noise: Optional fixed noise ``(B, H, action_dim)``.
            t: Optional fixed flow times ``(B,)``.

        Returns:
            Float32 scalar: the squared error averaged over each sample's valid entries, then
            over the samples with any valid entry (0 if there are none).
        """
        mask = action_mask.to(device=actions.device, dtype=torch.bool).expand_as(actions)
        # Zero the padded entries so that whatever they contain cannot leak into x_t, and
        # hence into the valid predictions, nor receive gradient.
        target_actions = torch.where(mask, actions.to(torch.float32), 0.0)
        batch = actions.shape[0]
        if t is None:
            t = self.sample_timesteps(batch, actions.device, generator)
        t = t.to(device=actions.device, dtype=torch.float32)
        if noise is None:
            noise = torch.randn(
                actions.shape, device=actions.device, dtype=torch.float32, generator=generator
            )
        noise = noise.to(device=actions.device, dtype=torch.float32)

        t_b = t[:, None, None]
        x_t = (1.0 - t_b) * noise + t_b * target_actions
        target_velocity = target_actions - noise
        pred = self(x_t, t, cond, cond_mask)
        # torch.where rather than multiplying by the mask: a non-finite padded prediction
        # would otherwise turn the loss into NaN.
        sq_err = torch.where(mask, (pred - target_velocity).square(), 0.0)
        # Mean per sample, then over the samples that have any valid entry: a batch split across
        # data-parallel ranks then averages to the same loss as the whole batch.
        per_sample = sq_err.sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp_min(1)
        valid = mask.flatten(1).any(dim=1)
        return per_sample.sum() / valid.sum().clamp_min(1)

    # ---------------------------------------------------------------------------- inference

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        num_steps: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        prefix: torch.Tensor | None = None,
        prefix_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate an action chunk by Euler-integrating the velocity field from t=0 to t=1.

        Args:
            cond: VLM hidden states ``(B, S, cond_dim)``.
            cond_mask: Boolean ``(B, S)``, True for valid tokens.
            num_steps: Number of equal Euler steps; defaults to
                ``config.num_inference_steps``.
            noise: Optional starting point ``(B, horizon, action_dim)``.
            generator: Generator for the starting noise when ``noise`` is None.
            prefix: Real-time chunking: the previous plan ``(B, horizon, action_dim)`` in
                normalised units (anything where the weights are 0).
            prefix_weights: Its inpainting weights, broadcastable to the prefix (see
                `rtc_weights`); both or neither.

        Returns:
            Float32 normalised action chunk ``(B, horizon, action_dim)``. The state is kept in
            float32 even for a bf16 model so that the Euler sum does not lose precision.
        """
        steps = self.config.num_inference_steps if num_steps is None else int(num_steps)
        if steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {steps}")
        batch = cond.shape[0]
        shape = (batch, self.config.horizon, self.config.action_dim)
        if noise is None:
            noise = torch.randn(
                shape, device=cond.device, dtype=torch.float32, generator=generator
            )
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        x = noise.to(device=cond.device, dtype=torch.float32)
        key_mask = self._check_cond(cond, cond_mask, batch)
        if (prefix is None) != (prefix_weights is None):
            raise ValueError("prefix and prefix_weights go together")
        if prefix is not None:
            if tuple(prefix.shape) != shape:
                raise ValueError(f"prefix must have shape {shape}, got {tuple(prefix.shape)}")
            prefix = prefix.to(device=cond.device, dtype=torch.float32)
            prefix_weights = torch.broadcast_to(
                prefix_weights.to(device=cond.device, dtype=torch.float32), shape)
        return self.integrate(x, cond, key_mask, steps, prefix, prefix_weights)

    def integrate(self, x: torch.Tensor, cond: torch.Tensor, key_mask: torch.Tensor,
                  steps: int, prefix: torch.Tensor | None = None,
                  prefix_weights: torch.Tensor | None = None) -> torch.Tensor:
        """`steps` Euler steps from noise `x` (float32) on checked conditioning; no host sync.

        With `prefix` and `prefix_weights` (float32, the shape of `x`), each step is guided
        towards the prefix (real-time chunking, see the module docstring); where a weight is 1
        the result is the prefix exactly, where all are 0 the plain sampler's. The whole loop is
        one traceable function (the compiled inference engine captures it).
        """
        # Norm the conditioning and project its keys/values once per chunk, not once per step.
        context = self.cond_norm(cond.to(self._dtype))
        context_kv = self.context_kv(context)
        dt = 1.0 / steps
        for i in range(steps):
            t = torch.full((x.shape[0],), i * dt, device=x.device, dtype=torch.float32)
            velocity = self._velocity(x, t, context, key_mask, context_kv)
            if prefix is not None:
                remaining = 1.0 - i * dt
                clean = x + remaining * velocity
                velocity = velocity + prefix_weights * (prefix - clean) / remaining
            x = x + dt * velocity
        if prefix is not None:
            x = torch.where(prefix_weights >= 1.0, prefix, x)
        return x
