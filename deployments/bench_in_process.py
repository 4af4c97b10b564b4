"""``bench-serve --in-process``: the in-process hf engine on the same prompts, one at a time, as
the reference our served engine hf is compared to (the actor hop's overhead per token)."""

from __future__ import annotations

import time

from tqdm import tqdm

from deployments.bench_targets import Target


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
        warm_up.pop("outputs")
        t0, tokens = time.perf_counter(), 0
        for ids in tqdm(encoded, desc=f"in-process {t.label}"):
            tokens += len(eng.generate(ids, params).token_ids)
        seconds = time.perf_counter() - t0
        out[t.label] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "warm_up": warm_up}
    return out
