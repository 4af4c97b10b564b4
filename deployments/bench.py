"""``specserve bench-serve``: served tokens/s through Ray Serve at several concurrencies.

For each configuration (plain decoding, speculative with pipelining on and off) the app is
deployed on a local Ray (127.0.0.1), then the same prompts are sent by 1, 4, 16... streaming
clients; the in-process engine runs the same prompts one at a time in the same run, which
gives the per-token overhead of the actor hops. Writes ``results.json`` and ``serving.png``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from cluster.local import LOOPBACK


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float, float]:
    """One streaming request: (completion tokens, seconds, time to first token)."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json={**body, "stream": True,
                                                "stream_options": {"include_usage": True}}) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - t0, ttft or 0.0


async def _load(url: str, bodies: list[dict], concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(body):
            async with sem:
                return await _stream(client, url, body)

        t0 = time.perf_counter()
        results = await asyncio.gather(*[one(b) for b in bodies])
        wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    return {"concurrency": concurrency, "requests": len(bodies), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "mean_ttft_s": sum(r[2] for r in results) / len(results)}


def run(args) -> int:
    """Entry point of ``specserve bench-serve``."""
    import torch
    from ray import serve

    from cluster.local import init_local_ray
    from deployments.app import build_app, wait_until_ready
    from specserve.config import DrafterConfig, EngineConfig, ModelConfig, SamplingParams
    from specserve.data import load_prompts
    from specserve.engine import SpecEngine

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = []
    for source in args.prompts:
        prompts += load_prompts(source)[: args.limit]
    model = {"model": args.model, "dtype": args.dtype}
    configs = {"plain": ({"kind": "none", "num_speculative_tokens": 0}, {"pipelining": False})}
    for spec in args.drafter:
        kind, _, path = spec.partition(":")
        drafter = {"kind": kind, "path": path or None, "num_speculative_tokens": args.k,
                   "adaptive_k": not args.no_adaptive}
        label = kind if kind != "draft_model" else f"draft_model:{Path(path).name}"
        if kind == "ngram":  # free drafting is never pipelined (see RouterConfig.pipelining)
            configs[label] = (drafter, {"pipelining": False})
        else:
            configs[f"{label} pipelined"] = (drafter, {"pipelining": True})
            configs[f"{label} sequential"] = (drafter, {"pipelining": False})

    # In-process engine on the same prompts, one at a time: the baseline for actor-hop overhead.
    engine_cfg = EngineConfig(model=ModelConfig(**model), drafter=DrafterConfig(kind="none",
                                                                                 num_speculative_tokens=0))
    engine = SpecEngine.from_config(engine_cfg)
    params = SamplingParams(max_tokens=args.max_tokens)
    encoded = [engine.info.encode(p["prompt"], chat=True) for p in prompts]
    engine.generate(encoded[0], params.model_copy(update={"max_tokens": 4}))
    in_process = {}
    for name, (drafter, _) in configs.items():
        eng = engine.with_drafter(DrafterConfig.model_validate(drafter))
        t0, tokens = time.perf_counter(), 0
        # The same prompts, in the same order, as the served run at the lowest concurrency.
        n_first = max(args.concurrency[0] * 2, args.requests)
        for ids in tqdm([encoded[i % len(encoded)] for i in range(n_first)], desc=f"in-process {name}"):
            tokens += len(eng.generate(ids, params).token_ids)
        in_process[name] = {"tokens": tokens, "seconds": time.perf_counter() - t0}
        in_process[name]["tokens_per_s"] = tokens / in_process[name]["seconds"]
    del engine

    init_local_ray(num_cpus=8)
    serve.start(http_options={"host": LOOPBACK, "port": args.port})
    results: dict = {"config": {"model": model, "max_tokens": args.max_tokens, "prompts": len(prompts),
                                "k": args.k}, "in_process": in_process, "served": {}}
    url = f"http://{LOOPBACK}:{args.port}/v1/chat/completions"
    for name, (drafter, router) in configs.items():
        threads = {"num_threads": args.threads}
        app = build_app({"model": model, "drafter": drafter, "router": router,
                         "topology": {"draft_worker": threads, "target_rank": threads},
                         "serve": {"model_name": "bench"}})
        serve.run(app, name="bench", route_prefix="/", blocking=False)
        wait_until_ready("bench")
        rows = []
        for conc in args.concurrency:
            n = max(conc * 2, args.requests)
            bodies = [{"model": "bench", "messages": [{"role": "user", "content": prompts[i % len(prompts)]["prompt"]}],
                       "max_tokens": args.max_tokens, "temperature": 0} for i in range(n)]
            asyncio.run(_load(url, bodies[:1], 1))  # warm-up
            row = asyncio.run(_load(url, bodies, conc))
            rows.append(row)
            print(f"{name:<34} c={conc:<3} {row['tokens_per_s']:7.1f} tok/s  ttft {row['mean_ttft_s']:.3f} s",
                  flush=True)
        results["served"][name] = rows
        serve.delete("bench")
    serve.shutdown()
    for name, rows in results["served"].items():
        c1 = rows[0]
        per_token_served = c1["seconds"] / c1["tokens"]
        per_token_engine = 1 / in_process[name]["tokens_per_s"]
        results["served"][name][0]["actor_overhead_ms_per_token"] = 1000 * (per_token_served - per_token_engine)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _plot(results, out / "serving.png")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in results["served"].items():
        ax.plot([r["concurrency"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("served tokens/s (all streams)")
    ax.set_title(f"{results['config']['model']['model']} {results['config']['model']['dtype']} via Ray Serve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(sub) -> None:
    """Register ``specserve bench-serve``."""
    p = sub.add_parser("bench-serve", help="served tokens/s at several concurrencies, speculative vs plain")
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--drafter", action="append", default=None, help="drafter spec (repeatable); default ngram")
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--no-adaptive", action="store_true", help="fixed k instead of adaptive k")
    p.add_argument("--prompts", action="append", required=True, help="FILE.jsonl or sharegpt:N")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least 2x it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process engine and each actor")
    p.add_argument("--out", required=True)

    def handler(args):
        from cluster.local import use_loopback

        use_loopback()
        args.drafter = args.drafter or ["ngram"]
        return run(args)

    p.set_defaults(handler=handler)
