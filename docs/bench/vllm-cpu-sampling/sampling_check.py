"""Does vLLM's sampling keep the target distribution, with and without its own n-gram speculation?

    .venv/bin/python docs/bench/vllm-cpu-sampling/sampling_check.py ngram|plain TOP_P [unseeded]

300 seeded 2-token samples of SmolLM2 (fp32) through vllm.LLM, against the exact probabilities of
the likeliest 6 x 6 continuations (the rest pooled) computed with transformers; prints a JSON line
with the chi-square p-value and, as a power check, the p-value against a 10%-shifted distribution.
"""
import collections
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
if __name__ == "__main__":
    # A fixed KV cache size: without one, vLLM's CPU worker reserves a share of the node's memory and
    # refuses to start when page cache holds more than that.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from distribution import chi_square_p_value, pooled, shifted, top_two_token_distribution
    from vllm import LLM, TokensPrompt
    from vllm import SamplingParams as VSP

    from specserve.config import ModelConfig, SamplingParams
    from specserve.models import load_model
    mode = sys.argv[1]
    TOP_P = float(sys.argv[2])
    SEEDED = sys.argv[3:] != ["unseeded"]
    path = os.path.expanduser("~/.cache/specserve/SmolLM2-135M-Instruct-bf16")
    tgt = load_model(ModelConfig(dtype="fp32"))
    ids = tgt.tokenizer.encode("one two three one two three one two three one two")
    params = SamplingParams(max_tokens=2, temperature=1.0, top_p=TOP_P, ignore_eos=True)
    exp = top_two_token_distribution(tgt, ids, params)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1} if mode == "ngram" else None
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=512, speculative_config=spec, seed=0)
    sps = [VSP(max_tokens=2, temperature=1.0, top_p=TOP_P, seed=s if SEEDED else None, ignore_eos=True)
           for s in range(300)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids)] * 300, sps, use_tqdm=False)
    counts = collections.Counter(tuple(o.outputs[0].token_ids) for o in outs)
    pc = pooled(dict(counts), exp)
    print(json.dumps({"mode": mode, "top_p": TOP_P, "seeded": SEEDED, "p": chi_square_p_value(pc, exp, 300), "p_shifted": chi_square_p_value(pc, shifted(exp, 0.1), 300), "other": exp[("other",)], "counts": {str(k): v for k, v in pc.items()}}))
