"""Cost of keeping an accepted tree path in the KV cache: select slots in place vs crop and re-feed.

SmolLM2 fp32, one thread, 200-token context, a 16-node tree, a kept path (root + 2 nodes) that is
not a prefix of the tree's inputs. Median of 10 repeats each.

    .venv/bin/python docs/bench/engine-tree-fp32/kv_keep.py
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache

from specserve.config import ModelConfig
from specserve.models import load_model
from specserve.target import _keep_slots
from specserve.tree import ROOT, DraftTree, flatten


def main() -> None:
    """Print the median time of each way."""
    torch.set_num_threads(1)
    model = load_model(ModelConfig(dtype="fp32")).model
    prefix = list(range(1000, 1200))
    tree = DraftTree()
    for i in range(16):
        tree.add(2000 + i, ROOT if i < 4 else (i - 4) // 3, 0.5)
    kept = [0, 2, 6]  # input indices: the root, node 1, node 5 (node 5's parent is node 1)
    base = len(prefix) - 1

    @torch.inference_mode()
    def verified() -> DynamicCache:
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prefix[:-1]]), past_key_values=cache, use_cache=True)
        ids, mask, pos = flatten(tree, prefix[-1], base, model.dtype)
        model(input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=pos, past_key_values=cache,
              use_cache=True)
        return cache

    select, refeed = [], []
    for _ in range(10):
        cache = verified()
        t0 = time.perf_counter()
        with torch.inference_mode():
            _keep_slots(cache, base, kept)
        select.append(time.perf_counter() - t0)
        cache = verified()
        t0 = time.perf_counter()
        with torch.inference_mode():
            cache.crop(-(cache.get_seq_length() - base))
            model(input_ids=torch.tensor([[prefix[-1]] + [tree.tokens[i - 1] for i in kept[1:]]]),
                  past_key_values=cache, use_cache=True)
        refeed.append(time.perf_counter() - t0)
    print(f"select slots in place: {1000 * statistics.median(select):.2f} ms; "
          f"crop + re-feed {len(kept)} tokens: {1000 * statistics.median(refeed):.2f} ms")


if __name__ == "__main__":
    main()
