"""The policy node's `/diagnostics` status, by the names in `diagnostic_keys`."""

from __future__ import annotations

import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from . import diagnostic_keys as keys

RESTART_SHOWN_S = 60.0  # a worker restart keeps the status at ERROR this long


def policy_status(node) -> DiagnosticStatus:
    """The status of a `PolicyNode`: latency, rate, refusals, errors, worker, inputs, model."""
    loop = node.loop
    status = DiagnosticStatus(name=keys.STATUS_NAME,
                              hardware_id=str(node.params["server"] or node.params["checkpoint"]))
    cycles = list(loop.cycles)
    now = time.monotonic()
    values = {}
    if cycles:
        latencies = np.asarray([c["model_s"] for c in cycles]) * 1000.0
        values[keys.INFERENCE_LATENCY_MEDIAN_MS] = f"{np.median(latencies):.1f}"
        values[keys.INFERENCE_LATENCY_P95_MS] = f"{np.percentile(latencies, 95):.1f}"
        overheads = [c["overhead_s"] for c in cycles]
        values[keys.CYCLE_OVERHEAD_MEDIAN_MS] = f"{np.median(overheads) * 1000.0:.2f}"
    recent = [c for c in cycles if now - c["wall_time"] <= 10.0]
    values[keys.ACHIEVED_RATE_HZ] = f"{len(recent) / 10.0:.2f}"
    values[keys.CHUNKS_TOTAL] = str(loop.chunks_scheduled)
    for cause, count in node.causes.snapshot():
        values[keys.rejected(cause)] = str(count)
    values[keys.HOLDS_TOTAL] = str(loop.holds)
    pipeline = loop.pipeline
    values[keys.CHUNK_TRANSITION] = pipeline.chunk_transition
    if pipeline.chunk_transition == "rtc":
        values[keys.RTC_EXPECTED_LATENCY_S] = f"{pipeline.expected_latency():.3f}"
    values[keys.PLAN_LEFT_TOTAL] = str(pipeline.divergences)
    values[keys.PLAN_LEFT_LAST] = pipeline.last_divergence
    values[keys.LAST_ERROR] = loop.last_error
    alive = node.worker_alive()
    values[keys.WORKER_ALIVE] = str(alive)
    values[keys.WORKER_RESTARTS] = str(node.worker_restarts)
    values[keys.WORKER_IDLE_S] = f"{now - node.heartbeat:.1f}"
    values[keys.OPERATOR_HOLD] = str(loop.operator_hold)
    for topic, entry in node.watched.items():
        age = "never" if entry["received"] is None else f"{now - entry['received']:.2f}"
        values[keys.input_silent_s(topic)] = age
        values[keys.input_resubscribed(topic)] = str(entry["resubscribed"])
    values.update(node.questions.diagnostics(cycles))
    values[keys.ACTUATION_ENABLED] = str(node.actuate)
    values[keys.EMBODIMENT] = node.embodiment.name
    for key, value in dict(getattr(node.runtime, "identity", {})).items():
        values[keys.model(key)] = str(value)
    status.level, status.message = DiagnosticStatus.OK, "running"
    if loop.operator_hold:
        status.level, status.message = DiagnosticStatus.WARN, "held by the operator"
    elif loop.last_error:
        status.level, status.message = DiagnosticStatus.WARN, loop.last_error[:200]
    if node.stalled_since is not None:
        status.level = DiagnosticStatus.ERROR
        status.message = f"inference worker stalled for {now - node.heartbeat:.0f} s; holding"
    if now - node.worker_failure_time < RESTART_SHOWN_S or not alive:
        status.level = DiagnosticStatus.ERROR
        status.message = node.worker_failure or "inference worker is not running"
    status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
    return status
