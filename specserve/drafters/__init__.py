"""Drafters: the proposers of draft blocks, built from a DrafterConfig."""

from __future__ import annotations

from specserve.config import DrafterConfig, ModelConfig
from specserve.drafters.base import DraftBlock, Drafter
from specserve.errors import SpecServeError
from specserve.models import LoadedModel, load_model, same_tokenizer

__all__ = ["DraftBlock", "Drafter", "make_drafter"]


def make_drafter(cfg: DrafterConfig, target: LoadedModel) -> Drafter:
    """Build the drafter ``cfg`` names, checking that it fits ``target``."""
    if cfg.tree.max_nodes and cfg.kind != "none" and cfg.num_speculative_tokens:
        from specserve.config import TreeConfig
        from specserve.drafters.tree import TreeDrafter
        from specserve.tree import check_budget

        if target is not None:  # model-free drafters on actors get no target: their host checks the budget
            check_budget(cfg.tree, target.max_context)
        return TreeDrafter(make_drafter(cfg.model_copy(update={"tree": TreeConfig()}), target), cfg.tree)
    if not cfg.drafts:
        from specserve.drafters.none import NoDrafter

        return NoDrafter()
    if cfg.kind == "ngram":
        from specserve.drafters.ngram import NgramDrafter

        return NgramDrafter(cfg.ngram_min, cfg.ngram_max)
    if cfg.kind == "suffix":
        from specserve.drafters.suffix import SuffixDrafter

        return SuffixDrafter(max_depth=cfg.suffix_max_depth, min_match=cfg.suffix_min_match,
                             spec_factor=cfg.suffix_spec_factor, own_min_match=cfg.suffix_own_min_match,
                             own_spec_factor=cfg.suffix_own_spec_factor, min_prob=cfg.suffix_min_prob,
                             cache_requests=cfg.suffix_cache_requests, cache_tokens=cfg.suffix_cache_tokens,
                             cache_prompts=cfg.suffix_cache_prompts)
    if cfg.kind == "draft_model":
        from specserve.drafters.draft_model import DraftModelDrafter

        draft_cfg = ModelConfig(model=cfg.path, dtype=_dtype_name(target), device=str(target.device))
        try:
            draft = load_model(draft_cfg)
        except SpecServeError as e:
            raise SpecServeError(e.message.replace("model ", "draft model ", 1), param="drafter") from None
        if not same_tokenizer(draft.tokenizer, target.tokenizer):
            raise SpecServeError(
                f"draft model {cfg.path!r} has a different tokenizer from the target {target.path!r}: "
                "a draft model must share the target's vocabulary",
                param="drafter",
            )
        n_target = sum(p.numel() for p in target.model.parameters())
        return DraftModelDrafter(draft, n_target)
    if cfg.kind == "block":
        from specserve.drafters.block import load_block_drafter

        return load_block_drafter(cfg, target)
    if cfg.kind == "hybrid":
        from specserve.drafters.block import load_block_drafter
        from specserve.drafters.hybrid import HybridDrafter

        return HybridDrafter(load_block_drafter(cfg, target), cfg.ngram_min, cfg.ngram_max)
    raise SpecServeError(f"unknown drafter {cfg.kind!r}", param="drafter")


def _dtype_name(target: LoadedModel) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[target.dtype]


#: The drafter used when none is named: n-gram prompt lookup. The shipped block drafter (``block`` /
#: ``hybrid`` with no path) is an option, not the default, until a `specserve bench` run shows it beating
#: n-gram lookup (docs/drafter-training.md).
DEFAULT_DRAFTER = "ngram"
