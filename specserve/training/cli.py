"""``specserve train-drafter`` and ``specserve eval-drafter``."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from specserve.errors import SpecServeError
from specserve.training.config import LOSS_PRESETS


def add_parser(subparsers) -> None:
    """Register ``train-drafter`` and ``eval-drafter``."""
    t = subparsers.add_parser("train-drafter", help="train a block drafter on the target's own responses")
    t.add_argument("--config", default=None, help="JSON or YAML file validated as TrainConfig; flags override it")
    t.add_argument("--out", default=None, help="run directory (resumes when it holds a run with this config)")
    t.add_argument("--data-dir", default=None, help="feature cache directory (shared between runs)")
    t.add_argument("--model", default=None, help="target model (default: the embedded SmolLM2)")
    t.add_argument("--losses", default=None,
                   help=f"a preset ({', '.join(LOSS_PRESETS)}) or NAME=WEIGHT,... over ce, positional_ce, "
                   "first_error, chain")
    t.add_argument("--gamma", type=float, default=None, help="positional weight decay (default 10)")
    t.add_argument("--steps", type=int, default=None, help="optimiser steps (the budget)")
    t.add_argument("--block-size", type=int, default=None, help="draft tokens per pass")
    t.add_argument("--num-layers", type=int, default=None, help="draft transformer layers")
    t.add_argument("--target-layers", default=None, help="comma-separated target layers feeding the drafter")
    t.add_argument("--num-conversations", type=int, default=None, help="ShareGPT train conversations")
    t.add_argument("--no-regenerate", action="store_true", help="train on ShareGPT's responses, not the target's")
    t.add_argument("--batch-sequences", type=int, default=None)
    t.add_argument("--anchors", type=int, default=None, help="blocks per sequence per step")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    t.add_argument("--save-as", default=None, help="also copy the final checkpoint here (e.g. the shipped asset)")
    t.set_defaults(handler=cmd_train)

    e = subparsers.add_parser("eval-drafter", help="mean accepted length and speedup of a block drafter")
    e.add_argument("checkpoint", help="block drafter checkpoint (.pt)")
    e.add_argument("--prompts", action="append", required=True, help="FILE.jsonl or sharegpt:N (repeatable)")
    e.add_argument("--limit", type=int, default=None, help="use at most this many prompts per source")
    e.add_argument("--model", default="default")
    e.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--k", type=int, default=None, help="draft tokens per step (default: the block size)")
    e.add_argument("--adaptive", action="store_true", help="adaptive k instead of a fixed k")
    e.add_argument("--max-tokens", type=int, default=128)
    e.add_argument("--out", required=True, help="output directory (results.json, eval.json, speedup.png)")
    e.set_defaults(handler=cmd_eval)


def parse_losses(spec: str) -> dict[str, float]:
    """A preset name or ``name=weight,...`` as a weights dict (names are checked by LossConfig)."""
    if spec in LOSS_PRESETS:
        return dict(LOSS_PRESETS[spec])
    weights = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        try:
            weights[name.strip()] = float(value) if sep else 1.0
        except ValueError:
            raise SpecServeError(f"--losses {spec!r}: weight of {name!r} is not a number", param="losses") from None
    return weights


def train_config(args: argparse.Namespace):
    """TrainConfig from --config and the flags (flags win)."""
    from specserve.config import validated
    from specserve.training.config import TrainConfig

    data: dict = _read_config(args.config) if args.config else {}
    top = {"out_dir": args.out, "data_dir": args.data_dir, "steps": args.steps, "batch_sequences":
           args.batch_sequences, "anchors_per_sequence": args.anchors, "lr": args.lr, "seed": args.seed,
           "threads": args.threads}
    data.update({k: v for k, v in top.items() if v is not None})
    drafter = data.setdefault("drafter", {})
    if args.block_size is not None:
        drafter["block_size"] = args.block_size
    if args.num_layers is not None:
        drafter["num_layers"] = args.num_layers
    if args.target_layers:
        try:
            drafter["target_layers"] = [int(x) for x in args.target_layers.split(",")]
        except ValueError:
            raise SpecServeError(f"--target-layers {args.target_layers!r}: use comma-separated integers",
                                 param="target_layers") from None
    losses = data.setdefault("losses", {})
    if args.losses:
        losses["weights"] = parse_losses(args.losses)
    if args.gamma is not None:
        losses["gamma"] = args.gamma
    d = data.setdefault("data", {})
    if args.model:
        d["model"] = args.model
    if args.num_conversations is not None:
        d["num_conversations"] = args.num_conversations
    if args.no_regenerate:
        d["regenerate"] = False
    return validated(TrainConfig, data)


def _read_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SpecServeError(f"--config file not found: {path}", param="config")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def cmd_train(args: argparse.Namespace) -> int:
    """Prepare the feature cache if needed, train (resuming if possible), write the checkpoint."""
    from specserve.training.train import FINAL, train

    cfg = train_config(args)
    summary = train(cfg)
    final = Path(cfg.out_dir) / FINAL
    if args.save_as:
        Path(args.save_as).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final, args.save_as)
        (Path(args.save_as).with_suffix(".json")).write_text(json.dumps(summary, indent=1))
    print(f"wrote {final} (step {summary['steps']}, loss {summary['final'].get('loss', float('nan')):.3f})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Benchmark a checkpoint against plain decoding and print the pooled figures."""
    from specserve.config import SamplingParams, validated
    from specserve.data import load_prompts
    from specserve.training.eval import evaluate

    prompts = []
    for source in args.prompts:
        prompts += load_prompts(source)[: args.limit]
    params = validated(SamplingParams, {"max_tokens": args.max_tokens})
    report = evaluate(Path(args.checkpoint), prompts, Path(args.out), model=args.model, dtype=args.dtype,
                      k=args.k, adaptive=args.adaptive, params=params, threads=args.threads)
    print(f"{'set':<12}{'prompts':>8}{'MAL':>7}{'speedup':>9}  acceptance by position")
    for name, r in report["results"].items():
        acc = " ".join(f"{a:.2f}" for a in r["acceptance_by_position"])
        print(f"{name:<12}{r['prompts']:>8}{r['mean_accepted_length']:>7.2f}{r['speedup']:>8.2f}x  {acc}")
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0
