"""``specserve bench-pipelining``: the remote proposer's cost per step, pipelined or not."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


def proposer_pipelining(args) -> int:
    """``specserve bench-pipelining``: the remote proposer's cost per step, pipelined or not.

    Drives ``VllmRemoteProposer`` as vLLM's model runner does, against a real draft worker on a
    local Ray, with verification stood in for by a sleep of ``--verify-ms`` and every draft
    accepted (the case pipelining is for). Reports wall ms per step and the proposer's own wait.
    """
    from types import SimpleNamespace

    import numpy as np
    import ray

    from actors.draft_worker import DraftWorker
    from actors.vllm_proposer import CONFIG_KEY, VllmRemoteProposer
    from cluster.local import init_local_ray
    from specserve.config import ModelConfig
    from specserve.models import ModelInfo

    init_local_ray(num_cpus=4)
    info = ModelInfo.load(ModelConfig(model=args.model))
    drafter = {"kind": "draft_model", "path": args.draft, "num_speculative_tokens": args.k, "adaptive_k": False}
    worker = DraftWorker.options(name="bench-pipelining", num_cpus=0.1).remote(
        {"model": args.model, "dtype": "bf16"}, drafter, 1)
    ray.get(worker.info.remote())
    ctx = ray.get_runtime_context()
    prompt = info.encode("Write a Python function that returns the n-th Fibonacci number.", chat=True)
    truth = ray.get(worker.propose_batch.remote([prompt], args.steps * (args.k + 1) + 2))[0]
    out = {}
    for pipelining in (False, True):
        options = {"gcs_address": ctx.gcs_address, "namespace": ctx.namespace, "draft_workers": ["bench-pipelining"],
                   "drafter": drafter, "deadline_ms": 10000, "pipelining": pipelining}
        proposer = VllmRemoteProposer(SimpleNamespace(
            speculative_config=SimpleNamespace(num_speculative_tokens=args.k), additional_config={CONFIG_KEY: options}))
        history = list(prompt)
        sampled = [history[-1]]
        t0 = time.perf_counter()
        for _ in tqdm(range(args.steps), desc=f"pipelining={pipelining}"):
            tokens = np.zeros((1, len(history) + 64), dtype=np.int64)  # [max_num_reqs, max_model_len]
            tokens[0, : len(history)] = history
            draft = proposer.propose([sampled], np.array([len(history)]), tokens)[0]
            time.sleep(args.verify_ms / 1000)  # vLLM verifying the draft
            # The target here is the draft model's own greedy continuation: drafts are accepted as far
            # as they match it, then its next token is the bonus.
            n = len(history) - len(prompt)
            accepted = 0
            while accepted < len(draft) and draft[accepted] == truth[n + accepted]:
                accepted += 1
            sampled = draft[:accepted] + [truth[n + accepted]]
            history = history + sampled
        wall = time.perf_counter() - t0
        out[f"pipelining={pipelining}"] = {"ms_per_step": 1000 * wall / args.steps, **proposer.stats()}
        print(out[f"pipelining={pipelining}"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pipelining.json").write_text(json.dumps({"args": vars(args) | {"handler": None}, **out},
                                                               indent=1, default=str))
    return 0


def add_parser(sub) -> None:
    """Register ``specserve bench-pipelining``."""
    b = sub.add_parser("bench-pipelining", help="remote proposer per-step cost, pipelined vs sequential")
    b.add_argument("--model", default="default")
    b.add_argument("--draft", required=True, help="draft model directory (shares the target's tokenizer)")
    b.add_argument("--k", type=int, default=4)
    b.add_argument("--steps", type=int, default=40)
    b.add_argument("--verify-ms", type=float, default=30.0, help="stand-in for vLLM's verification time per step")
    b.add_argument("--out", required=True)
    b.set_defaults(handler=proposer_pipelining)
