"""The block drafter: network and config (``net``), checkpoints (``ckpt``), the serving-time drafter (``drafter``)."""

from specserve.drafters.block.ckpt import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    DEFAULT_CHECKPOINT,
    check_fingerprint,
    default_checkpoint,
    drafter_config,
    load_model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
    target_fingerprint,
)
from specserve.drafters.block.drafter import DRAFT_PASS_COST, BlockDrafter, load_block_drafter
from specserve.drafters.block.net import BlockDrafterConfig, BlockDrafterModel, DraftLayer, build_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "DEFAULT_CHECKPOINT",
    "DRAFT_PASS_COST",
    "BlockDrafter",
    "BlockDrafterConfig",
    "BlockDrafterModel",
    "DraftLayer",
    "build_model",
    "check_fingerprint",
    "default_checkpoint",
    "drafter_config",
    "load_block_drafter",
    "load_model_from_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "target_fingerprint",
]
