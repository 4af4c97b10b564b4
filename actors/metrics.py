"""The router's Prometheus metrics, created through ``ray.util.metrics`` from ``specserve.metrics``."""

from __future__ import annotations

from ray.util import metrics as ray_metrics

from specserve import metrics as m


def _make(spec: m.MetricSpec):
    if spec.kind == "counter":
        return ray_metrics.Counter(spec.name, description=spec.description, tag_keys=spec.labels)
    if spec.kind == "gauge":
        return ray_metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.labels)
    return ray_metrics.Histogram(spec.name, description=spec.description, boundaries=list(spec.buckets),
                                 tag_keys=spec.labels)


class RouterMetrics:
    """Every metric in ``specserve.metrics.ALL``, tagged with the served model name."""

    def __init__(self, model_name: str):
        self.tags = {"model": model_name}
        self.m = {spec.name: _make(spec) for spec in m.ALL}
        for spec in m.ALL:
            if spec.labels == ("model",):
                self.m[spec.name].set_default_tags(self.tags)

    def _inc(self, spec: m.MetricSpec, value: float = 1.0, **tags: str) -> None:
        if value:
            self.m[spec.name].inc(value, tags={**self.tags, **tags})

    def step(self, num_draft: int, num_accepted: int, draft_s: float, verify_s: float) -> None:
        """One verification step of one sequence."""
        if num_draft:
            self._inc(m.NUM_DRAFTS)
            self._inc(m.NUM_DRAFT_TOKENS, num_draft)
            self._inc(m.NUM_ACCEPTED_TOKENS, num_accepted)
            for pos in range(num_accepted):
                self._inc(m.NUM_ACCEPTED_PER_POS, position=str(pos))
            self.m[m.DRAFT_LATENCY.name].observe(draft_s, tags=self.tags)
        self.m[m.VERIFY_LATENCY.name].observe(verify_s, tags=self.tags)

    def verify_pass(self, num_sequences: int) -> None:
        """One batched verification pass over ``num_sequences`` sequences."""
        self.m[m.VERIFY_BATCH_SIZE.name].observe(num_sequences, tags=self.tags)

    def prompt_tokens(self, n: int) -> None:
        self._inc(m.PROMPT_TOKENS, n)

    def finished(self, reason: str, num_tokens: int, e2e_s: float) -> None:
        self._inc(m.REQUEST_SUCCESS, finished_reason=reason)
        self._inc(m.GENERATION_TOKENS, num_tokens)
        self.m[m.E2E_LATENCY.name].observe(e2e_s, tags=self.tags)

    def pipelined_draft(self) -> None:
        """A block drafted during the previous verification was used."""
        self._inc(m.NUM_PIPELINED_DRAFTS)

    def draft_failure(self) -> None:
        self._inc(m.DRAFT_WORKER_RESTARTS)

    def ttft(self, seconds: float) -> None:
        self.m[m.TTFT.name].observe(seconds, tags=self.tags)

    def itl(self, seconds: float) -> None:
        self.m[m.ITL.name].observe(seconds, tags=self.tags)

    def set_queue(self, running: int, waiting: int) -> None:
        self.m[m.NUM_REQUESTS_RUNNING.name].set(running, tags=self.tags)
        self.m[m.NUM_REQUESTS_WAITING.name].set(waiting, tags=self.tags)


def error_counter(model_name: str):
    """The request error counter (label ``status``), for the HTTP ingress that answers errors."""
    counter = _make(m.REQUEST_ERRORS)
    counter.set_default_tags({"model": model_name})
    return counter
