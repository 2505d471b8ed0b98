"""The fast inference path: TwinBrainVLA at batch 1 with static shapes, optionally compiled.

Eager inference (`TwinBrainVLA.predict_action`) grows a `DynamicCache` token by token, builds
masks from the cache on every call and dispatches every layer of both brains and every DiT
block of every Euler step from Python. At batch 1 on a GPU that is launch-bound. This engine
runs the same model with shapes fixed ahead:

- **Buckets.** The prompt (chat template, one vision block per camera, the instruction) is
  left-padded to a fixed token budget: the template and image tokens of a camera count are
  measured with the checkpoint's own processor, plus an instruction budget (`token_budgets`,
  e.g. 32 and 128 tokens). An instruction longer than the largest budget is refused
  (`InstructionError`, cause `instruction_too_long`).
- **Static Left K/V.** The Left Brain's keys/values are handed to the Right Brain through a
  cache object made inside the traced function (no growing cache, no in-place writes), and the
  attention masks of both passes are given as ready 4-D masks: [Left | Right] visibility, causal
  inside the Right Brain, left padding masked (a padded query sees only itself, so no row is
  empty). Positions (M-RoPE) and masks are computed on the CPU and cached per bucket and
  instruction length.
- **One function per bucket.** Vision towers, both brains, the state token and the whole Euler
  loop of the DiT are one function of tensors. With `compile=True` it goes through
  `torch.compile` (inductor; on CUDA with CUDA graphs, `mode="reduce-overhead"`). `warmup()`
  compiles and runs every bucket, timing each; a compile failure is reported and the engine
  runs the same static function uncompiled. Inductor's on-disk caches are kept under
  `TORCHINDUCTOR_CACHE_DIR` (default `~/.cache/twinbrain_ros/torchinductor`), so a restart
  recompiles from cache.

The answers are the eager path's: same seed, same noise, actions within 1e-4 in fp32 (tested
for both backbone families and brain modes, one and two cameras).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from .backbone import InstructionError
from .timing import NULL_TIMER
from .twinbrain import TwinBrainVLA

DEFAULT_TOKEN_BUDGETS = (32, 128)
CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_compile_cache() -> Path:
    """Where inductor keeps compiled kernels across restarts (unless the user chose a place).

    Torch's own default is a directory under /tmp (and torch writes it into the environment
    when it first uses it), which a reboot empties: that one is replaced by
    `$XDG_CACHE_HOME/twinbrain_ros/torchinductor` (`~/.cache/...`).
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get(CACHE_DIR_ENV)
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "twinbrain_ros" / "torchinductor"


class _LeftKV(Cache):
    """The Left Brain's per-layer K/V inside one traced call: kept, then prepended.

    Filling stores the tensors the Left pass produced (no copy, no in-place write); reading
    returns [Left K/V ; the Right layer's K/V] for the Right Brain's attention.
    """

    def __init__(self, num_layers: int, left_length: int):
        self.layers = [DynamicLayer() for _ in range(num_layers)]  # what mask helpers inspect
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers
        self.filling = True
        self.left_length = left_length

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        """Store (Left pass) or prepend the stored K/V (Right pass)."""
        if self.filling:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
            return key_states, value_states
        return (torch.cat([self.keys[layer_idx], key_states], dim=-2),
                torch.cat([self.values[layer_idx], value_states], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens before the current pass (0 while filling)."""
        return 0 if self.filling else self.left_length


@dataclass
class _Bucket:
    """One static shape: a camera count and a padded prompt length."""

    length: int
    budget: int
    function: object = None          # the (compiled) forward of this bucket
    compiled: bool = False
    compile_s: float | None = None   # first call (compile + run) during warm-up
    layouts: dict = field(default_factory=dict)  # prompt length -> positions and masks


class InferenceEngine:
    """Static-shape, optionally compiled TwinBrainVLA inference at batch 1 (module docstring).

    Attributes:
        state: "eager-static" (built, not compiled), "compiling", "compiled", or
            "fallback: <reason>" after a compile failure (then the static function runs
            uncompiled).
        warmup_s: seconds `warmup()` took (compile included), None before.
    """

    def __init__(self, model: TwinBrainVLA, num_cameras: int = 1,
                 token_budgets: tuple[int, ...] = DEFAULT_TOKEN_BUDGETS, compile: bool = False,
                 mode: str | None = None, log=None):
        """Measure the buckets of `num_cameras` cameras with the model's processor.

        Args:
            model: a loaded TwinBrainVLA (eval mode) with its processor.
            num_cameras: images per observation.
            token_budgets: instruction budgets in tokens; one bucket each.
            compile: run each bucket through `torch.compile` (at `warmup()` or first use).
            mode: torch.compile mode (default: "reduce-overhead" on CUDA, inductor's default
                on the CPU).
            log: called with progress lines (warm-up, compile times, fallbacks).
        """
        if model.processor is None or model.processor.image_size is None:
            raise ValueError("the inference engine needs a processor with a fixed image_size")
        if not token_budgets or min(token_budgets) < 1:
            raise ValueError(f"token_budgets must be positive, got {token_budgets}")
        self.model = model
        self.num_cameras = int(num_cameras)
        self.device = model.device
        self.compile = bool(compile)
        self.mode = mode if mode is not None else (
            "reduce-overhead" if self.device.type == "cuda" else None)
        self.log = log or (lambda text: None)
        processor = model.processor
        height, width = processor.image_size
        blank = [np.zeros((height, width, 3), dtype=np.uint8)] * self.num_cameras
        base = processor([blank], [""])
        self.template_tokens = int(base.input_ids.shape[1])
        self.image_grid_thw = base.image_grid_thw
        self.buckets = [_Bucket(length=self.template_tokens + int(b), budget=int(b))
                        for b in sorted(set(token_budgets))]
        text = model.right.text_config
        self._num_layers = text.num_hidden_layers
        self.state = "compiling" if self.compile else "eager-static"
        self.warmup_s: float | None = None
        if self.compile:
            # Per-block frames of the vision towers (their attention splits by image chunks on
            # the host) and each bucket are compiled once; torch's default limit of 8 per code
            # object would send the deeper towers back to eager.
            import torch._dynamo

            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 256)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4096)
            self.cache_dir = default_compile_cache()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ[CACHE_DIR_ENV] = str(self.cache_dir)

    # -- public --------------------------------------------------------------------------------

    @property
    def max_instruction_tokens(self) -> int:
        """The largest instruction (in tokens) a bucket takes."""
        return self.buckets[-1].budget

    def warmup(self, embodiment: str) -> float:
        """Compile (if asked) and run every bucket once; returns the seconds it took."""
        started = time.perf_counter()
        spec = self.model.config.embodiments[embodiment]
        height, width = self.model.processor.image_size
        images = [np.zeros((height, width, 3), dtype=np.uint8)] * self.num_cameras
        state = np.zeros(spec.state_dim, dtype=np.float32)
        for bucket in self.buckets:
            tick = time.perf_counter()
            instruction = " ".join(["go"] * max(1, bucket.budget - 2))
            try:
                self.predict_action(images, instruction, state, embodiment, seed=0,
                                    bucket=bucket)
            except InstructionError:  # a tokenizer that merges the filler: try it short
                self.predict_action(images, "go", state, embodiment, seed=0, bucket=bucket)
            bucket.compile_s = time.perf_counter() - tick
            self.log(f"inference bucket of {bucket.length} tokens ({self.num_cameras} camera(s), "
                     f"instruction up to {bucket.budget} tokens): ready in "
                     f"{bucket.compile_s:.1f} s" + (" (compiled)" if bucket.compiled else ""))
        if self.compile and not self.state.startswith("fallback"):
            self.state = "compiled"
        self.warmup_s = time.perf_counter() - started
        return self.warmup_s

    @torch.no_grad()
    def predict_action(self, images: list[np.ndarray], instruction: str, state: np.ndarray,
                       embodiment: str, seed: int | None = None, timer=None,
                       noise: torch.Tensor | None = None, bucket: _Bucket | None = None,
                       prefix=None) -> np.ndarray:
        """One action chunk (horizon, action_dim) in raw units, as `TwinBrainVLA.predict_action`.

        `prefix` (a `ChunkPrefix`): real-time chunking. The traced function always takes a
        prefix and its weights (zeros without one), so both kinds of chunk share one graph.

        Raises:
            InstructionError: the instruction does not fit the largest bucket.
            ValueError: wrong number of cameras, state shape or non-finite state.
        """
        model = self.model
        if len(images) != self.num_cameras:
            raise ValueError(f"the engine was built for {self.num_cameras} camera(s), got "
                             f"{len(images)} images")
        transforms = model.transforms(embodiment)
        padded, mask = model.state_tensors([state], embodiment)
        timer = timer or NULL_TIMER
        with timer("preprocess"):
            inputs = model.processor([list(images)], [instruction])
            length = int(inputs.input_ids.shape[1])
            bucket = bucket or self._bucket_for(length)
            layout = self._layout(bucket, inputs)
            pad = bucket.length - length
            input_ids = torch.cat([torch.full((1, pad), model.processor.pad_token_id,
                                              dtype=inputs.input_ids.dtype), inputs.input_ids],
                                  dim=1)
            device, dtype = self.device, model.dtype
            if noise is None:
                generator = (torch.Generator(device=device).manual_seed(seed)
                             if seed is not None else None)
                expert = model.config.action_expert
                noise = torch.randn((1, expert.horizon, expert.action_dim), device=device,
                                    dtype=torch.float32, generator=generator)
            guide, weights = (torch.from_numpy(a)[None] for a in transforms.prefix(prefix))
            args = (input_ids.to(device), inputs.pixel_values.to(device, dtype),
                    *(t.to(device) for t in layout),
                    padded.to(device), mask.to(device), noise.to(device),
                    guide.to(device), weights.to(device))
        with timer("model"):
            chunk = self._run(bucket, embodiment, args)
        return transforms.output(chunk[0].float().cpu().numpy())

    # -- internals -----------------------------------------------------------------------------

    def _bucket_for(self, length: int) -> _Bucket:
        for bucket in self.buckets:
            if length <= bucket.length:
                return bucket
        raise InstructionError(
            "instruction_too_long",
            f"the instruction takes {length - self.template_tokens} tokens; the largest "
            f"inference bucket takes {self.max_instruction_tokens}")

    def _layout(self, bucket: _Bucket, inputs) -> tuple[torch.Tensor, ...]:
        """Positions, visual masks and attention masks of a prompt length in a bucket."""
        length = int(inputs.input_ids.shape[1])
        if length > bucket.length:
            raise InstructionError("instruction_too_long", "the prompt exceeds its bucket")
        cached = bucket.layouts.get(length)
        if cached is not None:
            return cached
        L, pad = bucket.length, bucket.length - length
        model = self.model

        def left_pad(tensor, value):
            fill = torch.full((1, pad), value, dtype=tensor.dtype)
            return torch.cat([fill, tensor], dim=1)

        padded = replace(inputs, input_ids=left_pad(inputs.input_ids, 0),
                         attention_mask=left_pad(inputs.attention_mask, 0),
                         mm_token_type_ids=left_pad(inputs.mm_token_type_ids, 0),
                         position_ids=None)
        positions = model.right.rope_index(padded)                       # (3, 1, L)
        state_position = positions.amax(dim=(0, 2)) + 1
        right_positions = torch.cat([positions, state_position.view(1, 1, 1).expand(3, 1, 1)],
                                    dim=2)
        valid = padded.attention_mask[0].bool()
        right_valid = torch.cat([valid, torch.ones(1, dtype=torch.bool)])
        # Masks: True = may attend. A padded query attends to itself only (never an empty row).
        eye = torch.eye(L, dtype=torch.bool)
        left_mask = (torch.ones(L, L, dtype=torch.bool).tril() & (valid[None] | eye))
        eye_right = torch.eye(L + 1, dtype=torch.bool)
        right_self = (torch.ones(L + 1, L + 1, dtype=torch.bool).tril()
                      & (right_valid[None] | eye_right))
        left_block = valid[None].expand(L + 1, L)
        if model.config.left_visibility == "causal":  # Right token i: Left tokens 0..i
            below = torch.ones(L + 1, L, dtype=torch.bool).tril()
            below[L] = True  # the state token sees every Left token
            left_block = left_block & below
        right_mask = torch.cat([left_block, right_self], dim=1)
        visual = padded.visual_mask
        right_visual = torch.cat([visual, torch.zeros(1, 1, dtype=torch.bool)], dim=1)
        layout = (positions, right_positions, left_mask[None, None], right_mask[None, None],
                  right_self[None, None], right_valid[None], visual, right_visual)
        bucket.layouts[length] = layout
        return layout

    def _run(self, bucket: _Bucket, embodiment: str, args: tuple) -> torch.Tensor:
        if bucket.function is None:
            bucket.function = self._make_function(bucket, embodiment)
        try:
            return bucket.function(*args)
        except Exception as error:  # noqa: BLE001 - any compile or run failure: go uncompiled
            if not bucket.compiled:
                raise
            self.state = f"fallback: {type(error).__name__}: {str(error)[:200]}"
            self.log(f"compiled inference failed ({type(error).__name__}: "
                     f"{str(error)[:300]}); running uncompiled")
            for other in self.buckets:
                other.function, other.compiled = self._eager_function(embodiment), False
            return bucket.function(*args)

    def _make_function(self, bucket: _Bucket, embodiment: str):
        function = self._eager_function(embodiment)
        if not self.compile or self.state.startswith("fallback"):
            return function
        try:
            compiled = torch.compile(function, dynamic=False, mode=self.mode)
        except Exception as error:  # noqa: BLE001 - an unusable compiler is not fatal
            self.state = f"fallback: {type(error).__name__}: {str(error)[:200]}"
            self.log(f"torch.compile is unusable here ({error}); running uncompiled")
            return function
        bucket.compiled = True
        return compiled

    def _eager_function(self, embodiment: str):
        """The bucket's forward: vision, Left Brain, Right Brain, state token, Euler loop."""
        model = self.model
        left, right = model.left, model.right
        encoder = model.state_encoders[embodiment]
        expert = model.action_expert
        grid = self.image_grid_thw.to(self.device)
        steps = model.config.action_expert.num_inference_steps
        num_layers = self._num_layers
        left_meta = None if left is None else _to_device(left.vision_metadata(self.image_grid_thw),
                                                         self.device)
        right_meta = None if model.share_vision else _to_device(
            right.vision_metadata(self.image_grid_thw), self.device)

        def forward(input_ids, pixel_values, positions, right_positions, left_mask, right_mask,
                    right_self_mask, right_valid, visual, right_visual, state, state_mask,
                    noise, prefix, prefix_weights):
            cache = None
            if left is not None:
                left_images, left_deepstack = left.encode_images_traceable(pixel_values, grid,
                                                                           left_meta)
            if model.share_vision:
                images, deepstack = left_images, left_deepstack
            else:
                images, deepstack = right.encode_images_traceable(pixel_values, grid, right_meta)
            if left is not None:
                cache = _LeftKV(num_layers, input_ids.shape[1])
                left.decode(left.embed_unchecked(input_ids, left_images), left_mask, positions,
                            past_key_values=cache, visual_pos_masks=visual,
                            deepstack_embeds=left_deepstack, traceable=True)
                cache.filling = False
            embeds = right.embed_unchecked(input_ids, images)
            token = encoder(state.to(embeds.dtype), state_mask).unsqueeze(1).to(embeds.dtype)
            embeds = torch.cat([embeds, token], dim=1)
            hidden = right.decode(embeds, right_mask if cache is not None else right_self_mask,
                                  right_positions, past_key_values=cache,
                                  visual_pos_masks=right_visual, deepstack_embeds=deepstack,
                                  traceable=True)
            return expert.integrate(noise, hidden, right_valid, steps, prefix, prefix_weights)

        return forward


def _to_device(metadata: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in metadata.items()}
