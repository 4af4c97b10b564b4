"""What ``bench-serve`` compares: one ``Target`` per server configuration, in run order.

Our app for each engine and ``--drafter`` spec asked for (costly remote drafting twice: pipelined
and sequential), the server's defaults as ``make serve`` runs them, and the peers: ``vllm serve``
and Ray Serve LLM on the same model, plain and with n-gram speculation at each ``--peer-k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deployments.bench_load import SERVED_NAME
from specserve.config import LOCAL_DRAFTER_KINDS, VLLM_BUILTIN_METHODS, apply_serve_defaults
from specserve.errors import SpecServeError

#: n-gram speculation of the peers, as `vllm serve --speculative-config` takes it (k added per peer).
PEER_NGRAM = {"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 1}
#: Label of the `vllm serve` peer the table's first ratio is to.
VLLM_PLAIN = "`vllm serve` plain"


@dataclass
class Target:
    """One server configuration under test."""

    label: str
    kind: str = "app"  # app (ours) | vllm (`vllm serve`) | ray-llm (Ray Serve LLM)
    app_args: dict | None = None  # build_app args of our app
    peer_spec: dict | None = None  # a peer's speculative config (None = plain)
    drafter: dict = field(default_factory=dict)  # for the in-process baseline (engine hf only)


def drafter_from_spec(spec: str, k: int, adaptive: bool) -> dict:
    """``none | ngram | suffix | draft_model:PATH | vllm:local[:KIND] | vllm:METHOD[:PATH]`` as DrafterConfig
    fields (``vllm:local:suffix``: our suffix drafter inside vLLM's worker, vllm_placement ``vllm_worker``;
    ``vllm:local``: our n-gram there; ``vllm:METHOD``: vLLM's own method, vllm_placement ``vllm_builtin``)."""
    kind, _, path = spec.partition(":")
    if kind == "vllm":
        method, _, model_path = path.partition(":")
        if method == "local":
            if model_path and model_path not in LOCAL_DRAFTER_KINDS:
                raise SpecServeError(f"--drafter {spec}: vllm:local runs {', '.join(LOCAL_DRAFTER_KINDS)}",
                                     param="--drafter")
            return {"kind": model_path or "ngram", "vllm_placement": "vllm_worker", "num_speculative_tokens": k,
                    "adaptive_k": adaptive}
        if method not in VLLM_BUILTIN_METHODS:
            raise SpecServeError(f"--drafter {spec}: vLLM's own methods are {', '.join(VLLM_BUILTIN_METHODS)} "
                                 "(vllm:local[:KIND] runs ours inside vLLM's worker)", param="--drafter")
        return {"kind": "ngram", "vllm_placement": "vllm_builtin", "vllm_builtin_method": method,
                "path": model_path or None, "num_speculative_tokens": k, "adaptive_k": adaptive}
    if kind == "none":
        return {"kind": "none", "num_speculative_tokens": 0}
    return {"kind": kind, "path": path or None, "num_speculative_tokens": k, "adaptive_k": adaptive}


def ray_serve_llm_available() -> bool:
    """Ray Serve LLM and the vLLM it runs are installed.

    Found, not imported: importing ray.serve.llm sets the root logger to INFO, and the client would
    then log every request inside the measurements.
    """
    from importlib.util import find_spec

    try:
        return find_spec("ray.serve.llm") is not None and find_spec("vllm") is not None
    except ModuleNotFoundError:  # no ray at all
        return False


def build_targets(args) -> list[Target]:
    """Every configuration the arguments ask for, in run order."""
    model = {"model": args.model, "dtype": args.dtype}
    threads = {"num_threads": args.threads}
    topology = {"draft_worker": threads, "target_rank": threads}
    # What `specserve serve` runs on a config that names no engine and no drafter (engine vllm where installed).
    default = apply_serve_defaults({"model": model, "serve": {"model_name": SERVED_NAME}})
    targets = [Target("default (make serve)", app_args=default)] if args.default else []
    for engine in [] if args.only_default else args.engine:
        for spec in dict.fromkeys(["none", *args.drafter]):  # plain decoding once, even if named
            if spec.startswith("vllm:") and engine != "vllm":
                continue
            targets += _app_targets(engine, spec, args, model, topology)
    if args.vllm_peers:
        targets += _peers("vllm", "`vllm serve`", args.peer_k)
    if args.ray_serve_llm_peers if args.ray_serve_llm_peers is not None else ray_serve_llm_available():
        targets += _peers("ray-llm", "Ray Serve LLM", args.peer_k)
    return targets


def _app_targets(engine: str, spec: str, args, model: dict, topology: dict) -> list[Target]:
    """Our app with one engine and drafter spec (costly remote drafting: pipelined and sequential)."""
    drafter_spec, _, options = spec.partition("@")
    drafter = drafter_from_spec(drafter_spec, args.k, not args.no_adaptive)
    base = {"model": {**model, "engine": engine}, "drafter": drafter, "topology": {**topology},
            "serve": {"model_name": SERVED_NAME}}
    for option in filter(None, options.split(",")):  # engine hf: where drafting runs, batch gathering
        if option in ("router", "workers"):
            base["topology"]["draft_placement"] = option
        elif option == "nowait":
            base["router"] = {"batch_wait_fraction": 0.0}
        else:
            raise SpecServeError(f"--drafter {spec}: unknown option {option!r}; allowed after '@': "
                                 "router, workers, nowait (comma-separated)", param="--drafter")
    label = f"{engine} {spec if not spec.startswith('draft_model') else 'draft_model'}"
    costly = drafter["kind"] == "draft_model" and drafter.get("vllm_placement", "draft_workers") == "draft_workers"
    if not costly:  # free drafting is never pipelined (see RouterConfig.pipelining)
        return [Target(label, app_args=_with_pipelining(base, engine, False), drafter=drafter)]
    return [Target(f"{label} {'pipelined' if on else 'sequential'}", app_args=_with_pipelining(base, engine, on),
                   drafter=drafter) for on in (True, False)]


def _peers(kind: str, name: str, peer_k: list[int]) -> list[Target]:
    """A peer server plain, then with n-gram speculation at each k (the peer at its best)."""
    return [Target(f"{name} plain", kind)] + [
        Target(f"{name} ngram k={k}", kind, peer_spec={**PEER_NGRAM, "num_speculative_tokens": k}) for k in peer_k]


def _with_pipelining(base: dict, engine: str, on: bool) -> dict:
    if engine == "vllm":
        return {**base, "model": {**base["model"], "vllm": {"pipelining": on}}}
    return {**base, "router": {**base.get("router", {}), "pipelining": on}}
