"""Verification pass time by width on this machine: a chain of k draft tokens vs a depth-1 tree.

Run: .venv/bin/python docs/bench/engine-tree-block-wide-fp32/pass_width.py
Real SmolLM2-135M in fp32, a 300-token cached prefix, 2 threads, hidden states of the block
drafter's five taps returned (as the block drafter needs); medians of 8 interleaved repeats.
"""

import statistics
import time

import torch

from specserve.config import ModelConfig, SamplingParams
from specserve.models import load_model
from specserve.target import StepRequest, TreeStepRequest, Verifier
from specserve.tree import ROOT, DraftTree

torch.set_num_threads(2)
verifier = Verifier(load_model(ModelConfig(dtype="fp32")), hidden_layers=(1, 8, 15, 22, 29))
prompt = torch.randint(100, 20000, (300,), generator=torch.Generator().manual_seed(0)).tolist()
verifier.add("a", prompt, SamplingParams(temperature=0.0))


def star(n: int) -> DraftTree:
    tree = DraftTree()
    for i in range(n):
        tree.add(1000 + i, ROOT, 0.1)
    return tree


cases = {f"chain k={k}": (lambda k=k: StepRequest("a", prompt[-1], list(range(500, 500 + k)))) for k in
         (0, 1, 2, 3, 4, 5, 7, 8, 11, 15, 16)}
cases |= {f"tree {n} nodes": (lambda n=n: TreeStepRequest("a", prompt[-1], star(n))) for n in (8, 12, 16)}
times: dict[str, list[float]] = {name: [] for name in cases}
for _ in range(8):
    for name, make in cases.items():
        t0 = time.perf_counter()
        verifier.verify([make()])
        times[name].append(time.perf_counter() - t0)
        state = verifier.states["a"]
        if state.num_cached > 300:
            state.cache.crop(300 - state.num_cached)  # back to the prefix
            state.num_cached = 300
plain = statistics.median(times["chain k=0"])
print("| pass | width | ms | vs plain step |\n|---|---|---|---|")
for name, xs in times.items():
    width = 1 + int(name.split("=")[1]) if name.startswith("chain") else 1 + int(name.split()[1])
    print(f"| {name} | {width} | {1000 * statistics.median(xs):.1f} | {statistics.median(xs) / plain:.2f}x |")
