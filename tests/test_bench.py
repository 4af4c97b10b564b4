"""The benchmark runner: interleaved baseline and drafters, results.json and the plot."""

from __future__ import annotations

import json

from specserve.bench import BenchSpec, run_bench
from specserve.config import DrafterConfig, SamplingParams
from specserve.drafters import make_drafter
from specserve.engine import SpecEngine


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
    assert (tmp_path / "speedup.png").stat().st_size > 10_000
