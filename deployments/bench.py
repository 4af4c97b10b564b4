"""``specserve bench-serve``: what users compare between servers, through the OpenAI API.

Each server under test runs alone on the machine, started and stopped in turn: our app for each
configuration asked for (engine hf / vllm x drafters, and the server's defaults as ``make serve``
runs them), and as peers in the same run ``vllm serve`` and Ray Serve LLM on the same model,
plain and with n-gram speculation. Our app and Ray Serve LLM each get a Ray of their own
(``deployments.bench_host``); nothing runs beside a leftover engine or Ray
(``deployments.bench_servers``).

At each concurrency c, c clients of the official ``openai`` client send streaming requests back
to back for ``--waves`` full waves (``deployments.bench_load``), reporting tok/s and TTFT and
TPOT p50/p99 as ``vllm bench serve`` defines them, and where the CPU went by process role
(``deployments.bench_profile``). With ``--warm-prompts``, every server first answers those prompts
through the same API, untimed, so that drafters that learn across requests are measured warm.
Writes results.json, table.md, profile.md and serving.png (``deployments.bench_report``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cluster.local import LOOPBACK
from deployments import bench_report
from deployments.bench_load import (
    SERVED_NAME,
    WARM_STREAMS,
    requests_per_run,
    run_closed_loop,
    send_warm_prompts,
    summarize,
)
from deployments.bench_profile import CpuProfile
from deployments.bench_servers import Server, check_leftovers, start_hosted, start_vllm_serve
from specserve.config import LOCAL_DRAFTER_KINDS, apply_serve_defaults
from specserve.errors import SpecServeError

#: n-gram speculation of the peers, as `vllm serve --speculative-config` takes it (k added per peer).
PEER_NGRAM = {"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 1}
#: Label of the `vllm serve` peer the table's first ratio is to.
VLLM_PLAIN = "`vllm serve` plain"


@dataclass
class Target:
    """One server configuration under test."""

    label: str
    kind: str = "app"  # app (ours) | vllm (`vllm serve`) | ray-llm (Ray Serve LLM)
    app_args: dict | None = None  # build_app args of our app
    peer_spec: dict | None = None  # a peer's speculative config (None = plain)
    drafter: dict = field(default_factory=dict)  # for the in-process baseline (engine hf only)


# ------------------------------------------------------------------------------- configurations


def drafter_from_spec(spec: str, k: int, adaptive: bool) -> dict:
    """``none | ngram | suffix | draft_model:PATH | vllm:local[:KIND] | vllm:METHOD[:PATH]`` as DrafterConfig
    fields (``vllm:local:suffix``: our suffix drafter inside vLLM's worker; ``vllm:local``: our n-gram)."""
    kind, _, path = spec.partition(":")
    if kind == "vllm":
        method, _, model_path = path.partition(":")
        if method == "local":
            if model_path and model_path not in LOCAL_DRAFTER_KINDS:
                raise SpecServeError(f"--drafter {spec}: vllm:local runs {', '.join(LOCAL_DRAFTER_KINDS)}",
                                     param="--drafter")
            return {"kind": model_path or "ngram", "vllm_method": "local", "num_speculative_tokens": k,
                    "adaptive_k": adaptive}
        return {"kind": "ngram", "vllm_method": method, "path": model_path or None, "num_speculative_tokens": k,
                "adaptive_k": adaptive}
    if kind == "none":
        return {"kind": "none", "num_speculative_tokens": 0}
    return {"kind": kind, "path": path or None, "num_speculative_tokens": k, "adaptive_k": adaptive}


def ray_serve_llm_available() -> bool:
    """Ray Serve LLM and the vLLM it runs are installed.

    Found, not imported: importing ray.serve.llm sets the root logger to INFO, and the client would
    then log every request inside the measurements.
    """
    from importlib.util import find_spec

    try:
        return find_spec("ray.serve.llm") is not None and find_spec("vllm") is not None
    except ModuleNotFoundError:  # no ray at all
        return False


def build_targets(args) -> list[Target]:
    """Every configuration the arguments ask for, in run order."""
    model = {"model": args.model, "dtype": args.dtype}
    threads = {"num_threads": args.threads}
    topology = {"draft_worker": threads, "target_rank": threads}
    # What `specserve serve` runs on a config that names no engine and no drafter (engine vllm where installed).
    default = apply_serve_defaults({"model": model, "serve": {"model_name": SERVED_NAME}})
    targets = [Target("default (make serve)", app_args=default)] if args.default else []
    for engine in [] if args.only_default else args.engine:
        for spec in dict.fromkeys(["none", *args.drafter]):  # plain decoding once, even if named
            if spec.startswith("vllm:") and engine != "vllm":
                continue
            targets += _app_targets(engine, spec, args, model, topology)
    if args.vllm_peers:
        targets += _peers("vllm", "`vllm serve`", args.peer_k)
    if args.ray_serve_llm_peers if args.ray_serve_llm_peers is not None else ray_serve_llm_available():
        targets += _peers("ray-llm", "Ray Serve LLM", args.peer_k)
    return targets


def _app_targets(engine: str, spec: str, args, model: dict, topology: dict) -> list[Target]:
    """Our app with one engine and drafter spec (costly remote drafting: pipelined and sequential)."""
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
        return [Target(label, app_args=_with_pipelining(base, engine, False), drafter=drafter)]
    return [Target(f"{label} {'pipelined' if on else 'sequential'}", app_args=_with_pipelining(base, engine, on),
                   drafter=drafter) for on in (True, False)]


def _peers(kind: str, name: str, peer_k: list[int]) -> list[Target]:
    """A peer server plain, then with n-gram speculation at each k (the peer at its best)."""
    return [Target(f"{name} plain", kind)] + [
        Target(f"{name} ngram k={k}", kind, peer_spec={**PEER_NGRAM, "num_speculative_tokens": k}) for k in peer_k]


def _with_pipelining(base: dict, engine: str, on: bool) -> dict:
    if engine == "vllm":
        return {**base, "model": {**base["model"], "vllm": {"pipelining": on}}}
    return {**base, "router": {**base.get("router", {}), "pipelining": on}}


# ------------------------------------------------------------------------------------- measuring


def start_server(target: Target, args, model_dir: str, dtype: str, log_dir: Path) -> Server:
    """Start the target's server process on ``args.port`` (not yet ready)."""
    if target.kind == "vllm":
        return start_vllm_serve(target.label, args.port, model_dir, dtype, target.peer_spec, log_dir)
    if target.kind == "ray-llm":
        config = {"model_dir": model_dir, "dtype": dtype, "speculative_config": target.peer_spec}
        return start_hosted(target.label, "ray-llm", args.port, config, log_dir)
    return start_hosted(target.label, "app", args.port, target.app_args, log_dir)


def warm_up(port: int, prompts: list[str], args) -> None:
    """Decode whole responses, alone and in a batch as large as the largest measured.

    A compiling engine (vLLM's torch.compile on the CPU) compiles for the draft and batch shapes
    it meets on first use, which must not land inside a measurement.
    """
    top = max(args.concurrency)
    run_closed_loop(port, prompts, args.max_tokens, 1, 1)
    run_closed_loop(port, prompts, 32, top, top)


def measure(label: str, server: Server, prompts: list[str], args) -> list[dict]:
    """Warm up, then a closed loop of ``--waves`` full waves at every concurrency, each profiled."""
    warm_up(args.port, prompts, args)
    rows = []
    for conc in args.concurrency:
        server.track()
        with CpuProfile(server.pid) as profile:
            records, wall = run_closed_loop(args.port, prompts, args.max_tokens, conc,
                                            requests_per_run(conc, args.waves, len(prompts)), desc=f"{label} c={conc}")
        row = summarize(records, wall, conc)
        row["cpu"] = profile.result(row["tokens"])
        rows.append(row)
        tqdm.write(_summary_line(label, row))
    return rows


def _summary_line(label: str, row: dict) -> str:
    return (f"{label:<36} c={row['concurrency']:<3} {row['tokens_per_s']:7.1f} tok/s  TTFT p50/p99 "
            f"{row['ttft_p50_ms'] or 0:.0f}/{row['ttft_p99_ms'] or 0:.0f} ms  TPOT p50/p99 "
            f"{row['tpot_p50_ms'] or 0:.1f}/{row['tpot_p99_ms'] or 0:.1f} ms"
            + (f"  {row['failed']} failed" if row["failed"] else ""))


def proposer_stats(port: int) -> dict | None:
    """Our app's proposer counters: the ``proposer`` key of GET /v1/router/status, if it has one."""
    import httpx

    try:
        status = httpx.get(f"http://{LOOPBACK}:{port}/v1/router/status", timeout=30).json()
    except (httpx.HTTPError, ValueError):
        return None
    return status.get("proposer") if isinstance(status, dict) else None


def measure_server(target: Target, prompts: list[str], args, model_dir: str, dtype: str, out: Path,
                   warm_prompts: list[str] | None = None
                   ) -> tuple[list[dict] | None, dict | None, dict | None, list[str]]:
    """Check for leftovers, start the server, send it the warm prompts, measure it, stop it and check
    nothing is left: (rows, proposer statistics or None, warm-up or None, warnings). A server that does
    not come up is a warning and no rows: one peer failing to start must not cost a long run the others."""
    warnings = check_leftovers(args.kill_leftovers, args.allow_leftovers)
    server = start_server(target, args, model_dir, dtype, out)
    rows = stats = warm = None
    try:
        if _wait_ready(server, warnings):
            if warm_prompts:
                warm = send_warm_prompts(args.port, warm_prompts, args.max_tokens, desc=f"{target.label} warm-up")
                if warm["failed"]:
                    warnings.append(f"{target.label}: {warm['failed']} of {warm['requests']} warm-up requests "
                                    f"failed: {warm['errors'][0]}")
            rows = measure(target.label, server, prompts, args)
            stats = proposer_stats(args.port) if target.kind == "app" else None
    finally:
        warnings += server.stop()
    for w in warnings:
        tqdm.write(f"warning: {w}")
    return rows, stats, warm, warnings


def _wait_ready(server: Server, warnings: list[str]) -> bool:
    """Wait for the server; False (and a warning) if it exited or timed out instead."""
    try:
        server.wait_ready()
    except (RuntimeError, TimeoutError) as e:
        warnings.append(f"{server.label}: not measured: {e}")
        return False
    return True


def in_process_baseline(targets: list[Target], encoded: list[list[int]], args, model: dict,
                        warm: list[list[int]] | None = None) -> dict:
    """The in-process hf engine on the same prompts one at a time: tok/s per drafter (each drafter
    having first decoded the warm prompts, as its server did)."""
    import torch

    from specserve.bench import decode_warm_prompts
    from specserve.config import DrafterConfig, EngineConfig, ModelConfig, SamplingParams
    from specserve.engine import SpecEngine

    torch.set_num_threads(args.threads)
    engine = SpecEngine.from_config(EngineConfig(model=ModelConfig(**model),
                                                 drafter=DrafterConfig(kind="none", num_speculative_tokens=0)))
    params = SamplingParams(max_tokens=args.max_tokens)
    engine.generate(encoded[0], params.model_copy(update={"max_tokens": 4}))
    out = {}
    for t in targets:
        if not t.app_args or t.app_args.get("model", {}).get("engine") != "hf":
            continue
        eng = engine.with_drafter(DrafterConfig.model_validate(t.drafter))
        warm_up = decode_warm_prompts(eng, warm or [], params, desc=f"in-process {t.label} warm-up")
        t0, tokens = time.perf_counter(), 0
        for ids in tqdm(encoded, desc=f"in-process {t.label}"):
            tokens += len(eng.generate(ids, params).token_ids)
        seconds = time.perf_counter() - t0
        out[t.label] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "warm_up": warm_up}
    return out


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Per concurrency, the round with the median tok/s (one round: itself), and every round's tok/s."""
    rows = []
    for per_conc in zip(*rounds):
        ranked = sorted(per_conc, key=lambda r: r["tokens_per_s"])
        rows.append({**ranked[(len(ranked) - 1) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in per_conc]})
    return rows


# ---------------------------------------------------------------------------------------- the run


def _write(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(bench_report.markdown_table(results))
    (out / "profile.md").write_text(bench_report.profile_table(results))


def run(args) -> int:
    """Entry point of ``specserve bench-serve``."""
    # A SIGTERM (a job runner stopping the run) ends it as an exception does: the server under test is
    # stopped on the way out instead of left running to skew every later measurement.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from specserve.config import ModelConfig
    from specserve.data import load_prompts
    from specserve.models import ModelInfo, resolve_dtype

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [p["prompt"] for source in args.prompts for p in load_prompts(source)[: args.limit]]
    warm_prompts = [p["prompt"] for source in args.warm_prompts for p in load_prompts(source, "--warm-prompts")]
    model = {"model": args.model, "dtype": args.dtype}
    info = ModelInfo.load(ModelConfig(**model))
    targets = build_targets(args)
    dtype = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}[
        str(resolve_dtype(args.dtype, "cpu"))]
    results: dict = {"config": {"model": model, "max_tokens": args.max_tokens, "prompts": len(prompts),
                                "concurrency": args.concurrency, "waves": args.waves, "k": args.k,
                                "peer_k": args.peer_k, "warm_prompts": len(warm_prompts),
                                "warm_prompt_sources": args.warm_prompts, "warm_streams": WARM_STREAMS,
                                "command": " ".join(sys.argv)},
                     "references": [VLLM_PLAIN, f"`vllm serve` ngram k={args.peer_k[0]}"] if args.vllm_peers else [],
                     "served": {}, "rounds": {t.label: [] for t in targets}, "proposer": {}, "warm_up": {},
                     "warnings": []}
    if args.in_process:
        encoded = [info.encode(p, chat=True) for p in prompts]
        warm = [info.encode(p, chat=True) for p in warm_prompts]
        results["in_process"] = in_process_baseline(targets, encoded, args, model, warm)
    with tqdm(total=args.rounds * len(targets), desc="servers") as progress:
        for rnd in range(args.rounds):
            # Every other round in reverse order: a machine whose speed drifts during the run favours no one.
            for target in targets if rnd % 2 == 0 else targets[::-1]:
                progress.set_postfix_str(target.label)
                rows, stats, warm, warnings = measure_server(target, prompts, args, info.path, dtype, out,
                                                             warm_prompts)
                # Leftovers seen before every server are one warning, not one per server.
                results["warnings"] = list(dict.fromkeys(results["warnings"] + warnings))
                if stats:
                    results["proposer"][target.label] = stats
                if warm:  # one entry per round: every round starts the server afresh
                    results["warm_up"].setdefault(target.label, []).append(warm)
                if rows is not None:
                    results["rounds"][target.label].append(rows)
                    results["served"][target.label] = median_rows(results["rounds"][target.label])
                _write(results, out)
                progress.update()
    for name, base in results.get("in_process", {}).items():
        if name not in results["served"]:  # its server did not come up
            continue
        c1 = results["served"][name][0]
        c1["actor_overhead_ms_per_token"] = 1000 * (c1["seconds"] / c1["tokens"] - 1 / base["tokens_per_s"])
    _write(results, out)
    bench_report.plot(results, out / "serving.png")
    print(bench_report.markdown_table(results))
    print(f"wrote {out / 'results.json'}, table.md, profile.md and serving.png")
    return 0


def add_parser(sub) -> None:
    """Register ``specserve bench-serve``."""
    p = sub.add_parser("bench-serve", help="served tok/s, TTFT and TPOT at several concurrencies, engines x "
                       "drafters, beside `vllm serve` and Ray Serve LLM")
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--engine", action="append", choices=["hf", "vllm"], default=None,
                   help="target engine (repeatable; default hf)")
    p.add_argument("--drafter", action="append", default=None,
                   help="none | ngram | suffix | draft_model:PATH | vllm:local[:ngram|suffix] (ours inside vLLM's worker) | "
                   "vllm:METHOD[:PATH] (vLLM's own; both engine vllm only); "
                   "engine hf takes options after '@': router / workers (where drafting runs), nowait (no batch "
                   "gathering), e.g. ngram@workers,nowait; repeatable; default ngram. Plain decoding is always "
                   "measured.")
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--no-adaptive", action="store_true", help="fixed k instead of adaptive k")
    p.add_argument("--prompts", action="append", required=True, help="FILE.jsonl or sharegpt:N (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts per source")
    p.add_argument("--warm-prompts", action="append", default=[], metavar="SPEC",
                   help="FILE.jsonl, sharegpt:N or sharegpt-train:N (repeatable; --limit does not apply): sent "
                   f"untimed through the chat API ({WARM_STREAMS} streams) to every server, ours and the peers, "
                   "once it is ready and before its timed waves, to fill cross-request caches (suffix); "
                   "default none")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--waves", type=int, default=3,
                   help="at concurrency c, c clients send requests back to back until WAVES x c requests (and "
                   "every prompt at least once) are done")
    p.add_argument("--port", type=int, default=8000, help="port of every server under test (one at a time)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process engine and each actor")
    p.add_argument("--only-default", action="store_true",
                   help="measure only the server's default configuration (and the peers)")
    p.add_argument("--no-default", dest="default", action="store_false",
                   help="skip the server's default configuration (what `make serve` runs)")
    p.add_argument("--no-vllm-peers", dest="vllm_peers", action="store_false",
                   help="skip `vllm serve` plain and n-gram")
    p.add_argument("--ray-serve-llm-peers", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure Ray Serve LLM plain and n-gram (default: when ray.serve.llm and vllm are "
                   "installed)")
    p.add_argument("--peer-k", type=int, nargs="+", default=[4],
                   help="k of the peers' n-gram speculation (several: one peer each; ratios are to the first)")
    p.add_argument("--kill-leftovers", action="store_true",
                   help="end engine and Ray processes of other runs by pid instead of refusing to measure")
    p.add_argument("--allow-leftovers", action="store_true",
                   help="measure beside engine and Ray processes of other runs (the results carry a warning)")
    p.add_argument("--in-process", action="store_true",
                   help="also run the in-process hf engine (actor-hop overhead per token)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every configuration this many times, interleaved (every other round in reverse "
                   "order); tables show the median round")
    p.add_argument("--out", required=True)

    def handler(args):
        from cluster.local import use_loopback

        use_loopback()
        for flag, value in (("--rounds", args.rounds), ("--waves", args.waves),
                            ("--concurrency", min(args.concurrency))):
            if value < 1:
                raise SpecServeError(f"{flag} must be at least 1, got {value}", param=flag)
        if args.kill_leftovers and args.allow_leftovers:
            raise SpecServeError("--kill-leftovers and --allow-leftovers exclude each other", param="--kill-leftovers")
        args.drafter = args.drafter or ["ngram"]
        args.engine = args.engine or ["hf"]
        return run(args)

    p.set_defaults(handler=handler)
