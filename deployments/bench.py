"""``specserve bench-serve``: served tokens/s through the OpenAI API at several concurrencies.

For each configuration (engine hf / vllm x drafters, plus the server's defaults as ``make
serve`` runs them) the app is deployed on a local Ray (127.0.0.1); as peers in the same run,
``vllm serve`` itself is started on the same model, plain and with its n-gram speculation.
The same prompts are sent by 1, 4, 16... streaming clients using the official ``openai``
client. Optionally the in-process hf engine runs the same prompts one at a time, which gives
the per-token overhead of the actor hops. Writes ``results.json``, ``table.md`` and
``serving.png``.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cluster.local import LOOPBACK
from specserve.config import apply_serve_defaults
from specserve.errors import SpecServeError
from specserve.plotting import figure

#: Model name every server under test answers to.
SERVED_NAME = "bench"


@dataclass
class Target:
    """One server configuration under test."""

    label: str
    app_args: dict | None = None  # build_app args; None for a `vllm serve` peer
    peer_spec: dict | None = None  # `vllm serve` speculative config (None = plain) when app_args is None
    drafter: dict = field(default_factory=dict)  # for the in-process baseline (engine hf only)


# ------------------------------------------------------------------------------- configurations


def drafter_from_spec(spec: str, k: int, adaptive: bool) -> dict:
    """``none | ngram | draft_model:PATH | vllm:METHOD[:PATH]`` as DrafterConfig fields."""
    kind, _, path = spec.partition(":")
    if kind == "vllm":
        method, _, model_path = path.partition(":")
        return {"kind": "ngram", "vllm_method": method, "path": model_path or None, "num_speculative_tokens": k,
                "adaptive_k": adaptive}
    if kind == "none":
        return {"kind": "none", "num_speculative_tokens": 0}
    return {"kind": kind, "path": path or None, "num_speculative_tokens": k, "adaptive_k": adaptive}


def build_targets(args) -> list[Target]:
    """Every configuration the arguments ask for, in run order."""
    model = {"model": args.model, "dtype": args.dtype}
    threads = {"num_threads": args.threads}
    topology = {"draft_worker": threads, "target_rank": threads}
    # What `specserve serve` runs on a config that names no engine and no drafter (engine vllm where installed).
    default = apply_serve_defaults({"model": model, "serve": {"model_name": SERVED_NAME}})
    targets = [Target("default (make serve)", default)] if args.default else []
    for engine in [] if args.only_default else args.engine:
        for spec in dict.fromkeys(["none", *args.drafter]):  # plain decoding once, even if named
            if spec.startswith("vllm:") and engine != "vllm":
                continue
            drafter_spec, _, options = spec.partition("@")
            drafter = drafter_from_spec(drafter_spec, args.k, not args.no_adaptive)
            base = {"model": {**model, "engine": engine}, "drafter": drafter, "topology": {**topology},
                    "serve": {"model_name": SERVED_NAME}}
            for option in filter(None, options.split(",")):  # engine hf: where drafting runs, batch gathering
                if option in ("router", "workers"):
                    base["topology"]["draft_placement"] = option
                elif option == "nowait":
                    base["router"] = {"batch_wait_fraction": 0.0}
                else:
                    raise SpecServeError(f"--drafter {spec}: unknown option {option!r}; allowed after '@': "
                                         "router, workers, nowait (comma-separated)", param="--drafter")
            label = f"{engine} {spec if not spec.startswith('draft_model') else 'draft_model'}"
            costly = drafter["kind"] == "draft_model" and drafter.get("vllm_method", "remote") == "remote"
            if not costly:  # free drafting is never pipelined (see RouterConfig.pipelining)
                targets.append(Target(label, _with_pipelining(base, engine, False), drafter=drafter))
                continue
            for on in (True, False):
                targets.append(Target(f"{label} {'pipelined' if on else 'sequential'}",
                                      _with_pipelining(base, engine, on), drafter=drafter))
    if args.vllm_peers:
        targets.append(Target("`vllm serve` plain"))
        for k in args.peer_k:  # the peer at its best: several n-gram block lengths
            targets.append(Target(f"`vllm serve` ngram k={k}",
                                  peer_spec={"method": "ngram", "num_speculative_tokens": k,
                                             "prompt_lookup_max": 4, "prompt_lookup_min": 1}))
    return targets


def _with_pipelining(base: dict, engine: str, on: bool) -> dict:
    if engine == "vllm":
        return {**base, "model": {**base["model"], "vllm": {"pipelining": on}}}
    return {**base, "router": {**base.get("router", {}), "pipelining": on}}


# ------------------------------------------------------------------------------------- the load


async def _stream(client, messages: list[dict], max_tokens: int) -> tuple[int, float, float]:
    """One streaming chat request with the official client: (completion tokens, seconds, TTFT)."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=max_tokens,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return tokens, time.perf_counter() - t0, ttft or 0.0


async def _load(port: int, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://{LOOPBACK}:{port}/v1", api_key="unused", timeout=900, max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def one(prompt: str):
        async with sem:
            return await _stream(client, [{"role": "user", "content": prompt}], max_tokens)

    t0 = time.perf_counter()
    results = await asyncio.gather(*[one(p) for p in prompts])
    wall = time.perf_counter() - t0
    await client.close()
    tokens = sum(r[0] for r in results)
    return {"concurrency": concurrency, "requests": len(prompts), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "mean_ttft_s": sum(r[2] for r in results) / len(results)}


def measure(label: str, port: int, prompts: list[str], args) -> list[dict]:
    """Warm up, then the prompt set at every concurrency (at least twice the streams in requests).

    The warm-up decodes whole responses, alone and in a batch as large as the largest measured: a
    compiling engine (vLLM's torch.compile on the CPU) compiles for the draft and batch shapes it
    meets on first use, which must not land inside a measurement.
    """
    asyncio.run(_load(port, prompts[:1], args.max_tokens, 1))
    top = max(args.concurrency)
    asyncio.run(_load(port, [prompts[i % len(prompts)] for i in range(top)], 32, top))
    rows = []
    for conc in args.concurrency:
        n = max(conc * 2, len(prompts))
        row = asyncio.run(_load(port, [prompts[i % len(prompts)] for i in range(n)], args.max_tokens, conc))
        rows.append(row)
        print(f"{label:<36} c={conc:<3} {row['tokens_per_s']:7.1f} tok/s  ttft {row['mean_ttft_s']:.3f} s",
              flush=True)
    return rows


# ------------------------------------------------------------------------------------- servers


def run_app(target: Target, prompts: list[str], args) -> tuple[list[dict], dict]:
    """Deploy our app with the target's args on the running Serve, measure it, delete it."""
    from ray import serve

    from deployments.app import build_app, wait_until_ready

    t0 = time.time()
    serve.run(build_app(target.app_args), name=SERVED_NAME, route_prefix="/", blocking=False)
    wait_until_ready(SERVED_NAME, timeout_s=900)
    rows = measure(target.label, args.port, prompts, args)
    serve.delete(SERVED_NAME)
    return rows, _proposer_stats_since(t0)


def _proposer_stats_since(t0: float) -> dict:
    """The remote vLLM proposer's counters written during this run (see VllmCore.drafting_stats)."""
    import tempfile

    files = [f for f in glob.glob(os.path.join(tempfile.gettempdir(), "specserve-proposer-*.json"))
             if os.path.getmtime(f) >= t0]
    if not files:
        return {}
    stats = json.loads(Path(max(files, key=os.path.getmtime)).read_text())
    if stats.get("steps"):
        stats["ms_per_step"] = 1000 * stats["wait_s"] / stats["steps"]
    return stats


def run_vllm_peer(target: Target, prompts: list[str], args, model_dir: str, dtype: str) -> list[dict]:
    """`vllm serve` on the same model as a subprocess on 127.0.0.1, measured like our server."""
    import httpx

    port = args.port + 1
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", SERVED_NAME, "--host", LOOPBACK, "--port", str(port), "--dtype", dtype,
           "--disable-log-stats"]
    if target.peer_spec:
        cmd += ["--speculative-config", json.dumps(target.peer_spec)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    name = f"ngram-k{target.peer_spec['num_speculative_tokens']}" if target.peer_spec else "plain"
    log = open(Path(args.out) / f"vllm-serve-{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"http://{LOOPBACK}:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        args_port, args.port = args.port, port
        try:
            return measure(target.label, port, prompts, args)
        finally:
            args.port = args_port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def in_process_baseline(targets: list[Target], encoded: list[list[int]], args, model: dict) -> dict:
    """The in-process hf engine on the same prompts one at a time: tok/s per drafter."""
    from specserve.config import DrafterConfig, EngineConfig, ModelConfig, SamplingParams
    from specserve.engine import SpecEngine

    engine = SpecEngine.from_config(EngineConfig(model=ModelConfig(**model),
                                                 drafter=DrafterConfig(kind="none", num_speculative_tokens=0)))
    params = SamplingParams(max_tokens=args.max_tokens)
    engine.generate(encoded[0], params.model_copy(update={"max_tokens": 4}))
    out = {}
    for t in targets:
        if not t.app_args or t.app_args.get("model", {}).get("engine") != "hf":
            continue
        eng = engine.with_drafter(DrafterConfig.model_validate(t.drafter))
        t0, tokens = time.perf_counter(), 0
        for ids in tqdm(encoded, desc=f"in-process {t.label}"):
            tokens += len(eng.generate(ids, params).token_ids)
        seconds = time.perf_counter() - t0
        out[t.label] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    return out


# -------------------------------------------------------------------------------------- report


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Per concurrency, the round with the median tok/s (one round: itself), and every round's tok/s."""
    rows = []
    for per_conc in zip(*rounds):
        ranked = sorted(per_conc, key=lambda r: r["tokens_per_s"])
        rows.append({**ranked[(len(ranked) - 1) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in per_conc]})
    return rows


def markdown_table(results: dict) -> str:
    """One row per server: tok/s and mean TTFT at each concurrency."""
    concs = [r["concurrency"] for r in next(iter(results["served"].values()))]
    head = "| server | " + " | ".join(f"{c} stream{'s' if c > 1 else ''} tok/s (TTFT s)" for c in concs) + " |"
    lines = [head, "|---|" + "---|" * len(concs)]
    for name, rows in results["served"].items():
        cells = " | ".join(f"{r['tokens_per_s']:.1f} ({r['mean_ttft_s']:.2f})" for r in rows)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    with figure(path, figsize=(8, 5)) as (_, ax):
        for name, rows in results["served"].items():
            ax.plot([r["concurrency"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("served tokens/s (all streams)")
        ax.set_title(f"{results['config']['model']['model']} {results['config']['model']['dtype']}, OpenAI client")
        ax.legend(fontsize=7)


def run(args) -> int:
    """Entry point of ``specserve bench-serve``."""
    import torch
    from ray import serve

    from cluster.local import init_local_ray
    from specserve.config import ModelConfig
    from specserve.data import load_prompts
    from specserve.models import ModelInfo, resolve_dtype

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [p["prompt"] for source in args.prompts for p in load_prompts(source)[: args.limit]]
    model = {"model": args.model, "dtype": args.dtype}
    info = ModelInfo.load(ModelConfig(**model))
    targets = build_targets(args)
    results: dict = {"config": {"model": model, "max_tokens": args.max_tokens, "prompts": len(prompts),
                                "k": args.k, "command": " ".join(sys.argv)}, "served": {}, "proposer": {}}
    if args.in_process:
        encoded = [info.encode(p, chat=True) for p in prompts]
        results["in_process"] = in_process_baseline(targets, encoded, args, model)

    init_local_ray(num_cpus=8)
    serve.start(http_options={"host": LOOPBACK, "port": args.port})
    dtype = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}[
        str(resolve_dtype(args.dtype, "cpu"))]
    results["rounds"] = {t.label: [] for t in targets}
    for rnd in range(args.rounds):
        # Every other round in reverse order: a machine whose speed drifts during the run favours no one.
        for target in targets if rnd % 2 == 0 else targets[::-1]:
            if target.app_args is not None:
                rows, stats = run_app(target, prompts, args)
                if stats:
                    results["proposer"][target.label] = stats
            else:
                rows = run_vllm_peer(target, prompts, args, info.path, dtype)
            results["rounds"][target.label].append(rows)
            results["served"][target.label] = median_rows(results["rounds"][target.label])
            (out / "results.json").write_text(json.dumps(results, indent=1))
    serve.shutdown()
    for name, base in results.get("in_process", {}).items():
        c1 = results["served"][name][0]
        c1["actor_overhead_ms_per_token"] = 1000 * (c1["seconds"] / c1["tokens"] - 1 / base["tokens_per_s"])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(markdown_table(results))
    print(markdown_table(results))
    _plot(results, out / "serving.png")
    return 0


def engine_agreement(args) -> int:
    """``specserve bench-agreement``: greedy fp32 outputs of engine vllm vs engine hf (both plain).

    Per prompt: identical or not and, at the first difference, the hf target's top-2 logit
    margin there (a small margin means the engines' numerics, not a bug, split them).
    """
    import torch

    from actors.config import ReplicaConfig
    from actors.vllm_core import VllmCore
    from specserve.config import DrafterConfig, EngineConfig, ModelConfig, SamplingParams
    from specserve.data import load_prompts
    from specserve.engine import SpecEngine

    torch.set_num_threads(args.threads)
    prompts = [p["prompt"] for source in args.prompts for p in load_prompts(source)[: args.limit]]
    model = ModelConfig(model=args.model, dtype="fp32")
    plain = DrafterConfig(kind="none", num_speculative_tokens=0)
    params = SamplingParams(max_tokens=args.max_tokens)
    hf = SpecEngine.from_config(EngineConfig(model=model, drafter=plain))
    encoded = [hf.info.encode(p, chat=True) for p in prompts]
    hf_out = [hf.generate(ids, params).token_ids for ids in tqdm(encoded, desc="engine hf")]
    core = VllmCore(ReplicaConfig(model=model.model_copy(update={"engine": "vllm"}), drafter=plain))

    async def run_vllm():
        await core.start()

        async def one(ids):
            return [t async for chunk in core.generate(ids, params) for t in chunk.token_ids]

        return await asyncio.gather(*[one(ids) for ids in encoded])

    try:
        vllm_out = asyncio.run(run_vllm())
    finally:
        core.shutdown()
    rows = []
    for ids, a, b in zip(encoded, hf_out, vllm_out):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        row = {"prompt_tokens": len(ids), "identical": a == b, "first_difference": None if a == b else n}
        if a != b and n < min(len(a), len(b)):
            with torch.inference_mode():
                logits = hf.target.model(torch.tensor([ids + a[:n]])).logits[0, -1].float()  # [vocab]
            top = torch.topk(logits, 2).values
            row["top2_margin"] = float(top[0] - top[1])
        rows.append(row)
    same = sum(r["identical"] for r in rows)
    margins = [r["top2_margin"] for r in rows if "top2_margin" in r]
    summary = {"prompts": len(rows), "identical": same, "max_tokens": args.max_tokens,
               "top2_margins_at_first_difference": margins, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "agreement.json").write_text(json.dumps(summary, indent=1))
    print(f"engine vllm vs hf, fp32 greedy, {args.max_tokens} tokens: {same}/{len(rows)} identical; "
          f"top-2 logit margins at the first difference: {[round(m, 4) for m in margins]}")
    return 0


def proposer_pipelining(args) -> int:
    """``specserve bench-pipelining``: the remote proposer's cost per step, pipelined or not.

    Drives ``DraftWorkerProposer`` as vLLM's model runner does, against a real draft worker on a
    local Ray, with verification stood in for by a sleep of ``--verify-ms`` and every draft
    accepted (the case pipelining is for). Reports wall ms per step and the proposer's own wait.
    """
    from types import SimpleNamespace

    import numpy as np
    import ray

    from actors.draft_worker import DraftWorker
    from actors.vllm_proposer import CONFIG_KEY, DraftWorkerProposer
    from cluster.local import init_local_ray
    from specserve.config import ModelConfig
    from specserve.models import ModelInfo

    init_local_ray(num_cpus=4)
    info = ModelInfo.load(ModelConfig(model=args.model))
    drafter = {"kind": "draft_model", "path": args.draft, "num_speculative_tokens": args.k, "adaptive_k": False}
    worker = DraftWorker.options(name="bench-pipelining", num_cpus=0.1).remote(
        {"model": args.model, "dtype": "bf16"}, drafter, 1)
    ray.get(worker.info.remote())
    ctx = ray.get_runtime_context()
    prompt = info.encode("Write a Python function that returns the n-th Fibonacci number.", chat=True)
    truth = ray.get(worker.propose_batch.remote([prompt], args.steps * (args.k + 1) + 2))[0]
    out = {}
    for pipelining in (False, True):
        options = {"gcs_address": ctx.gcs_address, "namespace": ctx.namespace, "draft_workers": ["bench-pipelining"],
                   "drafter": drafter, "deadline_ms": 10000, "pipelining": pipelining}
        proposer = DraftWorkerProposer(SimpleNamespace(
            speculative_config=SimpleNamespace(num_speculative_tokens=args.k), additional_config={CONFIG_KEY: options}))
        history = list(prompt)
        sampled = [history[-1]]
        t0 = time.perf_counter()
        for _ in tqdm(range(args.steps), desc=f"pipelining={pipelining}"):
            tokens = np.zeros((1, len(history) + 64), dtype=np.int64)  # [max_num_reqs, max_model_len]
            tokens[0, : len(history)] = history
            draft = proposer.propose([sampled], np.array([len(history)]), tokens)[0]
            time.sleep(args.verify_ms / 1000)  # vLLM verifying the draft
            # The target here is the draft model's own greedy continuation: drafts are accepted as far
            # as they match it, then its next token is the bonus.
            n = len(history) - len(prompt)
            accepted = 0
            while accepted < len(draft) and draft[accepted] == truth[n + accepted]:
                accepted += 1
            sampled = draft[:accepted] + [truth[n + accepted]]
            history = history + sampled
        wall = time.perf_counter() - t0
        out[f"pipelining={pipelining}"] = {"ms_per_step": 1000 * wall / args.steps, **proposer.stats()}
        print(out[f"pipelining={pipelining}"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pipelining.json").write_text(json.dumps({"args": vars(args) | {"handler": None}, **out},
                                                               indent=1, default=str))
    return 0


def add_parser(sub) -> None:
    """Register ``specserve bench-serve``."""
    p = sub.add_parser("bench-serve", help="served tokens/s at several concurrencies, engines x drafters, "
                       "beside `vllm serve`")
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--engine", action="append", choices=["hf", "vllm"], default=None,
                   help="target engine (repeatable; default hf)")
    p.add_argument("--drafter", action="append", default=None,
                   help="none | ngram | draft_model:PATH | vllm:METHOD[:PATH] (vLLM's own, engine vllm only); "
                   "engine hf takes options after '@': router / workers (where drafting runs), nowait (no batch "
                   "gathering), e.g. ngram@workers,nowait; repeatable; default ngram. Plain decoding is always "
                   "measured.")
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--no-adaptive", action="store_true", help="fixed k instead of adaptive k")
    p.add_argument("--prompts", action="append", required=True, help="FILE.jsonl or sharegpt:N")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts per source")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--port", type=int, default=8000, help="our server's port; `vllm serve` uses the next one")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process engine and each actor")
    p.add_argument("--only-default", action="store_true",
                   help="measure only the server's default configuration (and the `vllm serve` peers)")
    p.add_argument("--no-default", dest="default", action="store_false",
                   help="skip the server's default configuration (what `make serve` runs)")
    p.add_argument("--no-vllm-peers", dest="vllm_peers", action="store_false",
                   help="skip `vllm serve` plain and n-gram")
    p.add_argument("--peer-k", type=int, nargs="+", default=[4],
                   help="k of `vllm serve`'s n-gram peer (several: one peer each)")
    p.add_argument("--in-process", action="store_true",
                   help="also run the in-process hf engine (actor-hop overhead per token)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every configuration this many times, interleaved (every other round in reverse "
                   "order); tables show the median round")
    p.add_argument("--out", required=True)

    def handler(args):
        from cluster.local import use_loopback

        use_loopback()
        if args.rounds < 1:
            raise SpecServeError(f"--rounds must be at least 1, got {args.rounds}", param="--rounds")
        args.drafter = args.drafter or ["ngram"]
        args.engine = args.engine or ["hf"]
        return run(args)

    p.set_defaults(handler=handler)

    a = sub.add_parser("bench-agreement", help="greedy fp32 outputs of engine vllm vs engine hf, per prompt")
    a.add_argument("--model", default="default")
    a.add_argument("--prompts", action="append", required=True, help="FILE.jsonl or sharegpt:N")
    a.add_argument("--limit", type=int, default=None, help="at most this many prompts per source")
    a.add_argument("--max-tokens", type=int, default=128)
    a.add_argument("--threads", type=int, default=2, help="torch threads of the hf engine")
    a.add_argument("--out", required=True)
    a.set_defaults(handler=engine_agreement)

    b = sub.add_parser("bench-pipelining", help="remote proposer per-step cost, pipelined vs sequential")
    b.add_argument("--model", default="default")
    b.add_argument("--draft", required=True, help="draft model directory (shares the target's tokenizer)")
    b.add_argument("--k", type=int, default=4)
    b.add_argument("--steps", type=int, default=40)
    b.add_argument("--verify-ms", type=float, default=30.0, help="stand-in for vLLM's verification time per step")
    b.add_argument("--out", required=True)
    b.set_defaults(handler=proposer_pipelining)
