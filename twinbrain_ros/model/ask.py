"""Ask the Left Brain: text answers from the frozen generalist VLM of a TwinBrainVLA.

The Left Brain is never trained, so it keeps the base checkpoint's visual-language skill. This
module lets an operator use it: a question about the robot's camera images is put in the
checkpoint's own chat template and answered by greedy decoding, the way transformers'
`generate(do_sample=False)` answers it with the base model (its generation config's end tokens
and repetition penalty included).

Nothing is loaded twice. The Left Brain's vision tower, embeddings and decoder layers are the
policy's own; only the language-model head is added, and it is computed for the last position
only: with tied embeddings (Qwen2.5-VL-3B, Qwen3-VL-4B) it is the embedding matrix itself,
otherwise `lm_head.weight` is read from the base checkpoint's safetensors once, when the first
question comes (in a background thread: see `LeftBrainAnswerer.head_ready`).

Generation runs in slices (`Generation.step(max_tokens)`): the policy node runs one slice
between two inference cycles, so that answering never stops the robot's control loop.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from ..errors import CausedError, refuse_long_text
from .backbone import BackboneError, InstructionError

DEFAULT_MAX_QUESTION_TOKENS = 256


class AskError(CausedError, ValueError):
    """A question that cannot be answered; `cause` says why (a key for logs and counters)."""


@dataclass
class Answer:
    """A finished (or stopped) answer."""

    question: str
    text: str
    token_ids: list[int]
    finish: str           # "eos" (the model ended its turn) or "length" (max_new_tokens)
    prefill_s: float      # prompt pass (vision tower + decoder) and first token
    decode_s: float       # all further tokens


def lm_head_weight(model, backbone_path: str | Path | None = None) -> torch.Tensor:
    """The Left Brain's language-model head (vocab, hidden), on its device and dtype.

    Tied embeddings: the input embedding matrix itself (no copy). Untied: `lm_head.weight`
    from the base checkpoint directory (`backbone_path`, default the model's own).
    """
    left = model.left
    embedding = left.vlm.get_input_embeddings().weight
    config = left.vlm.config
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(left.text_config, "tie_word_embeddings", False)
    if tied:
        return embedding
    path = Path(backbone_path or model.config.backbone_path)
    weight = _read_tensor(path, "lm_head.weight")
    if tuple(weight.shape) != tuple(embedding.shape):
        raise BackboneError(f"{path}: lm_head.weight has shape {tuple(weight.shape)}, the "
                            f"embeddings {tuple(embedding.shape)}")
    return weight.to(device=embedding.device, dtype=embedding.dtype)


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor from a (possibly sharded) safetensors checkpoint directory."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = [json.loads(index.read_text())["weight_map"].get(name)]
        files = [path / f for f in files if f]
    else:
        files = sorted(path.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            if name in handle.keys():  # noqa: SIM118 - safe_open has no __contains__
                return handle.get_tensor(name)
    raise BackboneError(f"the backbone checkpoint {path} has untied embeddings but no "
                        f"{name} in its safetensors files")


def generation_settings(backbone_path: str | Path, tokenizer) -> tuple[list[int], float]:
    """The end-token ids and the repetition penalty of the checkpoint's generation config.

    What transformers' greedy `generate` uses from `generation_config.json` (sampling settings
    do not apply to greedy decoding). Without the file: the tokenizer's end-of-text token and
    `<|im_end|>`, no penalty.
    """
    file = Path(backbone_path) / "generation_config.json"
    config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    ids = config.get("eos_token_id")
    if ids is None:
        ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = ids if isinstance(ids, list) else [ids]
    penalty = float(config.get("repetition_penalty") or 1.0)
    return sorted({int(i) for i in ids if i is not None}), penalty


class LeftBrainAnswerer:
    """Answers questions with a TwinBrainVLA's frozen Left Brain (see the module docstring)."""

    def __init__(self, model, max_question_tokens: int = DEFAULT_MAX_QUESTION_TOKENS):
        """Wrap a loaded twin-mode `TwinBrainVLA` (with its processor).

        Raises:
            AskError: `no_left_brain` for a single-brain model, whose only brain was trained
                for actions and no longer is the base VLM.
        """
        if model.left is None:
            raise AskError("no_left_brain", "this checkpoint has brain_mode 'single': there is "
                                            "no frozen Left Brain to answer questions")
        if model.processor is None:
            raise AskError("no_processor", "this model has no processor (built without a "
                                           "checkpoint dir)")
        self.model = model
        self.left = model.left
        self.processor = model.processor
        self.max_question_tokens = int(max_question_tokens)
        self.eos_ids, self.repetition_penalty = generation_settings(
            model.config.backbone_path, self.processor.tokenizer)
        self._head: torch.Tensor | None = None
        self._head_error: Exception | None = None
        self._loader: threading.Thread | None = None

    @property
    def head(self) -> torch.Tensor:
        """The LM head weight (read now if untied and not loaded yet)."""
        if self._head is None:
            if self._loader is not None:
                self._loader.join()
            if self._head_error is not None:
                raise self._head_error
            if self._head is None:
                self._head = lm_head_weight(self.model)
        return self._head

    def head_ready(self) -> bool:
        """Whether answering can start without reading weights; starts reading them if not.

        An untied head (about 1 GB in bf16 for a 7B/8B model) is read in a background thread,
        so that a control loop asking this between its cycles never waits for the disk. A
        failed read is raised by the next `start`.
        """
        if self._head is not None or self._head_error is not None:
            return True
        if self._loader is None:
            def load():
                try:
                    self._head = lm_head_weight(self.model)
                except Exception as error:  # noqa: BLE001 - raised by the next `start`
                    self._head_error = error

            self._loader = threading.Thread(target=load, name="lm_head", daemon=True)
            self._loader.start()
        return not self._loader.is_alive()

    def check_question(self, question: str) -> str:
        """The question stripped; `AskError` if empty, too long or holding special tokens."""
        if not isinstance(question, str):
            raise AskError("bad_question", "a question is a string")
        # Refused before any work on it, stripping included.
        refuse_long_text(question, self.max_question_tokens, "question", "max_question_tokens",
                         AskError)
        question = question.strip()
        if not question:
            raise AskError("empty_question", "the question is empty")
        try:
            self.processor.check_text(question, self.max_question_tokens, kind="question",
                                      limit_name="max_question_tokens")
        except InstructionError as error:
            raise AskError(error.cause, str(error)) from error
        return question

    def start(self, images: list[np.ndarray], question: str, max_new_tokens: int = 64
              ) -> Generation:
        """A generation for `question` about `images` (one HxWx3 uint8 frame per camera).

        Nothing runs yet: the first `step` runs the prompt. Raises `AskError` for a bad
        question or no images.
        """
        question = self.check_question(question)
        if not images:
            raise AskError("no_image", "a question needs at least one camera image")
        if max_new_tokens < 1:
            raise AskError("bad_max_new_tokens", "max_new_tokens must be at least 1")
        prompt = self.processor.chat_prompt(question, len(images))
        self.head  # noqa: B018 - the head (or the reason it cannot be read) before any work
        return Generation(self, list(images), question, prompt, int(max_new_tokens))

    def answer(self, images: list[np.ndarray], question: str, max_new_tokens: int = 64
               ) -> Answer:
        """Generate a whole answer at once."""
        generation = self.start(images, question, max_new_tokens)
        while not generation.done:
            generation.step(max_new_tokens)
        return generation.result()

    def logits(self, hidden: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """(1, hidden) final-norm state -> (1, vocab) float32 logits, penalised as `generate`.

        The score of every token in `seen` (prompt and answer so far) is divided by the
        repetition penalty where positive and multiplied by it where negative.
        """
        logits = torch.nn.functional.linear(hidden, self.head).float()
        if self.repetition_penalty != 1.0:
            scores = logits.gather(1, seen)
            scores = torch.where(scores < 0, scores * self.repetition_penalty,
                                 scores / self.repetition_penalty)
            logits = logits.scatter(1, seen, scores)
        return logits


@dataclass
class Generation:
    """One answer being generated greedily, a slice of tokens at a time."""

    answerer: LeftBrainAnswerer
    images: list[np.ndarray]
    question: str
    prompt: str
    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    finish: str = ""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    _cache: DynamicCache | None = None
    _length: int = 0          # tokens in the cache
    _position: int = 0        # M-RoPE position of the next token
    _seen: torch.Tensor | None = None  # (1, n) prompt and answer ids (repetition penalty)

    @property
    def done(self) -> bool:
        """Whether the answer is complete (an end token or `max_new_tokens`)."""
        return bool(self.finish)

    @torch.no_grad()
    def step(self, max_tokens: int) -> int:
        """Generate up to `max_tokens` more tokens; returns how many were generated.

        The first step runs the prompt (vision tower and all decoder layers) and yields the
        first token; it cannot be split.
        """
        made = 0
        if self._cache is None:
            start = time.perf_counter()
            self._prefill()
            self.prefill_s = time.perf_counter() - start
            made, max_tokens = 1, max_tokens - 1
        start = time.perf_counter()
        while not self.done and max_tokens > 0:
            self._next()
            made, max_tokens = made + 1, max_tokens - 1
        self.decode_s += time.perf_counter() - start
        return made

    def result(self) -> Answer:
        """The answer so far (complete once `done`)."""
        tokenizer = self.answerer.processor.tokenizer
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True).strip()
        return Answer(question=self.question, text=text, token_ids=list(self.token_ids),
                      finish=self.finish, prefill_s=self.prefill_s, decode_s=self.decode_s)

    def _prefill(self) -> None:
        answerer, left = self.answerer, self.answerer.left
        model = answerer.model
        inputs = answerer.processor.encode([self.images], [self.prompt])
        inputs = left.with_positions(inputs).to(model.device, model.dtype)
        image_embeds, deepstack = left.encode_images(inputs.pixel_values, inputs.image_grid_thw)
        embeds = left.embed(inputs.input_ids, image_embeds)
        self._cache = DynamicCache(config=left.text_config)
        hidden = left.decode(embeds, inputs.attention_mask, inputs.position_ids,
                             past_key_values=self._cache, visual_pos_masks=inputs.visual_mask,
                             deepstack_embeds=deepstack)
        self._length = inputs.input_ids.shape[1]
        # Text after the prompt continues from the prompt's largest M-RoPE position.
        self._position = int(inputs.position_ids.max()) + 1
        self._seen = inputs.input_ids
        self._append(answerer.logits(hidden[:, -1], self._seen))

    def _next(self) -> None:
        left, model = self.answerer.left, self.answerer.model
        token = torch.tensor([[self.token_ids[-1]]], device=model.device)
        embeds = left.vlm.get_input_embeddings()(token)
        self._length += 1
        mask = torch.ones(1, self._length, dtype=torch.long, device=model.device)
        positions = torch.full((3, 1, 1), self._position, dtype=torch.long, device=model.device)
        self._position += 1
        hidden = left.decode(embeds, mask, positions, past_key_values=self._cache)
        self._append(self.answerer.logits(hidden[:, -1], self._seen))

    def _append(self, logits: torch.Tensor) -> None:
        token = int(logits.argmax(dim=-1)[0])
        self.token_ids.append(token)
        self._seen = torch.cat([self._seen, self._seen.new_tensor([[token]])], dim=1)
        if token in self.answerer.eos_ids:
            self.finish = "eos"
        elif len(self.token_ids) >= self.max_new_tokens:
            self.finish = "length"
        if self.finish:
            # Free the K/V and inputs at once; the object may live on.
            self._cache, self._seen, self.images = DynamicCache(), None, []
