"""``specserve train-drafter`` and ``specserve eval-drafter``."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from specserve.config import load_yaml
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

    d = subparsers.add_parser(
        "distill-drafter", help="train a block drafter by online distillation from the target (ShareGPT train "
        "split, the target labels every step); single process or Ray Train")
    d.add_argument("--config", default=None, help="JSON or YAML file validated as DistillConfig; flags override it")
    d.add_argument("--out", default=None, help="run directory (re-running resumes from its state.pt)")
    d.add_argument("--model", default=None, help="target model (default: the embedded SmolLM2)")
    d.add_argument("--dtype", default=None, help="target dtype: bf16 (as served) or fp32 (faster on AVX2-only CPUs)")
    d.add_argument("--device", default=None, help="torch device per worker: cpu or cuda")
    d.add_argument("--init-from", default=None, help="servable checkpoint to warm-start from (fresh optimiser)")
    d.add_argument("--losses", default=None,
                   help=f"a preset ({', '.join(LOSS_PRESETS)}) or NAME=WEIGHT,... over ce, positional_ce, "
                   "first_error, chain")
    d.add_argument("--steps", type=int, default=None, help="optimiser steps to reach (raise to extend a run)")
    d.add_argument("--block-size", type=int, default=None, help="draft tokens per pass")
    d.add_argument("--num-layers", type=int, default=None, help="draft transformer layers")
    d.add_argument("--draft-vocab", type=int, default=None, help="draft vocabulary size (0: the full vocabulary)")
    d.add_argument("--seq-len", type=int, default=None, help="tokens per training chunk")
    d.add_argument("--batch-sequences", type=int, default=None, help="chunks per step per worker")
    d.add_argument("--anchors", type=int, default=None, help="blocks per chunk per step")
    d.add_argument("--lr", type=float, default=None)
    d.add_argument("--save-every", type=int, default=None, help="steps between checkpoints")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    d.add_argument("--workers", type=int, default=0,
                   help="Ray Train data-parallel workers (0: one process, no Ray); gloo on CPU, nccl on GPU")
    d.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker (ScalingConfig.use_gpu)")
    d.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per Ray Train worker")
    d.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    d.add_argument("--storage", default=None, help="Ray Train storage path (default: OUT/ray; shared on clusters)")
    d.set_defaults(handler=cmd_distill)

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
    e.add_argument("--record", default=None, help="distillation run directory: append this measurement to its "
                   "stretches.jsonl (the learning curve)")
    e.set_defaults(handler=cmd_eval)

    c = subparsers.add_parser("drafter-curve", help="plot a distillation run's learning curve")
    c.add_argument("run", help="distillation run directory (log.jsonl, stretches.jsonl)")
    c.add_argument("--out", required=True, help="PNG file to write")
    c.set_defaults(handler=cmd_curve)

    x = subparsers.add_parser("export-dflash", help="write a block drafter as a DFlash drafter vLLM serves "
                              "(speculative_config method 'dflash')")
    x.add_argument("--drafter", required=True, help="block drafter checkpoint (.pt)")
    x.add_argument("--out", required=True, help="directory to write (config.json, model.safetensors, "
                   "mask_embedding.pt)")
    x.add_argument("--model", default="default", help="the drafter's target (default: the embedded SmolLM2); "
                   "vLLM serves its safetensors directory")
    x.add_argument("--mask-token-id", type=int, default=None,
                   help="target token id standing for the mask (default: a special-free id the drafter never drafts)")
    x.set_defaults(handler=cmd_export_dflash)


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


def distill_config(args: argparse.Namespace):
    """DistillConfig from --config and the flags (flags win)."""
    from specserve.config import validated
    from specserve.training.distill import DistillConfig

    data: dict = _read_config(args.config) if args.config else {}
    top = {"out_dir": args.out, "model": args.model, "dtype": args.dtype, "device": args.device,
           "init_from": args.init_from, "steps": args.steps, "seq_len": args.seq_len,
           "batch_sequences": args.batch_sequences, "anchors_per_sequence": args.anchors, "lr": args.lr,
           "save_every": args.save_every, "seed": args.seed, "threads": args.threads}
    data.update({k: v for k, v in top.items() if v is not None})
    drafter = data.setdefault("drafter", {"draft_vocab_size": 8192})
    for key, value in (("block_size", args.block_size), ("num_layers", args.num_layers)):
        if value is not None:
            drafter[key] = value
    if args.draft_vocab is not None:
        drafter["draft_vocab_size"] = args.draft_vocab or None
    if args.losses:
        data.setdefault("losses", {})["weights"] = parse_losses(args.losses)
    return validated(DistillConfig, data)


def cmd_distill(args: argparse.Namespace) -> int:
    """Online distillation, in this process or on Ray Train workers."""
    cfg = distill_config(args)
    if args.workers < 0:
        raise SpecServeError("--workers must be >= 0", param="workers")
    if args.workers:
        # Ray Train runs from the actors layer, above this Ray-free package: the top-level CLI
        # (specserve.cli) hands its runner in as the ``ray_train`` default.
        ray_train = getattr(args, "ray_train", None)
        if ray_train is None:
            raise SpecServeError("--workers needs Ray Train, which `specserve distill-drafter` provides; "
                                 "run it through the specserve command", param="workers")
        last = ray_train(cfg, num_workers=args.workers, use_gpu=args.use_gpu,
                         cpus_per_worker=args.cpus_per_worker, address=args.ray_address, storage=args.storage)
    else:
        from specserve.training.distill import distill

        last = distill(cfg)
    print(f"step {last.get('step')}: {last.get('tokens_seen', 0)} tokens seen, loss {last.get('loss', float('nan')):.3f}, "
          f"greedy accepted {last.get('greedy_accepted', float('nan')):.2f}; checkpoint {cfg.out_dir}/drafter.pt")
    return 0


def _read_config(path: str) -> dict:
    """A training config file (YAML, or JSON, which YAML reads too)."""
    return load_yaml(path)


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
    if args.record:
        record_stretch(Path(args.record), Path(args.checkpoint), report)
    return 0


def record_stretch(run_dir: Path, checkpoint: Path, report: dict) -> None:
    """Append one point of the learning curve: tokens seen by ``checkpoint`` and its measured MAL."""
    from specserve.drafters.block import read_checkpoint
    from specserve.training.curve import STRETCHES

    meta = read_checkpoint(checkpoint).get("meta", {})
    results = report["results"]
    blocks = sum(r["prompts"] for r in results.values())
    pooled = sum(r["mean_accepted_length"] * r["prompts"] for r in results.values()) / max(blocks, 1)
    point = {"step": meta.get("step"), "tokens_seen": meta.get("tokens_seen", 0), "mean_accepted_length":
             round(pooled, 4), "sets": {name: r["mean_accepted_length"] for name, r in results.items()}}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / STRETCHES, "a", encoding="utf-8") as f:
        f.write(json.dumps(point) + "\n")


def cmd_curve(args: argparse.Namespace) -> int:
    """Plot the learning curve of a run directory."""
    from specserve.training.curve import plot_curve

    if not (Path(args.run) / "log.jsonl").exists():
        raise SpecServeError(f"{args.run} has no log.jsonl: not a distillation run directory", param="run")
    print(f"wrote {plot_curve(Path(args.run), Path(args.out))}")
    return 0


def cmd_export_dflash(args: argparse.Namespace) -> int:
    """Export a checkpoint to vLLM's DFlash format; print how to serve it and where it is not exact."""
    from specserve.drafters.block.dflash import export_dflash
    from specserve.models import resolve_model_path

    if not Path(args.drafter).is_file():
        raise SpecServeError(f"block drafter checkpoint not found: {args.drafter}", param="drafter")
    target = resolve_model_path(args.model)
    result = export_dflash(Path(args.drafter), Path(target), Path(args.out), mask_token_id=args.mask_token_id)
    spec = {"method": "dflash", "model": str(result.out_dir), "num_speculative_tokens": result.num_speculative_tokens}
    print(f"wrote {result.out_dir} (mask token {result.mask_token_id}); serve {target} with "
          f"speculative_config={json.dumps(spec)}")
    if result.differences:
        print("not exact: vLLM's forward differs from the drafter's where")
        for line in result.differences:
            print(f"  - {line}")
    return 0
