"""Faults at real load: the real SmolLM2 in fp32 behind real Ray Serve and real HTTP on 127.0.0.1,
8 concurrent streams, and a worker SIGKILLed mid-way.

- A draft worker dies: every stream completes, each with exactly plain greedy decoding's text;
  Ray restarts the worker and later requests draft again.
- A target rank dies: the requests on its group end with a clear error, those on the other group
  complete exactly, later requests succeed on the rebuilt group, and nothing is left held.

One Ray cluster and one app (two target groups, one n-gram draft worker) for the module; every wait
has a deadline, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from serve_helpers import free_port, wait_idle

from cluster.local import LOOPBACK, use_loopback

# pytest's default 900 s per test includes the module's set-up (plain decoding of every prompt, the app on the
# real model), which on a busy 2-core machine alone took 11 minutes; this bound still turns a hang into a failure.
pytestmark = [pytest.mark.ray, pytest.mark.real_model, pytest.mark.timeout(1800)]

use_loopback()

APP = "faults"
MODEL = "smollm2"
MAX_TOKENS = 32
NUM_STREAMS = 8
#: Deadline of one batch of concurrent streams (they take seconds; this only catches a hang).
STREAMS_TIMEOUT_S = 300
PROMPTS = [json.loads(line)["prompt"]
           for line in (Path(__file__).resolve().parents[1] / "prompts" / "grounded.jsonl").read_text().splitlines()
           if line.strip()][:NUM_STREAMS]


HTTP_PORT = free_port()
BASE = f"http://{LOOPBACK}:{HTTP_PORT}"


@pytest.fixture(scope="module")
def expected(real_target) -> list[str]:
    """Plain greedy decoding (no drafter) of every prompt, in process: what every stream must equal."""
    from specserve.config import DrafterConfig, SamplingParams
    from specserve.drafters import make_drafter
    from specserve.engine import SpecEngine

    cfg = DrafterConfig(kind="none", num_speculative_tokens=0)
    engine = SpecEngine(real_target, make_drafter(cfg, real_target), cfg)
    return [engine.generate([{"role": "user", "content": p}], SamplingParams(max_tokens=MAX_TOKENS), chat=True).text
            for p in PROMPTS]


@pytest.fixture(scope="module")
def app(expected):
    """Ray + Serve on 127.0.0.1 and the app on the real model: two target groups of one rank, one draft worker."""
    from ray import serve

    from cluster.local import init_local_ray
    from deployments.app import build_app, wait_until_ready

    ray = init_local_ray(num_cpus=8)
    serve.start(http_options={"host": LOOPBACK, "port": HTTP_PORT})
    config = {
        "model": {"dtype": "fp32"},
        "drafter": {"kind": "ngram", "num_speculative_tokens": 6},
        "topology": {"draft_placement": "workers", "num_draft_workers": 1, "num_target_groups": 2},
        "serve": {"model_name": MODEL},
    }
    serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
    wait_until_ready(APP)
    yield BASE
    serve.shutdown()
    ray.shutdown()


def placement() -> dict:
    """Pids of the draft workers and target ranks, from the router's placement endpoint."""
    from ray import serve

    # The app's handle, as wait_until_ready uses (a fresh deployment handle once waited 60 s in CI for its
    # first replica list and never sent the call).
    return serve.get_app_handle(APP).placement.remote().result(timeout_s=60)


@dataclass
class Stream:
    """What one streamed chat completion delivered."""

    text: str = ""
    events: int = 0
    finish_reason: str | None = None
    spec_decode: dict = field(default_factory=dict)
    error: dict | None = None
    done: bool = False  # saw data: [DONE]

    @property
    def finished(self) -> bool:
        return self.done or self.error is not None


async def stream_chat(client: httpx.AsyncClient, prompt: str, out: Stream) -> None:
    """One greedy streaming chat completion, recorded into ``out`` as it arrives."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True}
    async with client.stream("POST", BASE + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:  # an error before the first token: a JSON body, not a stream
            out.error = json.loads(await resp.aread())["error"]
            return
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                out.done = True
            elif line.startswith("data:"):
                event = json.loads(line[5:])
                out.events += 1
                if "error" in event:
                    out.error = event["error"]
                    continue
                choice = event["choices"][0]
                out.text += choice["delta"].get("content") or ""
                out.finish_reason = choice["finish_reason"] or out.finish_reason
                out.spec_decode = event.get("spec_decode") or out.spec_decode


async def run_streams(kill_pid: int | None = None, n: int = NUM_STREAMS) -> tuple[list[Stream], list[bool]]:
    """The first ``n`` prompts as concurrent streams; once every stream has had two events, SIGKILL ``kill_pid``.

    Returns the streams and, per stream, whether it had already finished when the kill was sent.
    """
    streams = [Stream() for _ in PROMPTS[:n]]
    finished_at_kill: list[bool] = []

    async def killer():
        while not all(s.events >= 2 or s.finished for s in streams):
            await asyncio.sleep(0.02)
        finished_at_kill.extend(s.finished for s in streams)
        os.kill(kill_pid, signal.SIGKILL)

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        tasks = [stream_chat(client, p, s) for p, s in zip(PROMPTS[:n], streams)]
        if kill_pid is not None:
            tasks.append(killer())
        await asyncio.wait_for(asyncio.gather(*tasks), STREAMS_TIMEOUT_S)
    return streams, finished_at_kill


def idle_held() -> dict:
    return {"router": 0, "router_drafter": 0, "draft_workers": [0], "target_groups": [0, 0]}


def test_a_draft_worker_killed_mid_way_leaves_every_stream_exact(app, expected):
    (worker,) = placement()["draft_workers"]
    streams, finished_at_kill = asyncio.run(run_streams(kill_pid=worker["pid"]))

    assert not any(finished_at_kill), "a stream ended before the kill: nothing was in flight"
    for prompt, s, want in zip(PROMPTS, streams, expected):
        assert s.error is None, (prompt[:40], s.error)
        assert s.done and s.finish_reason in ("stop", "length")
        assert s.text == want, prompt[:40]
    # n-gram drafts were in use (the worker had sequences to lose) on these grounded prompts.
    assert sum(s.spec_decode.get("num_drafts", 0) for s in streams) > 0

    # Ray restarts the worker (max_restarts=-1); requests after that draft on it again.
    deadline = time.monotonic() + 60
    # (A worker still restarting is listed with pid None.)
    while (new := placement()["draft_workers"][0])["pid"] in (None, worker["pid"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert new["pid"] not in (None, worker["pid"])
    later, _ = asyncio.run(run_streams(n=2))
    assert [s.text for s in later] == expected[:2]
    assert sum(s.spec_decode.get("num_drafts", 0) for s in later) > 0
    assert wait_idle(BASE, timeout_s=60)["held"] == idle_held()


def test_a_target_rank_killed_mid_way_fails_only_its_groups_requests(app, expected):
    groups = placement()["target_groups"]
    assert len(groups) == 2
    victim = groups[0][0]["pid"]
    streams, finished_at_kill = asyncio.run(run_streams(kill_pid=victim))

    assert not any(finished_at_kill), "a stream ended before the kill: nothing was in flight"
    failed = [s for s in streams if s.error is not None]
    ok = [(s, want) for s, want in zip(streams, expected) if s.error is None]
    # Requests are spread over both groups: the dead rank's group fails, the other one finishes.
    assert failed and ok, f"{len(failed)} failed, {len(ok)} succeeded"
    for s in failed:
        assert "target" in s.error["message"].lower(), s.error  # says what broke, not a bare 500
        assert s.error["type"] == "server_error"
        assert s.done or s.events == 0  # a stream still ends properly with [DONE] after its error event
    for s, want in ok:
        assert s.done and s.finish_reason in ("stop", "length") and s.text == want

    # The group is rebuilt with a fresh rank; later requests, spread over both groups, all succeed exactly.
    later, _ = asyncio.run(run_streams(n=4))
    assert [s.error for s in later] == [None] * 4
    assert [s.text for s in later] == expected[:4]
    assert victim not in [g[0]["pid"] for g in placement()["target_groups"]]
    assert wait_idle(BASE, timeout_s=60)["held"] == idle_held()
