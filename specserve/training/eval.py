"""``specserve eval-drafter``: a block drafter checkpoint through the real engine, against plain decoding.

It runs ``specserve.bench.run_bench`` (plain decoding and the block drafter back to back on
every prompt) and pools the per-request counters: mean accepted length (accepted draft
tokens per block + the bonus/recovered token), acceptance by position, and speedup in
tokens/s, overall and per prompt set.
"""

from __future__ import annotations

import json
from pathlib import Path

from specserve.bench import BenchSpec, run_bench
from specserve.config import DrafterConfig, EngineConfig, ModelConfig, SamplingParams
from specserve.drafters.block import drafter_config, read_checkpoint
from specserve.engine import SpecEngine
from specserve.stats import SpecStats


def pooled_stats(rows: list[dict], method: str) -> SpecStats:
    """Counters of ``method`` summed over benchmark rows."""
    total = SpecStats()
    for row in rows:
        s = row["runs"][method]["stats"]
        total.merge(SpecStats(**{k: s[k] for k in (
            "num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_position",
            "drafted_per_position", "num_steps", "draft_time_s", "verify_time_s", "prefill_time_s")}))
    return total


def summarize_drafter(results: dict, method: str) -> dict:
    """Per prompt set (and overall): pooled mean accepted length, acceptance by position, speedup."""
    sets = {"overall": results["prompts"]}
    for name in results["by_set"]:
        sets[name] = [r for r in results["prompts"] if r["set"] == name]
    out = {}
    for name, rows in sets.items():
        stats = pooled_stats(rows, method)
        summary = results["overall"] if name == "overall" else results["by_set"][name]
        out[name] = {
            "prompts": len(rows),
            "mean_accepted_length": stats.mean_accepted_length,
            "acceptance_by_position": [round(a, 4) for a in stats.acceptance_by_position()],
            "speedup": summary[method]["speedup"],
            "tokens_per_s": summary[method]["tokens_per_s"],
            "baseline_tokens_per_s": summary["none"]["tokens_per_s"],
            "matches_baseline": summary[method]["matches_baseline"],
        }
    return out


def evaluate(checkpoint: Path, prompts: list[dict], out_dir: Path, *, model: str = "default",
             dtype: str = "auto", k: int | None = None, adaptive: bool = False,
             params: SamplingParams | None = None, threads: int | None = None) -> dict:
    """Benchmark ``checkpoint`` against plain decoding on ``prompts`` (chat template applied).

    ``k`` defaults to the drafter's block size; a fixed k (``adaptive=False``) makes mean accepted
    lengths comparable between checkpoints.
    """
    block_size = drafter_config(read_checkpoint(checkpoint)["config"]).block_size
    engine = SpecEngine.from_config(EngineConfig(
        model=ModelConfig(model=model, dtype=dtype, num_threads=threads),
        drafter=DrafterConfig(kind="none", num_speculative_tokens=0)))
    drafter = DrafterConfig(kind="block", path=str(checkpoint), num_speculative_tokens=k or block_size,
                            adaptive_k=adaptive)
    params = params or SamplingParams(max_tokens=128)
    results = run_bench(engine, prompts, BenchSpec([drafter], params, chat=True, peers=False), Path(out_dir))
    report = {"checkpoint": str(checkpoint), "drafter": drafter.model_dump(), "params": params.model_dump(),
              "results": summarize_drafter(results, drafter.spec())}
    (Path(out_dir) / "eval.json").write_text(json.dumps(report, indent=1))
    return report
