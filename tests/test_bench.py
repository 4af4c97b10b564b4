"""The benchmarks: the in-process runner (interleaved baseline and drafters, results.json and the
plot, warm prompts decoded before the timed ones), and bench-serve's pieces: the closed-loop client
and its metrics, the warm-up requests, the leftover-process finder, server clean-up and the CPU
profile, run against real processes and a real HTTP server."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from cli_helpers import run_cli_here
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.processes import end_processes, find_leftovers, is_alive, read_process, role_of
from deployments.bench_load import (
    WARM_STREAMS,
    RequestRecord,
    requests_per_run,
    run_closed_loop,
    send_warm_prompts,
    summarize,
    unseen_slices,
)
from deployments.bench_measure import measure
from deployments.bench_profile import CLIENT, CpuProfile
from deployments.bench_report import markdown_table, profile_table
from deployments.bench_servers import Server, check_leftovers
from specserve.bench import BenchSpec, decode_warm_prompts, method_name, run_bench
from specserve.bench import markdown_table as bench_table
from specserve.config import DrafterConfig, SamplingParams, TreeConfig
from specserve.drafters import make_drafter
from specserve.engine import SpecEngine
from specserve.errors import SpecServeError


def test_bench_writes_results_and_plot_with_exact_outputs(tiny_target, tmp_path):
    cfg = DrafterConfig(kind="none", num_speculative_tokens=0)
    engine = SpecEngine(tiny_target, make_drafter(cfg, tiny_target), cfg)
    prompts = [{"id": "a", "prompt": "x y z x y z x y", "set": "grounded"},
               {"id": "b", "prompt": "Tell me a story", "set": "chat"}]
    spec = BenchSpec([DrafterConfig(kind="ngram", num_speculative_tokens=4)],
                     SamplingParams(max_tokens=12, ignore_eos=True), chat=False, peers=True)
    results = run_bench(engine, prompts, spec, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"] == ["none", "ngram", "hf_generate", "hf_prompt_lookup"]
    assert set(saved["by_set"]) == {"grounded", "chat"}
    for row in saved["prompts"]:
        assert row["runs"]["ngram"]["matches_baseline"]
        assert row["runs"]["hf_generate"]["matches_baseline"]  # transformers agrees with our plain decoding
        assert row["runs"]["none"]["speedup"] == 1.0
    assert results["overall"]["ngram"]["prompts"] == 2
    # Tokens per pass count every target pass: plain decoding commits exactly one token per pass.
    overall = results["overall"]
    assert overall["none"]["tokens_per_pass"] == 1.0
    steps = sum(row["runs"]["ngram"]["stats"]["num_steps"] for row in saved["prompts"])
    assert overall["ngram"]["tokens_per_pass"] == pytest.approx(24 / steps) and steps < 24
    assert "| tokens / pass |" in bench_table(results)
    assert (tmp_path / "speedup.png").stat().st_size > 10_000


SUFFIX = DrafterConfig(kind="suffix", num_speculative_tokens=4, adaptive_k=False)
WARM_RECORDS = [{"id": "w1", "prompt": "The quick brown fox jumps over the lazy dog.", "set": "warm"},
                {"id": "w2", "prompt": "def add(a, b):\n    return a + b\n", "set": "warm"}]


def _plain_engine(target) -> SpecEngine:
    cfg = DrafterConfig(kind="none", num_speculative_tokens=0)
    return SpecEngine(target, make_drafter(cfg, target), cfg)


def test_warm_prompts_fill_the_suffix_drafters_cross_request_cache(tiny_target):
    engine = _plain_engine(tiny_target).with_drafter(SUFFIX)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    assert engine.drafter.cache.num_tokens == 0
    warm = [tiny_target.info.encode(r["prompt"]) for r in WARM_RECORDS]
    got = decode_warm_prompts(engine, warm, params)
    assert got["prompts"] == 2 and got["tokens"] == 32 and [len(o) for o in got["outputs"]] == [16, 16]
    # Both outputs, now drafted from by the next requests (the drafter learns a step's tokens at the next
    # step, so the last step's never reach it).
    assert 16 < engine.drafter.cache.num_tokens <= 32 and len(engine.drafter.cache.sequences) == 2
    again = engine.generate(warm[0], params)  # the same prompt again: its answer is in the cache
    assert again.stats.mean_accepted_length > 3.0


SUFFIX_TREE = SUFFIX.model_copy(update={"tree": TreeConfig(max_nodes=6, adaptive=False)})


def test_bench_decodes_the_warm_prompts_once_and_every_drafter_that_learns_across_requests_starts_warm(
        tiny_target, tmp_path):
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    timed = [{**r, "set": "timed"} for r in WARM_RECORDS]  # timed = warm: a warm cache holds every answer
    runs = {}
    for name, warm in (("cold", []), ("warm", WARM_RECORDS)):
        spec = BenchSpec([SUFFIX, SUFFIX_TREE, DrafterConfig(kind="ngram", num_speculative_tokens=4)], params,
                         chat=False, peers=False, warm_prompts=warm)
        runs[name] = run_bench(_plain_engine(tiny_target), timed, spec, tmp_path / name)
    saved = json.loads((tmp_path / "warm" / "results.json").read_text())
    tree_name = method_name(SUFFIX_TREE)
    assert saved["warm_up"]["prompts"] == 2 and saved["warm_up"]["prompt_tokens"] > 0
    # Plain decoding and n-gram keep nothing across requests; the tree learns the chain's outputs undecoded.
    assert saved["warm_up"]["methods"] == {"suffix": {"prompts": 2, "tokens": 32,
                                                      "seconds": saved["warm_up"]["methods"]["suffix"]["seconds"]},
                                           tree_name: {"learned_from": "suffix", "prompts": 2}}
    assert runs["cold"]["warm_up"] == {"prompts": 0, "prompt_tokens": 0, "methods": {}}
    table = bench_table(runs["warm"])
    assert "Warm-up, untimed, before the timed prompts: 2 prompts" in table
    assert f"without decoding them: {tree_name} (from suffix)" in table
    assert "Warm-up" not in bench_table(runs["cold"])
    for name in ("cold", "warm"):
        assert all(row["runs"][m]["matches_baseline"] for row in runs[name]["prompts"] for m in ("suffix", tree_name))
    for method in ("suffix", tree_name):
        accepted = {name: sum(row["runs"][method]["stats"]["num_accepted_tokens"] for row in r["prompts"])
                    for name, r in runs.items()}
        assert accepted["warm"] > accepted["cold"], (method, accepted)


def test_bench_command_takes_warm_prompts_and_prints_the_warm_up(tiny_dir, tmp_path):
    warm = tmp_path / "warm.jsonl"
    warm.write_text("".join(json.dumps(r) + "\n" for r in WARM_RECORDS))
    out = run_cli_here("bench", "--model", str(tiny_dir), "--dtype", "fp32", "--drafter", "suffix", "--no-peers",
                       "--max-tokens", "8", "--ignore-eos", "--prompts", "prompts/code.jsonl", "--limit", "1",
                       "--warm-prompts", str(warm), "--warm-prompts", str(warm), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert "Warm-up, untimed, before the timed prompts: 4 prompts" in out.stdout
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["warm_up"]["methods"]["suffix"]["tokens"] == 32


@pytest.mark.parametrize("command", ["bench", "bench-serve"])
@pytest.mark.parametrize("spec", ["sharegpt-train:0", "sharegpt:many", "missing.jsonl"])
def test_bad_warm_prompts_are_refused_in_one_line_naming_the_flag(command, spec, tmp_path):
    out = run_cli_here(command, "--prompts", "prompts/code.jsonl", "--warm-prompts", spec, "--out", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: --warm-prompts ") and out.stderr.count("\n") == 1, out.stderr


# ------------------------------------------------------------------------------ bench-serve pieces
# The client talks to a minimal OpenAI-style SSE server on 127.0.0.1 that streams one token per word
# of the prompt (a prompt "fail" is answered with a 503) and counts the requests in flight.

#: Titles of the test's stand-in engine processes: recognisable as this test's, matched as engines.
ENGINE_TITLE = f"VLLM::EngineCore-specserve-test-{os.getpid()}"
WORKER_TITLE = f"VLLM::Worker-specserve-test-{os.getpid()}"


def _sse_app(state: SimpleNamespace) -> FastAPI:
    app = FastAPI()

    def chunk(choices: list, usage: dict | None = None) -> str:
        body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "bench", "choices": choices,
                "usage": usage}
        return f"data: {json.dumps(body)}\n\n"

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        state.prompts.append(prompt)
        if prompt == "fail":
            return JSONResponse({"error": {"message": "busy", "type": "overloaded"}}, status_code=503)
        words = prompt.split()[: body["max_tokens"]]

        async def events():
            state.in_flight += 1
            state.peak = max(state.peak, state.in_flight)
            try:
                for word in words:
                    await asyncio.sleep(0.003)
                    yield chunk([{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}])
                yield chunk([], {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": len(words) + 1})
                yield "data: [DONE]\n\n"
            finally:
                state.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def sse_server():
    """(port, state) of the SSE server running in a thread; ``state.prompts`` lists what it was sent."""
    import uvicorn

    state = SimpleNamespace(prompts=[], in_flight=0, peak=0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_sse_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1], state
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def fresh(sse_server):
    port, state = sse_server
    state.prompts.clear()
    state.peak = 0
    return port, state


PROMPTS = ["one two three", "a b c d e f g", "x", "to be or not to be", "the quick brown fox jumps"]


def test_closed_loop_keeps_c_requests_in_flight_for_the_waves_taking_prompts_in_turn(fresh):
    port, state = fresh
    n = requests_per_run(3, waves=3, prompts=len(PROMPTS))
    records, wall = run_closed_loop(port, PROMPTS, 16, concurrency=3, requests=n)
    assert n == 9 and len(records) == 9 and wall > 0
    assert sorted(state.prompts) == sorted(PROMPTS[i % 5] for i in range(9))  # each prompt, then around again
    assert state.peak == 3  # a closed loop: never more than c in flight, and c at once
    for r in records:
        assert r.error is None and r.tokens == len(PROMPTS[r.prompt_index].split())
        assert 0 < r.ttft_s <= r.latency_s


def test_closed_loop_sends_every_prompt_once_even_when_the_waves_are_fewer(fresh):
    port, state = fresh
    assert requests_per_run(1, waves=3, prompts=len(PROMPTS)) == 5
    records, _ = run_closed_loop(port, PROMPTS, 16, concurrency=1, requests=5)
    assert state.prompts == PROMPTS and state.peak == 1
    assert [r.prompt_index for r in records] == [0, 1, 2, 3, 4]


class _ServerHere:
    """The handle ``measure`` takes for a server: the in-thread SSE server's process is this one."""

    pid = os.getpid()

    def track(self) -> None:
        """Nothing to track: the server started no processes."""


def test_unseen_prompts_send_no_prompt_twice_across_warm_up_and_concurrencies(fresh):
    port, state = fresh
    prompts = [f"prompt {i} " + "word " * i for i in range(9)]
    args = SimpleNamespace(port=port, concurrency=[1, 2], waves=2, max_tokens=16, unseen_prompts=True)
    rows = measure("unseen", _ServerHere(), prompts, args)
    # Warm-up: one whole response, then a batch of 2 (the largest concurrency) from its own 2 prompts.
    warm, measured = state.prompts[:3], state.prompts[3:]
    assert sorted(set(warm)) == prompts[:2]
    assert sorted(measured) == sorted(prompts[2:8]) and len(set(measured)) == len(measured)  # 2 x 1 + 2 x 2
    assert [r["requests"] for r in rows] == [2, 4] and all(r["failed"] == 0 for r in rows)
    # Without the flag the same prompts cycle: every concurrency sends the list again.
    state.prompts.clear()
    measure("cycling", _ServerHere(), prompts, SimpleNamespace(**{**vars(args), "unseen_prompts": False}))
    assert len(state.prompts) > len(set(state.prompts))
    with pytest.raises(SpecServeError, match=r"--unseen-prompts needs 11 prompts .* gave 9 .*sharegpt:11"):
        unseen_slices(9, [1, 2], 3)


def test_warm_prompts_are_sent_once_each_a_few_streams_at_a_time_and_failures_counted(fresh):
    port, state = fresh
    warm = PROMPTS * 2 + ["fail"]
    got = send_warm_prompts(port, warm, 16)
    assert sorted(state.prompts) == sorted(warm)
    assert state.peak == WARM_STREAMS
    assert got["requests"] == 11 and got["failed"] == 1 and got["seconds"] > 0
    assert got["tokens"] == 2 * sum(len(p.split()) for p in PROMPTS)
    assert "503" in got["errors"][0] or "InternalServerError" in got["errors"][0]


def test_failed_requests_are_counted_and_left_out_of_the_percentiles(fresh):
    port, _ = fresh
    records, wall = run_closed_loop(port, ["fail", "one two three"], 16, concurrency=2, requests=4)
    row = summarize(records, wall, 2)
    assert row["requests"] == 4 and row["failed"] == 2 and row["tokens"] == 6
    assert "503" in row["errors"][0] or "InternalServerError" in row["errors"][0]
    assert row["ttft_p50_ms"] is not None and len(row["request_records"]) == 4


def test_tpot_excludes_the_first_token_and_one_token_requests():
    assert RequestRecord(0, tokens=5, ttft_s=0.1, latency_s=0.5).tpot_s == pytest.approx(0.1)
    assert RequestRecord(0, tokens=1, ttft_s=0.1, latency_s=0.1).tpot_s is None
    assert RequestRecord(0, tokens=5, ttft_s=0.1, latency_s=0.5, error="x").tpot_s is None
    records = [RequestRecord(0, 5, 0.1, 0.5), RequestRecord(1, 3, 0.2, 0.4), RequestRecord(2, 1, 0.3, 0.3)]
    row = summarize(records, 2.0, 3)
    assert row["tokens_per_s"] == pytest.approx(9 / 2.0)
    assert row["ttft_p50_ms"] == pytest.approx(200) and row["ttft_p99_ms"] == pytest.approx(298)  # linear
    assert row["tpot_p50_ms"] == pytest.approx(100) and row["tpot_p99_ms"] == pytest.approx(100)


@pytest.mark.vllm
def test_metrics_on_recorded_requests_equal_vllm_bench_serves(fresh):
    serve = pytest.importorskip("vllm.benchmarks.serve")
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

    port, _ = fresh
    records, wall = run_closed_loop(port, PROMPTS + ["fail"], 16, concurrency=3, requests=12)
    row = summarize(records, wall, 3)
    outputs = [RequestFuncOutput(success=r.error is None, latency=r.latency_s or 0.0, output_tokens=r.tokens,
                                 ttft=r.ttft_s or 0.0) for r in records]
    metrics, _ = serve.calculate_metrics([], outputs, wall, None, [50, 99], {})
    assert row["tokens_per_s"] == pytest.approx(metrics.output_throughput)
    assert [row["ttft_p50_ms"], row["ttft_p99_ms"]] == pytest.approx([v for _, v in metrics.percentiles_ttft_ms])
    assert [row["tpot_p50_ms"], row["tpot_p99_ms"]] == pytest.approx([v for _, v in metrics.percentiles_tpot_ms])
    assert row["failed"] == len(records) - metrics.completed == 2


def _start_orphan(title: str) -> int:
    """A process titled ``title`` that no one here is the parent of (as a hard-stopped server leaves)."""
    code = ("import os\npid = os.fork()\nif pid:\n    print(pid, flush=True)\n    os._exit(0)\nos.setsid()\n"
            "null = os.open(os.devnull, os.O_RDWR)\nfor fd in (0, 1, 2):\n    os.dup2(null, fd)\n"
            f"os.execv('/bin/sleep', [{title!r}, '60'])\n")
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    while (proc := read_process(pid)) is None or not proc.title.startswith(title):  # until exec has happened
        time.sleep(0.01)
    return pid


def test_leftover_finder_finds_an_orphaned_engine_and_not_after_it_is_ended():
    pid = _start_orphan(ENGINE_TITLE)
    try:
        found = {p.pid: p for p in find_leftovers()}
        assert pid in found and role_of(found[pid]) == "VLLM::EngineCore"
        with pytest.raises(SpecServeError) as refused:  # refuses, naming it; never ends other runs' processes here
            check_leftovers(kill=False, allow=False)
        assert f"{pid} VLLM::EngineCore" in refused.value.message and "--kill-leftovers" in refused.value.message
        assert any(str(pid) in w for w in check_leftovers(kill=False, allow=True))
        assert end_processes([found[pid]]) == []
        assert pid not in {p.pid for p in find_leftovers()}
    finally:
        if (proc := read_process(pid)) and proc.title.startswith(ENGINE_TITLE):
            os.kill(pid, 9)


def test_leftover_finder_skips_this_runs_own_processes():
    child = subprocess.Popen([ENGINE_TITLE, "60"], executable="/bin/sleep")
    try:
        while (proc := read_process(child.pid)) is None or not proc.title.startswith(ENGINE_TITLE):
            time.sleep(0.01)
        assert child.pid not in {p.pid for p in find_leftovers()}
    finally:
        child.kill()
        child.wait()


#: A stand-in server: starts an engine child, says ready, and on SIGTERM ends that child and exits.
#: Stubborn, the child ignores SIGTERM and outlives its parent (what a hard-stopped server leaves).
SERVER = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.argv[1], "-c", "import signal, sys, time\\n"
                          "if sys.argv[1] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                          "print('up', flush=True)\\ntime.sleep(60)", sys.argv[2]],
                         executable=sys.executable, stdout=subprocess.PIPE, text=True)
child.stdout.readline()
def stop(*_):
    child.terminate()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("child", ["clean", "stubborn"])
def test_a_stopped_server_leaves_no_process_behind(tmp_path, child):
    log = tmp_path / "server.log"
    server = Server("stand-in", [sys.executable, "-c", SERVER, ENGINE_TITLE, child], log,
                    lambda: "ready" in log.read_text())
    server.wait_ready(timeout_s=60)
    engine = next(p for p in server.seen.values() if p.title.startswith(ENGINE_TITLE))
    warnings = server.stop(timeout_s=2)
    assert not is_alive(engine) and server.proc.returncode is not None
    if child == "clean":
        assert warnings == []
    else:  # ended by pid after the bounded wait, and the results say so
        assert len(warnings) == 1 and f"{engine.pid} VLLM::EngineCore" in warnings[0]


def test_cpu_profile_charges_a_server_process_by_role_with_its_cores():
    burn = ("import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\nt0 = time.process_time()\n"
            "while time.process_time() - t0 < 0.4:\n    pass\nprint('done', flush=True)\ntime.sleep(60)\n")
    worker = subprocess.Popen([WORKER_TITLE, "-c", burn], executable=sys.executable, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        worker.stdout.readline()
        with CpuProfile(worker.pid, interval_s=0.05) as profile:
            worker.stdin.write("go\n")
            worker.stdin.flush()
            worker.stdout.readline()
        cpu = profile.result(tokens=2000)
    finally:
        worker.kill()
        worker.wait()
    row = cpu["VLLM::Worker"]
    assert row["pids"] == [worker.pid]
    assert row["cpu_s"] == pytest.approx(0.4, abs=0.1)  # CPU it burnt inside the window, in 10 ms ticks
    assert row["cpu_s_per_1k_tokens"] == pytest.approx(row["cpu_s"] / 2)
    assert sum(row["cores"].values()) == pytest.approx(1.0) and row["cpus_allowed"]
    assert CLIENT in cpu


#: A stand-in engine core with one extra thread and a worker child that binds itself to the cores in argv[2]
#: ("" leaves it unbound, as on a GPU); argv[3] is Python. Prints the worker's pid; on a line in, the cores of each of its threads.
ENGINE_CORE = r"""
import os, subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
bind = f"import os\nos.sched_setaffinity(0, {{{sys.argv[2]}}})\n" if sys.argv[2] else ""
worker = subprocess.Popen([sys.argv[1], "-c", bind + "import time\nprint('up', flush=True)\ntime.sleep(60)"],
                          executable=sys.argv[3], stdout=subprocess.PIPE, text=True)
worker.stdout.readline()
print(worker.pid, flush=True)
while sys.stdin.readline():
    print(sorted(sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")), flush=True)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores: one for the worker, one left free")
def test_an_engine_core_is_put_on_its_bound_workers_cores_and_one_with_unbound_workers_is_left_alone():
    from cluster.processes import pin_engine_cores

    mine = sorted(os.sched_getaffinity(0))
    cores, workers = [], []
    try:
        for bind in (str(mine[-1]), ""):
            cores.append(subprocess.Popen([ENGINE_TITLE, "-c", ENGINE_CORE, WORKER_TITLE, bind, sys.executable],
                                          executable=sys.executable, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True))
            workers.append(int(cores[-1].stdout.readline()))
        moved = pin_engine_cores(os.getpid())
        assert moved == {cores[0].pid: {mine[-1]}}, "only the engine core whose worker is bound moves, to its core"
        threads = []
        for core in cores:
            core.stdin.write("cores?\n")
            core.stdin.flush()
            threads.append(ast.literal_eval(core.stdout.readline()))
        assert threads[0] == [[mine[-1]]] * 2, "every thread of the moved engine core runs on its worker's core"
        assert threads[1] == [mine] * 2, "an engine core whose workers are not bound stays where it was"
        assert os.sched_getaffinity(workers[0]) == {mine[-1]} and os.sched_getaffinity(workers[1]) == set(mine)
    finally:
        for pid in workers + [core.pid for core in cores]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for core in cores:
            core.wait()


def _bench_serve_args(*extra: str):
    import argparse

    from deployments.bench import add_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    return sub.choices["bench-serve"].parse_args(["--prompts", "sharegpt:1", "--out", "unused", *extra])


def test_bench_serve_peers_are_vllm_serve_and_ray_serve_llm_plain_and_ngram():
    from deployments.bench_targets import build_targets

    args = _bench_serve_args("--no-default", "--only-default", "--ray-serve-llm-peers", "--peer-k", "4", "8")
    targets = build_targets(args)
    assert [(t.label, t.kind) for t in targets] == [
        ("`vllm serve` plain", "vllm"), ("`vllm serve` ngram k=4", "vllm"), ("`vllm serve` ngram k=8", "vllm"),
        ("Ray Serve LLM plain", "ray-llm"), ("Ray Serve LLM ngram k=4", "ray-llm"),
        ("Ray Serve LLM ngram k=8", "ray-llm")]
    assert targets[4].peer_spec == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                                    "prompt_lookup_min": 1}
    only_ours = build_targets(_bench_serve_args("--only-default", "--no-vllm-peers", "--no-ray-serve-llm-peers"))
    assert [t.kind for t in only_ours] == ["app"]
    assert _bench_serve_args().concurrency == [1, 4, 16, 64] and _bench_serve_args().waves == 3


def test_tables_give_ratios_to_the_vllm_serve_peers_and_cpu_per_1k_tokens_by_role(fresh):
    port, _ = fresh
    with CpuProfile(os.getpid(), interval_s=0.05) as profile:  # the client profiled as its own server
        records, wall = run_closed_loop(port, PROMPTS, 16, concurrency=2, requests=4)
    row = summarize(records, wall, 2)
    row["cpu"] = profile.result(row["tokens"])
    slower = {**row, "tokens_per_s": row["tokens_per_s"] / 2}
    results = {"references": ["`vllm serve` plain"], "warnings": ["measured beside 1 engine/Ray process"],
               "served": {"`vllm serve` plain": [row], "ours": [slower]}}
    table = markdown_table(results)
    assert "### 2 streams" in table and "> warning: measured beside" in table
    assert f"| ours | {slower['tokens_per_s']:.1f} | 0.50 | " in table
    assert f"| `vllm serve` plain | {row['tokens_per_s']:.1f} | 1.00 | " in table
    assert "| bench client | " in profile_table(results) and "**server + client**" in profile_table(results)
    assert "Warm-up" not in table  # no --warm-prompts, no warm-up section
    warm = send_warm_prompts(port, PROMPTS, 16)
    results["config"] = {"warm_prompts": 5, "warm_prompt_sources": ["w.jsonl"], "warm_streams": WARM_STREAMS,
                         "max_tokens": 16}
    results["warm_up"] = {"ours": [warm, warm]}  # two rounds
    table = markdown_table(results)
    assert "Warm-up, untimed, once each server was ready and before its timed waves: 5 prompts (w.jsonl)" in table
    assert f"| ours | 5 / 5 | 0 / 0 | {warm['tokens']} / {warm['tokens']} | " in table
