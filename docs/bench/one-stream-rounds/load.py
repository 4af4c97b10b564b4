"""Closed-loop load on a running `specserve serve` (127.0.0.1:PORT) with bench-serve's 18 held-out prompts:
  .venv/bin/python docs/bench/one-stream-rounds/load.py PORT 16,64"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))  # the repo root
import deployments.bench_load as bl
bl.SERVED_NAME = "smollm2-135m-instruct"
from deployments.bench_load import run_closed_loop, summarize
from specserve.data import load_prompts
port = int(sys.argv[1]); concs = [int(c) for c in sys.argv[2].split(",")]
ps = []
for src in ["sharegpt:6", "prompts/code.jsonl", "prompts/grounded.jsonl"]:
    ps += load_prompts(src)[:6]
texts = [p["prompt"] if isinstance(p, dict) and "prompt" in p else p for p in ps]
for c in concs:
    n = max(2 * c, 18)
    recs, wall = run_closed_loop(port, texts, 128, c, n)
    s = summarize(recs, wall, c)
    print(c, {k: s[k] for k in s if k in ("tok_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "failed")} or s, flush=True)
