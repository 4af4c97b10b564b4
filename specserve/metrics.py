"""The metrics specserve exports, declared once without Ray.

The router and the Serve app create these through ``ray.util.metrics``; the
Grafana dashboards and the Prometheus rules are generated from this list, and
their check mode fails on any query naming a metric not declared here.

Names follow vLLM's spec-decode metrics so that its PromQL carries over::

    acceptance rate       = rate(num_accepted_tokens) / rate(num_draft_tokens)
    mean accepted length  = 1 + rate(num_accepted_tokens) / rate(num_drafts)
    acceptance at pos i   = rate(num_accepted_tokens_per_pos{position="i"}) / rate(num_drafts)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "specserve_"

#: Latency buckets in seconds: from sub-millisecond actor hops to minute-long requests.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its name (without Ray's ``ray_`` export prefix), kind, help text and labels."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    labels: tuple[str, ...] = ("model",)
    buckets: tuple[float, ...] = ()

    def exported(self) -> str:
        """Name as Prometheus sees it: Ray prefixes ``ray_``; counters gain ``_total``."""
        suffix = "_total" if self.kind == "counter" else ""
        return f"ray_{self.name}{suffix}"

    def series(self) -> tuple[str, ...]:
        """Every Prometheus series name this metric produces."""
        if self.kind == "histogram":
            base = f"ray_{self.name}"
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (self.exported(),)


def _c(name: str, desc: str, labels: tuple[str, ...] = ("model",)) -> MetricSpec:
    return MetricSpec(PREFIX + name, "counter", desc, labels)


def _g(name: str, desc: str) -> MetricSpec:
    return MetricSpec(PREFIX + name, "gauge", desc)


def _h(name: str, desc: str) -> MetricSpec:
    return MetricSpec(PREFIX + name, "histogram", desc, ("model",), LATENCY_BUCKETS_S)


NUM_DRAFTS = _c("spec_decode_num_drafts", "Draft blocks verified.")
NUM_DRAFT_TOKENS = _c("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.")
NUM_ACCEPTED_TOKENS = _c("spec_decode_num_accepted_tokens", "Draft tokens accepted by verification.")
NUM_ACCEPTED_PER_POS = _c(
    "spec_decode_num_accepted_tokens_per_pos",
    "Draft tokens accepted at each block position (label position, 0-based).",
    ("model", "position"),
)
PROMPT_TOKENS = _c("prompt_tokens", "Prompt tokens processed.")
GENERATION_TOKENS = _c("generation_tokens", "Tokens generated.")
REQUEST_SUCCESS = _c("request_success", "Requests finished, by finish reason.", ("model", "finished_reason"))
REQUEST_ERRORS = _c("request_errors", "Requests that ended in an error, by HTTP status.", ("model", "status"))
NUM_PIPELINED_DRAFTS = _c("spec_decode_num_pipelined_drafts",
                          "Draft blocks that were drafted while the previous block was verified (pipelining hits).")
DRAFT_WORKER_RESTARTS = _c("draft_worker_failures", "Draft worker calls that failed (the router falls back).")

NUM_REQUESTS_RUNNING = _g("num_requests_running", "Sequences being decoded.")
NUM_REQUESTS_WAITING = _g("num_requests_waiting", "Requests queued for a slot.")

DRAFT_LATENCY = _h("draft_latency_seconds", "Time to draft one block.")
VERIFY_LATENCY = _h("verify_latency_seconds", "Time to verify one block (one batched target pass).")
TTFT = _h("time_to_first_token_seconds", "Time from request arrival to its first token.")
ITL = _h("inter_token_latency_seconds", "Time between consecutive streamed tokens.")
VERIFY_BATCH_SIZE = MetricSpec(
    PREFIX + "verify_batch_size", "histogram",
    "Sequences verified in one batched target pass (engine hf; fewer than running means steps split into passes).",
    ("model",), (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024),
)
E2E_LATENCY = _h("e2e_request_latency_seconds", "Time from request arrival to its last token.")

ALL: tuple[MetricSpec, ...] = (
    NUM_DRAFTS, NUM_DRAFT_TOKENS, NUM_ACCEPTED_TOKENS, NUM_ACCEPTED_PER_POS, NUM_PIPELINED_DRAFTS,
    PROMPT_TOKENS, GENERATION_TOKENS, REQUEST_SUCCESS, REQUEST_ERRORS, DRAFT_WORKER_RESTARTS,
    NUM_REQUESTS_RUNNING, NUM_REQUESTS_WAITING,
    DRAFT_LATENCY, VERIFY_LATENCY, VERIFY_BATCH_SIZE, TTFT, ITL, E2E_LATENCY,
)


def all_series() -> set[str]:
    """Every Prometheus series name specserve can export."""
    return {s for m in ALL for s in m.series()}
