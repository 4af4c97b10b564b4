"""The ``specserve`` command line: generate, bench, serve, and the drafter and ops tools.

User errors print one line naming the flag and what is allowed, and exit with status 2. Logs (ours,
vLLM's, Ray's) go to stderr or ``--log-file``, at WARNING unless ``-v`` (INFO) or ``-vv`` (DEBUG); with
``--json`` stdout holds one JSON document and nothing else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from specserve.errors import SpecServeError
from specserve.logs import configure_logging, json_stdout, stderr_to

log = logging.getLogger("specserve.cli")

# Config field paths as the CLI spells them, so errors name the flag the user typed.
FLAG_NAMES = {
    "drafter.num_speculative_tokens": "--k",
    "drafter": "--drafter",
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "stop": "--stop",
    "model": "--model",
    "prompt": "PROMPT",
    "prompts": "--prompts",
    "dtype": "--dtype",
    "engine": "--engine",
    "drafter.tree.max_nodes": "--tree-nodes",
    "drafter.tree.branching": "--tree-branching",
    "drafter.tree.max_depth": "--tree-depth",
    "drafter.tree.min_path_prob": "--tree-min-prob",
    "out": "--out",
    "mask_token_id": "--mask-token-id",
    "log_file": "--log-file",
}


def _log_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``-v`` and ``--log-file``. On the subcommands ``defaults`` is False: a flag given there overrides the
    one given before the subcommand, and one left out does not reset it."""
    p.add_argument("-v", "--verbose", action="count", default=0 if defaults else argparse.SUPPRESS,
                   help="more log: -v INFO, -vv DEBUG (default WARNING)")
    p.add_argument("--log-file", default=None if defaults else argparse.SUPPRESS, metavar="PATH",
                   help="append every log (ours, vLLM's, Ray's, their child processes') to PATH instead of stderr")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="target: 'default' (embedded SmolLM2), a directory or hub id")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--engine", choices=["hf", "vllm"], default=None,
                   help="target engine: hf (transformers) or vllm (default: the config's default)")


def _drafter_args(p: argparse.ArgumentParser, multiple: bool = False) -> None:
    p.add_argument("--drafter", action="append" if multiple else "store", default=None,
                   help="none | ngram | suffix | draft_model:PATH | block[:CHECKPOINT] | hybrid[:CHECKPOINT] (default: the project's default)"
                   + (" (repeatable)" if multiple else ""))
    p.add_argument("--k", type=int, default=None, help="draft tokens per block (num_speculative_tokens)")
    p.add_argument("--no-adaptive", action="store_true", help="fixed k instead of adaptive k")
    p.add_argument("--tree-nodes", type=int, default=None,
                   help="draft trees of up to N nodes (0 = chains)" + (": bench runs chain and tree" if multiple else ""))
    p.add_argument("--tree-branching", type=int, default=None, help="most children per tree node")
    p.add_argument("--tree-depth", type=int, default=None, help="deepest tree path (k caps it too)")
    p.add_argument("--tree-min-prob", type=float, default=None, help="drop tree paths the drafter finds less likely")
    p.add_argument("--no-tree-adaptive", action="store_true", help="keep the node budget fixed")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    _log_args(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate one completion")
    _model_args(g)
    _drafter_args(g)
    _sampling_args(g, 128)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("prompt", help="prompt text")

    b = sub.add_parser("bench", help="speculative vs plain decoding on a prompt set, in one run")
    _model_args(b)
    _drafter_args(b, multiple=True)
    _sampling_args(b, 128)
    b.add_argument("--prompts", action="append", required=True, help="FILE.jsonl or sharegpt:N (repeatable)")
    b.add_argument("--warm-prompts", action="append", default=[], metavar="SPEC",
                   help="FILE.jsonl, sharegpt:N or sharegpt-train:N (repeatable; --limit does not apply): decoded "
                   "untimed before the timed prompts by every drafter that learns across requests (suffix), to fill its cache; "
                   "default none")
    b.add_argument("--linear-cost", action="store_true",
                   help="also run each adaptive chain drafter with adaptive k's linear cost prior instead of "
                   "measured pass times (an A/B in the same run)")
    b.add_argument("--limit", type=int, default=None, help="use at most this many prompts per source")
    b.add_argument("--no-peers", action="store_true", help="skip transformers' generate peers")
    b.add_argument("--out", required=True, help="output directory")

    s = sub.add_parser("serve", help="start Ray and the OpenAI-compatible server on 127.0.0.1")
    s.add_argument("--config", default=None, help="YAML file validated as deployments.config.AppConfig")
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--host", default=None)
    s.add_argument("--engine", choices=["hf", "vllm"], default=None, help="target engine (overrides the config)")

    for module in ("specserve.training.cli", "specserve.dashboards", "deployments.bench",
                   "deployments.bench_agreement", "deployments.bench_pipelining"):
        _add_module_commands(sub, module)
    if "distill-drafter" in sub.choices:  # its --workers runs on Ray Train (actors.train_workers)
        sub.choices["distill-drafter"].set_defaults(ray_train=_run_ray_train)
    for command in sub.choices.values():  # `specserve generate -v ...` as well as `specserve -v generate ...`
        _log_args(command, defaults=False)
    return parser


def _run_ray_train(*args, **kwargs):
    """``actors.train_workers.run_ray_train``, imported when a distillation asks for Ray Train workers."""
    from actors.train_workers import run_ray_train

    return run_ray_train(*args, **kwargs)


def _add_module_commands(sub, module: str) -> None:
    """Subcommands a module registers itself with ``add_parser(subparsers)``; ``run(args)`` handles them
    unless the module set its own ``handler`` default."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    before = set(sub.choices)
    mod.add_parser(sub)
    for name in set(sub.choices) - before:
        parser = sub.choices[name]
        if parser.get_default("handler") is None and hasattr(mod, "run"):
            parser.set_defaults(handler=mod.run)


def _engine_config(args: argparse.Namespace, drafter_spec: str):
    from specserve.config import EngineConfig, ModelConfig, parse_drafter, validated

    fields = {"model": args.model, "dtype": args.dtype, "device": args.device, "num_threads": args.threads,
              "engine": getattr(args, "engine", None)}
    model = validated(ModelConfig, {k: v for k, v in fields.items() if v is not None or k == "num_threads"})
    drafter = parse_drafter(drafter_spec, num_speculative_tokens=args.k,
                            adaptive_k=False if args.no_adaptive else None, tree=_tree(args))
    return EngineConfig(model=model, drafter=drafter)


def _tree(args: argparse.Namespace, max_nodes: int | None = None) -> dict:
    """The tree flags as a TreeConfig dict (only those given); ``max_nodes`` overrides --tree-nodes."""
    fields = {"max_nodes": args.tree_nodes if max_nodes is None else max_nodes, "branching": args.tree_branching,
              "max_depth": args.tree_depth, "min_path_prob": args.tree_min_prob,
              "adaptive": False if args.no_tree_adaptive else None}
    return {k: v for k, v in fields.items() if v is not None}


def _sampling(args: argparse.Namespace):
    from specserve.config import SamplingParams, validated

    return validated(SamplingParams, {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "seed": args.seed, "stop": args.stop or [], "ignore_eos": args.ignore_eos,
    })


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate one completion and print it (or one JSON object with --json)."""
    with (json_stdout() if args.json else nullcontext()) as emit:
        return _generate(args, emit)


def _generate(args: argparse.Namespace, emit) -> int:
    """``generate``; the JSON document goes to ``emit`` when given (--json), text to stdout otherwise."""
    from specserve.drafters import DEFAULT_DRAFTER
    from specserve.engine import SpecEngine

    params = _sampling(args)
    if not args.prompt.strip():
        raise SpecServeError("prompt is empty: pass some text to continue", param="prompt")
    cfg = _engine_config(args, args.drafter or DEFAULT_DRAFTER)
    log.info("generate: engine %s, model %s, drafter %s", cfg.model.engine, cfg.model.model, cfg.drafter.spec())
    if cfg.model.engine == "vllm":
        return _generate_vllm(args, cfg, params, emit)
    engine = SpecEngine.from_config(cfg)
    result = engine.generate(args.prompt, params, chat=args.chat)
    if emit:
        emit(result.to_dict())
    else:
        print(result.text)
        s = result.stats
        print(f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tok/s, drafter {cfg.drafter.spec()}, "
              f"mean accepted length {s.mean_accepted_length:.2f}]", file=sys.stderr)
    return 0


def _generate_vllm(args: argparse.Namespace, cfg, params, emit) -> int:
    """``generate --engine vllm``: one completion through a vLLM engine (remote drafting starts a
    local Ray on 127.0.0.1 for the draft worker)."""
    import asyncio
    import time

    from actors.config import ReplicaConfig
    from actors.vllm_core import VllmCore

    core = VllmCore(ReplicaConfig(model=cfg.model, drafter=cfg.drafter))
    if core.remote_drafting:
        from cluster.local import init_local_ray, use_loopback

        use_loopback()
        init_local_ray()

    async def run() -> dict:
        await core.start()
        ids = core.info.encode(args.prompt, chat=args.chat)
        t0, tokens, text, last = time.perf_counter(), [], "", None
        async for chunk in core.generate(ids, params):
            tokens += chunk.token_ids
            text += chunk.text
            last = chunk
        seconds = time.perf_counter() - t0
        return {"text": text, "token_ids": tokens, "finish_reason": last.finish_reason, "stats": last.stats,
                "tokens_per_s": len(tokens) / seconds, "engine": "vllm", "drafter": cfg.drafter.spec()}

    try:
        result = asyncio.run(run())
    finally:
        core.shutdown()
    if emit:
        emit(result)
    else:
        print(result["text"])
        print(f"[{len(result['token_ids'])} tokens, {result['tokens_per_s']:.1f} tok/s, engine vllm, drafter "
              f"{result['drafter']}]", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark and print the overall table."""
    from specserve.bench import BenchSpec, markdown_table, run_bench, tree_table
    from specserve.config import parse_drafter
    from specserve.data import load_prompts
    from specserve.drafters import DEFAULT_DRAFTER
    from specserve.engine import SpecEngine

    params = _sampling(args)
    if args.engine == "vllm":
        raise SpecServeError("the in-process benchmark runs engine hf; measure engine vllm with "
                             "`specserve bench-serve --engine vllm`", param="engine")
    specs = args.drafter or [DEFAULT_DRAFTER]
    prompts = []
    for source in args.prompts:
        prompts += load_prompts(source)[: args.limit]
    warm = [p for source in args.warm_prompts for p in load_prompts(source, "--warm-prompts")]
    # With --tree-nodes every drafter runs twice, as a chain and as a tree, in the same run.
    shapes = [0, args.tree_nodes] if args.tree_nodes else [None]
    drafters = [parse_drafter(s, num_speculative_tokens=args.k, adaptive_k=False if args.no_adaptive else None,
                              tree=_tree(args, n)) for s in specs for n in shapes]
    if args.linear_cost:  # A/B: every adaptive drafter again, pricing steps by the linear prior
        drafters += [d.model_copy(update={"measured_pass_cost": False}) for d in drafters
                     if d.adaptive_k and d.kind != "none" and not d.tree.max_nodes]
    engine = SpecEngine.from_config(_engine_config(args, "none"))
    results = run_bench(engine, prompts, BenchSpec(drafters, params, args.chat, peers=not args.no_peers,
                                                   warm_prompts=warm), Path(args.out))
    print(markdown_table(results))
    if args.tree_nodes:
        print(tree_table(results))
    print(f"wrote {Path(args.out) / 'results.json'}, speedup.png and acceptance.png")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start Ray and the Serve app; block until interrupted."""
    from cluster.local import use_loopback

    use_loopback()  # before Ray is imported: its sockets bind where the environment says
    from deployments.serve_local import serve_forever

    return serve_forever(args.config, host=args.host, port=args.port, engine=args.engine)


COMMANDS = {"generate": cmd_generate, "bench": cmd_bench, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``specserve`` command."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    configure_logging(args.verbose)  # before any command imports vllm or ray
    try:
        # The log file is released before an error is printed: the error line is for the user's terminal.
        with stderr_to(args.log_file):
            return handler(args)
    except SpecServeError as e:
        flag = FLAG_NAMES.get(e.param or "", e.param)
        msg = e.message
        if e.param and flag and flag != e.param and msg.startswith(f"{e.param}:"):
            msg = msg[len(e.param) + 1 :].strip()
        print(f"error: {flag + ': ' if flag and not msg.startswith(flag) else ''}{msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
