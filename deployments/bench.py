"""``specserve bench-serve``: what users compare between servers, through the OpenAI API.

Each server under test runs alone on the machine, started and stopped in turn: our app for each
configuration asked for (engine hf / vllm x drafters, and the server's defaults as ``make serve``
runs them), and as peers in the same run ``vllm serve`` and Ray Serve LLM on the same model,
plain and with n-gram speculation (``deployments.bench_targets``). Our app and Ray Serve LLM each
get a Ray of their own (``deployments.bench_host``); nothing runs beside a leftover engine or Ray
(``deployments.bench_servers``).

At each concurrency c, c clients of the official ``openai`` client send streaming requests back
to back for ``--waves`` full waves (``deployments.bench_load``), reporting tok/s and TTFT and
TPOT p50/p99 as ``vllm bench serve`` defines them, and where the CPU went by process role
(``deployments.bench_profile``); ``deployments.bench_measure`` does this for one server. With
``--warm-prompts``, every server first answers those prompts through the same API, untimed, so
that drafters that learn across requests are measured warm. ``--in-process`` adds the in-process
hf engine as a reference (``deployments.bench_in_process``). This module runs the rounds and
holds the command line. Writes results.json, table.md, profile.md and serving.png
(``deployments.bench_report``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from deployments import bench_report
from deployments.bench_in_process import in_process_baseline
from deployments.bench_load import WARM_STREAMS, unseen_slices
from deployments.bench_measure import measure_server
from deployments.bench_targets import VLLM_PLAIN, build_targets
from specserve.errors import SpecServeError


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Per concurrency, the round with the median tok/s (one round: itself), and every round's tok/s."""
    rows = []
    for per_conc in zip(*rounds):
        ranked = sorted(per_conc, key=lambda r: r["tokens_per_s"])
        rows.append({**ranked[(len(ranked) - 1) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in per_conc]})
    return rows


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
    if args.unseen_prompts:
        unseen_slices(len(prompts), args.concurrency, args.waves)  # enough prompts? (before any server starts)
    warm_prompts = [p["prompt"] for source in args.warm_prompts for p in load_prompts(source, "--warm-prompts")]
    model = {"model": args.model, "dtype": args.dtype}
    info = ModelInfo.load(ModelConfig(**model))
    targets = build_targets(args)
    dtype = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}[
        str(resolve_dtype(args.dtype, "cpu"))]
    results: dict = {"config": {"model": model, "max_tokens": args.max_tokens, "prompts": len(prompts),
                                "concurrency": args.concurrency, "waves": args.waves, "k": args.k,
                                "unseen_prompts": args.unseen_prompts,
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
    p.add_argument("--unseen-prompts", action="store_true",
                   help="send no prompt twice: the engine warm-up and every concurrency take prompts of their own "
                   "(WAVES x c each, so many prompts are needed, e.g. sharegpt:200); fair to drafters that learn "
                   "across requests (suffix), which would draft a repeated prompt's earlier answer")
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
        if args.unseen_prompts and args.rounds > 1:
            raise SpecServeError("--unseen-prompts takes one round (a second round would repeat the prompts): "
                                 "drop --rounds", param="--unseen-prompts")
        args.drafter = args.drafter or ["ngram"]
        args.engine = args.engine or ["hf"]
        return run(args)

    p.set_defaults(handler=handler)
