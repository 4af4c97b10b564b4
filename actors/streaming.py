"""One request's stream: what text was sent, token timing metrics, and the chunks that carry them.

Both model-replica cores (the hf router and the vLLM core) commit tokens into a
:class:`specserve.sequence.Sequence` and turn each step into a :class:`StreamChunk` here.
"""

from __future__ import annotations

import time

from actors.metrics import RouterMetrics
from specserve.outputs import StreamChunk, Usage
from specserve.sequence import Sequence, stream_holdback


class RequestStream:
    """Builds a request's chunks: text deltas with hold-back; the last one carries finish, stats, usage."""

    def __init__(self, seq: Sequence, metrics: RouterMetrics, t_arrival: float):
        self.seq = seq
        self.metrics = metrics
        self.t_arrival = t_arrival
        self.emitted_chars = 0  # text already streamed to the client
        self.t_last_token = 0.0
        self.finished = False  # the final chunk was built

    def chunk(self, appended: list[int]) -> StreamChunk:
        """The chunk for the tokens one step committed (``appended`` may be empty)."""
        seq = self.seq
        now = time.perf_counter()
        if appended:
            if len(seq.output_ids) == len(appended):
                self.metrics.ttft(now - self.t_arrival)
            elif self.t_last_token:
                self.metrics.itl((now - self.t_last_token) / len(appended))
            self.t_last_token = now
        text = seq.text
        end = len(text) if seq.finished else len(text) - stream_holdback(text, seq.params.stop, self.emitted_chars)
        end = max(self.emitted_chars, end)
        delta = text[self.emitted_chars : end]
        self.emitted_chars = end
        if not seq.finished:
            return StreamChunk(appended, delta)
        self.finished = True
        reason = "length" if seq.finish_reason == "length" else "stop"
        self.metrics.finished(seq.finish_reason or "stop", len(seq.output_ids), now - self.t_arrival)
        return StreamChunk(appended, delta, finish_reason=reason, stats=seq.stats.to_dict(),
                           usage=Usage(len(seq.prompt_ids), len(seq.output_ids)))
