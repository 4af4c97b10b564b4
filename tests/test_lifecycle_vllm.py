"""The default app's life on the real model: ready means ready, faults at load end cleanly, nothing survives a stop.

One ``specserve serve`` (what ``make serve`` runs: engine vllm, n-gram inside vLLM's worker) is started
as a subprocess in its own session, with a tag in its environment that every process it starts
inherits (Ray's daemons and workers, the Serve replicas, vLLM's engine core and workers). The tests
run in file order against it:

1. ``/health`` answers 503 JSON while the engine starts and 200 once a request can be served;
2. vLLM's engine core killed under 8 streams: every stream ends (completed or a JSON error), none
   hangs; Serve replaces the replica and requests succeed again (recovery time printed);
3. the replica SIGKILLed: its engine processes end themselves (no orphan), Serve starts a new one;
4. a hard stop (SIGTERM, 3 s, SIGKILL, then every Ray process of this server SIGKILLed, as
   ``ray stop --force`` would): no process of the app survives.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from serve_helpers import free_port

from cluster.local import LOOPBACK
from cluster.processes import Proc, find_by_env, wait_gone

pytestmark = [pytest.mark.ray, pytest.mark.real_model, pytest.mark.vllm]

TAG_KEY = "SPECSERVE_TEST_SERVER"
MODEL = "smollm2-135m-instruct"
#: Bounds on what a test waits for (never asserted as speeds: a busy machine is slower).
START_S, RECOVER_S, EXIT_S = 600, 300, 30


def tagged(tag: str) -> dict[int, Proc]:
    """Every process whose environment carries this server's tag, by pid."""
    return {p.pid: p for p in find_by_env(TAG_KEY, tag)}


def titled(tag: str, prefix: str) -> dict[int, Proc]:
    return {pid: p for pid, p in tagged(tag).items() if p.title.startswith(prefix)}


def alive_after(procs, timeout_s: float) -> list[Proc]:
    """The processes still running (zombies count as gone) after waiting up to ``timeout_s``."""
    return wait_gone(list(procs.values()), timeout_s)


def wait_health(base: str, timeout_s: float) -> tuple[list[dict], float]:
    """Poll /health until 200: the non-200 bodies seen before, and the seconds it took."""
    seen, t0 = [], time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            r = httpx.get(base + "/health", timeout=10)
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        if r.status_code == 200:
            return seen, time.monotonic() - t0
        if r.status_code == 404 and "not found" in r.text and not r.headers.get("content-type", "").startswith(
                "application/json"):
            # Serve's proxy is up a moment before the app's route exists (serve.start, then serve.run):
            # its plain-text 404 is not our app's answer.
            time.sleep(0.5)
            continue
        seen.append({"status": r.status_code, "body": r.json(), "retry_after": r.headers.get("retry-after")})
        time.sleep(0.5)
    raise AssertionError(f"/health not 200 after {timeout_s} s; last answers: {seen[-3:]}")


def chat(base: str, prompt: str, max_tokens: int = 24) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def server():
    """``specserve serve`` on a free loopback port, in its own session, tagged; killed whatever happens."""
    tag, port = uuid.uuid4().hex[:12], free_port()
    env = {**os.environ, TAG_KEY: tag, "VLLM_CPU_KVCACHE_SPACE": "2"}
    log = open(f"/tmp/specserve-lifecycle-{tag}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "specserve.cli", "serve", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://{LOOPBACK}:{port}"
    try:
        yield {"proc": proc, "tag": tag, "base": base, "log": log.name}
    finally:
        for pid in tagged(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        log.close()


def test_health_is_503_json_while_the_engine_starts_and_200_once_it_serves(server):
    seen, seconds = wait_health(server["base"], START_S)
    starting = [s for s in seen if s["status"] == 503]
    assert starting, "the engine start was never reported as 503"
    assert all(s["body"]["error"]["code"] == "model_starting" for s in starting), starting[-1]
    assert "starting" in starting[-1]["body"]["error"]["message"] and starting[-1]["retry_after"]
    print(f"\n/health: {len(starting)} answers of 503 before 200 ({seconds:.0f} s)")
    # Ready means ready: the first request after it is served by the running engine.
    r = chat(server["base"], "Say hello.")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert len(titled(server["tag"], "VLLM::EngineCore")) == 1


async def _stream(client: httpx.AsyncClient, base: str, prompt: str, out: dict | None = None) -> dict:
    """One streamed chat request; ``out`` (filled as the stream goes) lets the caller watch its progress."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 128,
            "temperature": 0, "stream": True}
    out = {} if out is None else out
    out.update({"status": None, "done": False, "error": None, "text": ""})
    try:
        async with client.stream("POST", base + "/v1/chat/completions", json=body) as resp:
            out["status"] = resp.status_code
            if resp.status_code != 200:
                out["error"] = json.loads(await resp.aread())["error"]
                return out
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        out["error"] = event["error"]
                    elif event.get("choices"):
                        out["text"] += event["choices"][0]["delta"].get("content") or ""
    except httpx.HTTPError as e:  # a dropped connection is an ending too, but not a clean one
        out["error"] = {"message": f"connection: {type(e).__name__}", "code": "dropped"}
    return out


def test_killing_the_engine_core_under_load_ends_every_stream_and_serve_replaces_the_replica(server):
    base, tag = server["base"], server["tag"]
    engine = titled(tag, "VLLM::EngineCore")
    workers = titled(tag, "VLLM::Worker")
    assert len(engine) == 1 and workers

    async def load() -> list[dict]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as client:
            outs = [{} for _ in range(8)]
            tasks = [asyncio.create_task(_stream(client, base, f"Write a long story about the number {i}.", out))
                     for i, out in enumerate(outs)]
            # Kill as soon as every stream is decoding (has text, not done): a fixed wait let a fast machine
            # finish all eight first.
            for _ in range(600):
                if all(o.get("text") for o in outs) or any(o.get("done") or o.get("error") for o in outs):
                    break
                await asyncio.sleep(0.1)
            os.kill(next(iter(engine)), signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 180)  # none hangs

    t_kill = time.monotonic()
    results = asyncio.run(load())
    for r in results:
        assert r["done"] or r["error"], r
        if r["error"]:
            assert r["error"].get("code") != "dropped", r["error"]
    assert any(r["error"] for r in results), "the kill did not touch any stream"
    assert not alive_after(workers, EXIT_S), "vLLM workers outlived their engine core"
    # The dead engine's replica answers 503 until Serve replaces it; then requests succeed again.
    deadline = time.monotonic() + RECOVER_S
    while time.monotonic() < deadline:
        r = chat(base, "Say hello.")
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["error"]["code"] in ("engine_failed", "model_starting"), r.text
        time.sleep(1)
    assert r.status_code == 200, r.text
    print(f"\nengine core killed at 8 streams: {sum(bool(r['error']) for r in results)} streams ended with an "
          f"error, {sum(not r['error'] for r in results)} completed; requests succeed again after "
          f"{time.monotonic() - t_kill:.0f} s")
    assert len(titled(tag, "VLLM::EngineCore")) == 1  # the new replica's engine, and no orphan of the old


def test_a_sigkilled_replica_leaves_no_engine_process_and_is_replaced(server):
    base, tag = server["base"], server["tag"]
    replica = titled(tag, "ray::ServeReplica:specserve:SpecServer")
    engine = {**titled(tag, "VLLM::EngineCore"), **titled(tag, "VLLM::Worker")}
    assert len(replica) == 1 and engine
    t_kill = time.monotonic()
    os.kill(next(iter(replica)), signal.SIGKILL)
    assert not alive_after(engine, EXIT_S), f"engine processes outlived their replica: {engine}"
    wait_health(base, RECOVER_S)
    assert chat(base, "Say hello.").status_code == 200
    print(f"\nreplica SIGKILLed: its engine processes ended, a new replica served after "
          f"{time.monotonic() - t_kill:.0f} s")


def test_a_hard_stop_leaves_no_process_of_the_app(server):
    proc, tag = server["proc"], server["tag"]
    assert chat(server["base"], "Say hello.").status_code == 200
    before = tagged(tag)
    assert any(p.title.startswith("VLLM::") for p in before.values())
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    # `ray stop --force`, for this server's Ray only (other Rays on the machine are not ours to stop).
    for pid, p in tagged(tag).items():
        if not p.title.startswith("VLLM::"):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    survivors = alive_after(tagged(tag), EXIT_S)
    assert not survivors, [p.title for p in survivors]
