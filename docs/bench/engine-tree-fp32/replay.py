"""Greedy replay of n-gram drafting, chain against tree, over recorded plain outputs.

With greedy decoding the target accepts a draft token exactly when it equals the plain
output's next token, so the accepted length of every step can be computed from a plain
run's output without running the model. This replays section 1's recorded SmolLM2 outputs
(30 held-out ShareGPT chat turns, 12 grounded edit prompts, 128 tokens) with a fixed k.

    .venv/bin/python docs/bench/engine-tree-fp32/replay.py
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from specserve.config import TreeConfig
from specserve.data import load_prompts
from specserve.drafters.ngram import lookup, ngram_tree
from specserve.models import default_model_dir
from specserve.tree import ROOT, DraftTree

RESULTS = Path(__file__).resolve().parent.parent / "engine-ngram-bf16" / "results.json"
K = 6
BUDGETS = {"chain": None, "tree 16 nodes, branching 3": TreeConfig(max_nodes=16, branching=3),
           "tree 32, branching 4": TreeConfig(max_nodes=32, branching=4),
           "tree 64, branching 8": TreeConfig(max_nodes=64, branching=8)}


def accepted(tree: DraftTree, truth: list[int]) -> int:
    """Greedy acceptance of ``tree`` when the target's continuation is ``truth``."""
    node, n = ROOT, 0
    while n < len(truth):
        nxt = [c for c in tree.children(node) if tree.tokens[c] == truth[n]]
        if not nxt:
            break
        node, n = nxt[0], n + 1
    return n


def replay(prompt_ids: list[int], output: list[int], budget: TreeConfig | None) -> tuple[int, int]:
    """(drafting steps, accepted tokens) of one request."""
    steps = total = pos = 0
    while pos < len(output):
        seq, truth = prompt_ids + output[:pos], output[pos:]
        if budget is None:
            tree = DraftTree.chain(lookup(seq, K, 1, 4))
        else:
            tree = ngram_tree(seq, budget.model_copy(update={"max_depth": K}), 1, 4)
        n = accepted(tree, truth)
        steps += bool(len(tree))
        total += n
        pos += n + 1
    return steps, total


def main() -> None:
    """Print mean accepted length per prompt set and budget."""
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    recorded = json.loads(RESULTS.read_text())
    prompts = {r["id"]: r for r in load_prompts("sharegpt:30") + load_prompts("prompts/grounded.jsonl")}
    print("| prompts | drafter | mean accepted length | vs chain |\n|---|---|---|---|")
    for set_name in ("sharegpt", "grounded"):
        rows = [p for p in recorded["prompts"] if p["set"] == set_name]
        chain_mal = None
        for label, budget in BUDGETS.items():
            steps = total = 0
            for row in rows:
                messages = [{"role": "user", "content": prompts[row["id"]]["prompt"]}]
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
                s, a = replay(list(ids), row["runs"]["none"]["token_ids"], budget)
                steps, total = steps + s, total + a
            mal = 1 + total / max(1, steps)
            chain_mal = chain_mal or mal
            print(f"| {set_name} ({len(rows)}) | {label} | {mal:.2f} | {mal / chain_mal - 1:+.0%} |")


if __name__ == "__main__":
    main()
