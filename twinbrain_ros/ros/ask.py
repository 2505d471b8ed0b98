"""Questions to the policy's frozen Left Brain, answered by the policy node without stopping it.

    ros2 topic pub --once /policy_node/ask std_msgs/msg/String "{data: 'What is on the table?'}"
    ros2 topic echo /policy_node/answer

A question on `~/ask` (std_msgs/String) is answered on `~/answer` (std_msgs/String holding
JSON): the question, the answer, the stamp(s) of the camera image(s) it is about (the newest
ones when its turn comes) and their age then, token count, how it ended and the time taken;
or, for a question that cannot be answered (empty, too long, holding the prompt's special
tokens, no camera image yet, a single-brain checkpoint, a queue of `MAX_PENDING` already
waiting), the same map with `ok: false` and an `error` naming the cause. The node goes on
either way.

With a local model, answering runs in the inference worker between two cycles: one slice per
gap, the prompt pass as one slice (in a gap long enough for it, see `work`), then at most
`ask_tokens_per_slice` tokens, fewer when the measured time per token says the next cycle would
start late. With a policy server the
question is forwarded to it over a second connection (the server slices the same way between
its batches), from a thread of its own. `/diagnostics` shows the effect on control: the model
latency and the period between cycles while an answer was being generated, next to the same
figures otherwise.
"""

from __future__ import annotations

import collections
import json
import threading
import time

import numpy as np
from std_msgs.msg import String

from ..errors import CausedError, refuse_long_text, shorten
from . import diagnostic_keys as keys

MAX_PENDING = 8          # questions held (the one being answered too); more: `busy`
SLICE_MARGIN = 0.8       # share of the time to the next cycle a slice may take
MAX_DEFERRALS = 5        # gaps a prompt pass waits for one long enough, then runs anyway


class QuestionDesk:
    """The policy node's `~/ask` -> `~/answer` service (see the module docstring)."""

    def __init__(self, node, max_question_tokens: int):
        """Attach to a `PolicyNode` (its runtime, inputs, loop, clock, parameters, logger)."""
        self.node = node
        self.max_question_tokens = max_question_tokens
        self.remote = hasattr(node.runtime, "ask")
        self.publisher = node.create_publisher(String, "~/answer", 10)
        self._lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self._current = None          # (question entry, Generation) being answered locally
        self._per_token_s = None      # measured decode time per token (moving average)
        self._prefill_s = None        # the last prompt pass's time
        self._deferred = 0            # gaps the next prompt pass has waited
        self._wake = threading.Event()
        self._thread = None
        self.questions = 0
        self.answered = 0
        self.refused = collections.Counter()
        self.slices: collections.deque = collections.deque(maxlen=200)  # slice seconds
        self.tokens = 0
        self.token_seconds = 0.0

    # -- receiving ------------------------------------------------------------------------------

    def on_question(self, msg: String) -> None:
        """Subscription callback: quick checks, then queue (never raises)."""
        try:
            self._receive(msg.data)
        except Exception as error:  # noqa: BLE001 - an executor callback must not end spin
            self.node.get_logger().error(f"~/ask failed: {type(error).__name__}: "
                                         f"{shorten(str(error), 300)}")

    def _receive(self, text: str) -> None:
        entry = {"question": text, "received": time.monotonic()}
        with self._lock:
            self.questions += 1
        try:
            refuse_long_text(text, self.max_question_tokens, "question", "max_question_tokens")
        except CausedError as error:
            self._refuse(entry, error)
            return
        if not text.strip():
            self._refuse(entry, CausedError("empty_question", "the question is empty"))
            return
        with self._lock:
            full = len(self._pending) + (self._current is not None) >= MAX_PENDING
            if not full:
                self._pending.append(entry)
        if full:
            self._refuse(entry, CausedError("busy", f"{MAX_PENDING} questions are already "
                                                    "waiting; ask again later"))
            return
        self.node.get_logger().info(f"question: {shorten(repr(text), 200)}")
        if self.remote:
            self._ensure_thread()
            self._wake.set()

    @property
    def waiting(self) -> bool:
        """Whether a question is queued or being answered."""
        return bool(self._pending) or self._current is not None

    # -- answering with a local model (the inference worker calls this between cycles) ---------

    def work(self, remaining_s: float) -> None:
        """Run one slice of the current answer, sized to the gap before the next cycle.

        `remaining_s`: wall-clock seconds to the next cycle. At least one token per call once
        an answer runs, so that answers progress when the model needs all of the replanning
        period. The prompt pass (about one Left Brain pass) cannot be split: it waits for a gap
        at least as long as it took last time (or as a chunk takes, before the first answer),
        but at most `MAX_DEFERRALS` gaps.
        """
        if self.remote or not self.waiting:
            return
        node = self.node
        if self._current is None and not self._begin(remaining_s):
            return
        entry, generation = self._current
        budget = int(node.params["ask_tokens_per_slice"])
        if not generation.prefill_s:
            budget = 1  # the prompt pass and the first token: a slice of its own
        elif self._per_token_s is None:
            budget = min(budget, 2)  # measure the time per token before trusting the budget
        else:
            budget = max(1, min(budget, int(remaining_s * SLICE_MARGIN / self._per_token_s)))
        started = time.perf_counter()
        try:
            made = generation.step(budget)
        except Exception as error:  # noqa: BLE001 - the robot goes on; the asker learns why
            with self._lock:
                self._current = None
            self._refuse(entry, CausedError("answer_failed", f"{type(error).__name__}: "
                                                             f"{shorten(str(error), 300)}"))
            return
        seconds = time.perf_counter() - started
        with self._lock:
            self.slices.append(seconds)
        if budget == 1 and len(generation.token_ids) == 1:
            self._prefill_s = generation.prefill_s
        elif made and generation.decode_s > 0 and len(generation.token_ids) > 1:
            per_token = generation.decode_s / (len(generation.token_ids) - 1)
            self._per_token_s = per_token if self._per_token_s is None else \
                0.7 * self._per_token_s + 0.3 * per_token
        if generation.done:
            with self._lock:
                self._current = None
            answer = generation.result()
            self._publish_answer(entry, answer.text, len(answer.token_ids), answer.finish,
                                 answer.prefill_s + answer.decode_s)

    def _begin(self, remaining_s: float) -> bool:
        """Start answering the next question, if the model and the gap allow it now."""
        node = self.node
        runtime = node.runtime
        try:
            if not hasattr(runtime, "start_answer"):
                raise CausedError("ask_unsupported", "this policy runtime cannot answer "
                                                     "questions")
            if hasattr(runtime, "answering_ready") and not runtime.answering_ready():
                return False  # the LM head is being read; the question waits
        except Exception as error:  # noqa: BLE001 - e.g. a single-brain checkpoint
            with self._lock:
                entry = self._pending.popleft() if self._pending else None
            if entry is not None:
                self._refuse(entry, error)
            return False
        estimate = self._prefill_s
        if estimate is None:
            latencies = [c["model_s"] for c in list(node.loop.cycles)]
            estimate = float(np.median(latencies)) if latencies else 0.0
        if remaining_s < estimate and self._deferred < MAX_DEFERRALS:
            self._deferred += 1
            return False
        self._deferred = 0
        with self._lock:
            entry = self._pending.popleft() if self._pending else None
        if entry is None:
            return False
        try:
            generation = runtime.start_answer(self._images(entry), entry["question"],
                                              int(node.params["ask_max_new_tokens"]))
        except Exception as error:  # noqa: BLE001 - a bad question is answered, not fatal
            self._refuse(entry, error)
            return False
        with self._lock:
            self._current = (entry, generation)
        return True

    def _images(self, entry: dict) -> list[np.ndarray]:
        """The newest frame of each camera, noted in `entry` with its stamp and age.

        Raises `no_image` if a camera has sent none yet.
        """
        node = self.node
        images = node.inputs.frames()
        topics = node.embodiment.image_topics
        missing = [t for t in topics if t not in images]
        if missing:
            raise CausedError("no_image", f"no image received yet on {', '.join(missing)}")
        entry["image_age_s"] = round(max(node.now() - images[t][1] for t in topics), 4)
        entry["images"] = {t: (images[t][0], images[t][2]) for t in topics}
        return [images[t][0] for t in topics]

    # -- answering through a policy server --------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve_remote, name="ask", daemon=True)
            self._thread.start()

    def _serve_remote(self) -> None:
        node = self.node
        while not node.shutting_down():
            with self._lock:
                entry = self._pending.popleft() if self._pending else None
                if entry is not None:
                    self._current = (entry, None)
            if entry is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                reply = node.runtime.ask(self._images(entry), entry["question"],
                                         int(node.params["ask_max_new_tokens"]))
                self._publish_answer(entry, str(reply["answer"]), int(reply["tokens"]),
                                     str(reply["finish"]), float(reply["server_s"]))
            except Exception as error:  # noqa: BLE001 - answered with the cause
                try:
                    self._refuse(entry, error)
                except Exception:  # noqa: BLE001, S110 - shutting down; the thread goes on
                    pass
            finally:
                with self._lock:
                    self._current = None

    # -- answers ------------------------------------------------------------------------------

    def _message(self, entry: dict, **fields) -> dict:
        images = entry.get("images") or {}
        stamps = {topic: stamp for topic, (_, stamp) in images.items()}
        return {"question": entry["question"], **fields,
                "image_stamp": max(stamps.values()) if stamps else None,
                "image_stamps": stamps, "image_age_s": entry.get("image_age_s"),
                "time_s": round(time.monotonic() - entry["received"], 4)}

    def _publish_answer(self, entry: dict, text: str, tokens: int, finish: str,
                        generation_s: float) -> None:
        message = self._message(entry, ok=True, answer=text, tokens=tokens, finish=finish,
                                generation_s=round(generation_s, 4), error=None)
        with self._lock:
            self.answered += 1
            self.tokens += tokens
            self.token_seconds += generation_s
        self._send(message)
        self.node.get_logger().info(f"answered {shorten(repr(entry['question']), 80)} in "
                                    f"{message['time_s']:.2f} s ({tokens} tokens)")

    def _refuse(self, entry: dict, error: Exception) -> None:
        cause = getattr(error, "cause", None) or "answer_failed"
        text = shorten(str(error) or type(error).__name__, 300)
        with self._lock:
            self.refused[cause] += 1
        self._send(self._message(entry, ok=False, answer="", tokens=0, finish="error",
                                 generation_s=0.0, error={"cause": cause, "message": text}))
        self.node.causes.log_limited(f"ask.{cause}", f"cannot answer "
                                                     f"{shorten(repr(entry['question']), 80)}: "
                                                     f"{text}", "warning", self.refused[cause])

    def _send(self, message: dict) -> None:
        if self.node.shutting_down():
            return
        self.publisher.publish(String(data=json.dumps(message)))

    # -- diagnostics ----------------------------------------------------------------------------

    def diagnostics(self, cycles: list[dict]) -> dict:
        """`ask.*` values for /diagnostics; `cycles`: the node's recent cycle records."""
        with self._lock:
            slices = list(self.slices)
            values = {keys.ASK_QUESTIONS_TOTAL: str(self.questions),
                      keys.ASK_ANSWERED_TOTAL: str(self.answered),
                      keys.ASK_PENDING: str(len(self._pending) + (self._current is not None)),
                      keys.ASK_ROUTE: "policy server" if self.remote else "between cycles"}
            for cause, count in sorted(self.refused.items()):
                values[keys.ask_refused(cause)] = str(count)
            if self.token_seconds > 0:
                values[keys.ASK_TOKENS_PER_S] = f"{self.tokens / self.token_seconds:.1f}"
        if slices:
            values[keys.ASK_SLICE_MEDIAN_MS] = f"{np.median(slices) * 1000:.1f}"
            values[keys.ASK_SLICE_MAX_MS] = f"{max(slices) * 1000:.1f}"
        # The effect on control: model latency and cycle period with and without answering.
        for answering in (True, False):
            chosen = [c for c in cycles if bool(c.get("asking")) == answering]
            if chosen:
                values[keys.ask_inference_latency_median_ms(answering)] = \
                    f"{np.median([c['model_s'] for c in chosen]) * 1000:.1f}"
            periods = [c["period_s"] for c in chosen if c.get("period_s")]
            if periods:
                values[keys.ask_cycle_period_median_ms(answering)] = \
                    f"{np.median(periods) * 1000:.1f}"
        return values
