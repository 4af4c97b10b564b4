"""The client side of ``bench-serve``: a closed loop of streaming chat requests with the official
``openai`` client, and the per-request metrics ``vllm bench serve`` reports.

Definitions follow ``vllm bench serve`` (vllm/benchmarks/serve.py, lib/endpoint_request_func.py):
TTFT is the time to the first streamed chunk that carries a choice; a request's latency ends at
its last such chunk (the trailing usage chunk carries no token); TPOT = (latency - TTFT) /
(completion tokens - 1), for requests of more than one token; percentiles interpolate linearly
(``numpy.percentile``); throughput is all completion tokens over the wall time of the loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from cluster.local import LOOPBACK
from specserve.errors import SpecServeError

#: Model name every server under test answers to.
SERVED_NAME = "bench"
#: Streams that send the warm prompts: enough to finish soon, few enough not to time out a slow server.
WARM_STREAMS = 4


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds from the request's start."""

    prompt_index: int
    tokens: int = 0  # completion tokens (the server's usage count)
    ttft_s: float | None = None
    latency_s: float | None = None
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for failed or one-token requests."""
        if self.error or self.tokens < 2 or self.ttft_s is None:
            return None
        return (self.latency_s - self.ttft_s) / (self.tokens - 1)


async def stream_chat(client, prompt: str, max_tokens: int, prompt_index: int = 0) -> RequestRecord:
    """One greedy streaming chat request; a failure is recorded, not raised (as vllm bench serve)."""
    record = RequestRecord(prompt_index)
    t0 = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter() - t0
            if chunk.choices:
                record.ttft_s = now if record.ttft_s is None else record.ttft_s
                record.latency_s = now
            if chunk.usage:
                record.tokens = chunk.usage.completion_tokens
    except Exception as e:  # the server's error (503, a dropped connection): counted as failed
        record.error = f"{type(e).__name__}: {e}"[:300]
    if record.error is None and record.ttft_s is None:
        record.error = "no chunk with a choice arrived"
    return record


async def closed_loop(base_url: str, prompts: list[str], max_tokens: int, concurrency: int, requests: int,
                      desc: str | None = None) -> tuple[list[RequestRecord], float]:
    """``concurrency`` clients send requests back to back, each taking the next prompt of a shared
    list (cycling), until ``requests`` are done: (records in start order, wall seconds).

    A closed loop keeps ``concurrency`` requests in flight until the last wave drains, which is
    what a fixed number of users does (and what ``vllm bench serve --max-concurrency`` measures).
    """
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", timeout=900, max_retries=0)
    records: list[RequestRecord] = [RequestRecord(i % len(prompts)) for i in range(requests)]
    taken = 0  # requests claimed so far; one event loop, so claiming needs no lock
    progress = tqdm(total=requests, desc=desc, leave=False, disable=desc is None)

    async def user() -> None:
        nonlocal taken
        while taken < requests:
            i, taken = taken, taken + 1
            records[i] = await stream_chat(client, prompts[i % len(prompts)], max_tokens, i % len(prompts))
            progress.update()

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*[user() for _ in range(concurrency)])
    finally:
        progress.close()
        await client.close()
    return records, time.perf_counter() - t0


def run_closed_loop(port: int, prompts: list[str], max_tokens: int, concurrency: int, requests: int,
                    desc: str | None = None) -> tuple[list[RequestRecord], float]:
    """``closed_loop`` against ``http://127.0.0.1:PORT/v1`` from synchronous code."""
    return asyncio.run(closed_loop(f"http://{LOOPBACK}:{port}/v1", prompts, max_tokens, concurrency, requests,
                                   desc))


def send_warm_prompts(port: int, prompts: list[str], max_tokens: int, desc: str | None = None) -> dict:
    """Send every prompt once through the server's chat API, ``WARM_STREAMS`` at a time, untimed by the
    benchmark: a server whose drafter learns across requests (a suffix cache) then meets the timed waves
    warm. Returns requests, failed, output tokens, seconds and the first errors."""
    records, wall = run_closed_loop(port, prompts, max_tokens, min(WARM_STREAMS, len(prompts)), len(prompts), desc)
    ok = [r for r in records if r.error is None]
    return {"requests": len(records), "failed": len(records) - len(ok), "tokens": sum(r.tokens for r in ok),
            "seconds": wall, "errors": sorted({r.error for r in records if r.error})[:5]}


def requests_per_run(concurrency: int, waves: int, prompts: int) -> int:
    """``waves`` full waves of ``concurrency`` requests, and every prompt at least once."""
    return max(waves * concurrency, prompts)


def unseen_slices(num_prompts: int, concurrencies: list[int], waves: int) -> tuple[range, list[range]]:
    """Prompt indices for ``--unseen-prompts``: (the engine warm-up's, one slice per concurrency).

    A drafter that learns across requests (the suffix cache) drafts a prompt's earlier answer when the
    prompt comes again, which a benchmark that cycles its prompts would count as speed. Here no prompt is
    sent twice by the warm-up and the measured waves: the warm-up takes the first ``max(concurrencies)``
    prompts, then each concurrency ``waves x concurrency`` prompts of its own.
    """
    warm = max(concurrencies)
    sizes = [waves * c for c in concurrencies]
    need = warm + sum(sizes)
    if num_prompts < need:
        raise SpecServeError(f"--unseen-prompts needs {need} prompts for concurrency {concurrencies} x {waves} waves "
                             f"plus {warm} for the engine warm-up; --prompts gave {num_prompts} (add a source such as "
                             f"sharegpt:{need})", "--unseen-prompts")
    slices, start = [], warm
    for size in sizes:
        slices.append(range(start, start + size))
        start += size
    return range(warm), slices


def _ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if values else None


def summarize(records: list[RequestRecord], wall_s: float, concurrency: int) -> dict:
    """One measured load as a row: throughput, TTFT and TPOT p50/p99 (ms), and the raw requests."""
    ok = [r for r in records if r.error is None]
    ttft = [r.ttft_s for r in ok]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    tokens = sum(r.tokens for r in ok)
    return {
        "concurrency": concurrency, "requests": len(records), "failed": len(records) - len(ok),
        "tokens": tokens, "seconds": wall_s, "tokens_per_s": tokens / wall_s,
        "ttft_p50_ms": _ms(ttft, 50), "ttft_p99_ms": _ms(ttft, 99),
        "tpot_p50_ms": _ms(tpot, 50), "tpot_p99_ms": _ms(tpot, 99),
        "mean_ttft_ms": 1000 * sum(ttft) / len(ttft) if ttft else None,
        "errors": sorted({r.error for r in records if r.error})[:5],
        "request_records": [asdict(r) for r in records],
    }
