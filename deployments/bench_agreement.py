"""``specserve bench-agreement``: greedy fp32 outputs of engine vllm vs engine hf, per prompt."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tqdm import tqdm


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


def add_parser(sub) -> None:
    """Register ``specserve bench-agreement``."""
    a = sub.add_parser("bench-agreement", help="greedy fp32 outputs of engine vllm vs engine hf, per prompt")
    a.add_argument("--model", default="default")
    a.add_argument("--prompts", action="append", required=True, help="FILE.jsonl or sharegpt:N")
    a.add_argument("--limit", type=int, default=None, help="at most this many prompts per source")
    a.add_argument("--max-tokens", type=int, default=128)
    a.add_argument("--threads", type=int, default=2, help="torch threads of the hf engine")
    a.add_argument("--out", required=True)
    a.set_defaults(handler=engine_agreement)
