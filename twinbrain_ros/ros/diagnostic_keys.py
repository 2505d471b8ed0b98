"""The names in the policy node's `/diagnostics` status, written once.

The node, its question desk and whoever reads the status (tests, `benchmarks/`, a dashboard)
use these names; nothing here imports rclpy. Every value is a string, as `KeyValue` carries it.
"""

from __future__ import annotations

STATUS_NAME = "twinbrain_ros: policy_node"  # DiagnosticStatus.name of the policy node

# The model and the cycle.
INFERENCE_LATENCY_MEDIAN_MS = "inference_latency_median_ms"
INFERENCE_LATENCY_P95_MS = "inference_latency_p95_ms"
CYCLE_OVERHEAD_MEDIAN_MS = "cycle_overhead_median_ms"  # the node's time beyond the model
ACHIEVED_RATE_HZ = "achieved_rate_hz"                  # chunks per second over the last 10 s
CHUNKS_TOTAL = "chunks_total"
HOLDS_TOTAL = "holds_total"
LAST_ERROR = "last_error"                              # "cause: text" of the last failed cycle
CHUNK_TRANSITION = "chunk_transition"                  # blend or rtc
RTC_EXPECTED_LATENCY_S = "rtc_expected_latency_s"      # rtc only
PLAN_LEFT_TOTAL = "plan_left_total"                    # times the robot left the commanded plan
PLAN_LEFT_LAST = "plan_left_last"

# The worker and the operator.
WORKER_ALIVE = "worker_alive"
WORKER_RESTARTS = "worker_restarts"
WORKER_IDLE_S = "worker_idle_s"
OPERATOR_HOLD = "operator_hold"
ACTUATION_ENABLED = "actuation_enabled"
EMBODIMENT = "embodiment"

# What the runtime says of itself (`identity`), each key prefixed with "model.": a local
# checkpoint's path and inference mode, or a policy server's address, link state and round trip.
MODEL_PREFIX = "model."
MODEL_CHECKPOINT = MODEL_PREFIX + "checkpoint"
MODEL_INFERENCE = MODEL_PREFIX + "inference"
MODEL_SERVER = MODEL_PREFIX + "server"
MODEL_LINK = MODEL_PREFIX + "link"                     # connecting, connected, "down: <cause>"
MODEL_RTT_MEDIAN_MS = MODEL_PREFIX + "rtt_median_ms"   # after the first round trip
MODEL_RELEASE = MODEL_PREFIX + "release"               # a released checkpoint's origin

# Questions to the Left Brain (`~/ask`).
ASK_QUESTIONS_TOTAL = "ask.questions_total"
ASK_ANSWERED_TOTAL = "ask.answered_total"
ASK_PENDING = "ask.pending"
ASK_ROUTE = "ask.route"                                # "between cycles" or "policy server"
ASK_TOKENS_PER_S = "ask.tokens_per_s"
ASK_SLICE_MEDIAN_MS = "ask.slice_median_ms"
ASK_SLICE_MAX_MS = "ask.slice_max_ms"


def rejected(cause: str) -> str:
    """How often an input or a cycle was refused for `cause` (at most MAX_CAUSES + 1 keys)."""
    return f"rejected.{cause}"


def input_silent_s(topic: str) -> str:
    """Seconds since the input `topic` last delivered a message ("never" before the first)."""
    return f"input.{topic}.silent_s"


def input_resubscribed(topic: str) -> str:
    """How often the subscription of the silent input `topic` was recreated."""
    return f"input.{topic}.resubscribed"


def model(key: str) -> str:
    """The runtime's `identity[key]`."""
    return MODEL_PREFIX + key


def ask_refused(cause: str) -> str:
    """How many questions were refused for `cause`."""
    return f"ask.refused.{cause}"


def ask_inference_latency_median_ms(answering: bool) -> str:
    """The model's median latency in cycles run while a question was (or was not) answered."""
    return f"ask.inference_latency_median_ms_{_label(answering)}"


def ask_cycle_period_median_ms(answering: bool) -> str:
    """The median period between cycles while a question was (or was not) answered."""
    return f"ask.cycle_period_median_ms_{_label(answering)}"


def _label(answering: bool) -> str:
    return "while_answering" if answering else "otherwise"
