"""Engine vllm, one stream, one run (docs/benchmarks.md section 5): vLLM plain / vLLM ngram / vLLM suffix (arctic-inference) / ours suffix in vLLM's worker, all through VllmCore.

Usage: PYTHONPATH=DIR_WITH_arctic_inference python docs/bench/vllm-suffix-peers/run.py OUT.json [WARM_PROMPTS]

Each configuration: warm prompts decoded untimed (16 at a time), then the timed prompts one at a time (1 stream).
"""
import asyncio
import json
import sys
import time
from pathlib import Path

from specserve.config import ModelConfig, SamplingParams
from specserve.data import load_prompts
from specserve.models import ModelInfo

OUT = Path(sys.argv[1])
WARM = int(sys.argv[2]) if len(sys.argv) > 2 else 256
PARAMS = SamplingParams(max_tokens=128)
CONFIGS = {
    "vllm plain": {"kind": "none", "num_speculative_tokens": 0},
    "vllm ngram k=4": {"vllm_placement": "vllm_builtin", "vllm_builtin_method": "ngram", "num_speculative_tokens": 4},
    "vllm suffix": {"vllm_placement": "vllm_builtin", "vllm_builtin_method": "suffix", "num_speculative_tokens": 8},
    "ours suffix (vllm_worker)": {"kind": "suffix", "vllm_placement": "vllm_worker", "num_speculative_tokens": 8},
}


def replica(drafter):
    return {"model": {"engine": "vllm", "dtype": "bf16", "vllm": {"kv_cache_gb": 2, "max_num_seqs": 16}},
            "drafter": drafter, "max_model_len": 4096, "topology": {"draft_worker": {"num_cpus": 0.1}}}


async def collect(core, ids):
    tokens, last = [], None
    async for chunk in core.generate(ids, PARAMS, "bench"):
        tokens += chunk.token_ids
        last = chunk
    return tokens, last


async def main():
    from actors.config import ReplicaConfig
    from actors.vllm_core import VllmCore
    from cluster.local import init_local_ray
    init_local_ray(num_cpus=2)
    info = ModelInfo.load(ModelConfig())
    timed = [r for src in ("sharegpt:12", "prompts/code.jsonl", "prompts/grounded.jsonl") for r in load_prompts(src)[:12]]
    warm = [info.encode(r["prompt"], chat=True) for r in load_prompts(f"sharegpt-train:{WARM}")] if WARM else []
    warm = [w for w in warm if len(w) < 3000]
    enc = [info.encode(r["prompt"], chat=True) for r in timed]
    results = {"warm_prompts": len(warm), "configs": {}}
    for name, drafter in CONFIGS.items():
        core = VllmCore(ReplicaConfig.model_validate(replica(drafter)))
        await core.start()
        try:
            sem = asyncio.Semaphore(16)
            async def one(ids, core=core, sem=sem):
                async with sem:
                    return await collect(core, ids)
            t0 = time.perf_counter()
            if warm and "suffix" in name:
                await asyncio.gather(*[one(w) for w in warm])
            warm_s = time.perf_counter() - t0
            await collect(core, enc[0][:64])  # kernels
            rows = []
            for rec, ids in zip(timed, enc):
                t0 = time.perf_counter()
                tokens, last = await collect(core, ids)
                rows.append({"id": rec["id"], "set": rec["set"], "tokens": len(tokens), "seconds": time.perf_counter() - t0,
                             "token_ids": tokens, "spec": (last.stats if last is not None else None)})
            results["configs"][name] = {"warm_seconds": warm_s, "rows": rows}
            by = {}
            for r in rows:
                b = by.setdefault(r["set"], [0, 0.0])
                b[0] += r["tokens"]
                b[1] += r["seconds"]
            print(name, f"warm {warm_s:.0f}s", {s: round(t / sec, 1) for s, (t, sec) in by.items()}, flush=True)
        finally:
            core.shutdown()
        OUT.write_text(json.dumps(results))

if __name__ == "__main__":
    asyncio.run(main())
