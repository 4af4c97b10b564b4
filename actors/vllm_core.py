"""The vLLM core: a model replica whose target groups are vLLM async engines.

Same interface as ``actors.router.RouterCore`` (``start``, ``generate``, ``status``,
``held_sequences``, ``placement``, ``healthy``, ``shutdown``), so the Serve app picks one
or the other from ``model.engine``. Each target group is one vLLM ``AsyncLLM``: paged KV
cache, continuous batching, prefix caching and vLLM's rejection sampler; tensor
parallelism comes from vLLM's own executor (its multiprocessing executor on the CPU, its
Ray executor for GPU groups). Drafting is either

- remote (``drafter.vllm_placement = "draft_workers"``): specserve draft workers (Ray actors,
  placed by the topology) behind vLLM's ``custom_class`` proposer hook, see
  ``actors.vllm_proposer``;
- local (``"vllm_worker"``): our n-gram or suffix drafter inside vLLM's worker through the same
  hook, with adaptive k from the verification cost it measures there; or
- one of vLLM's own methods colocated in the engine (``"vllm_builtin"``, the method in
  ``drafter.vllm_builtin_method``: ``ngram``, ``suffix``, ``draft_model``, ``eagle3``, ``dflash``).

Stop conditions stay ours: vLLM's tokens go through ``Sequence.commit`` (max tokens, EOS,
stop strings), and a request whose sequence finished is aborted in vLLM. Per-request
``spec_decode`` statistics come from vLLM's detailed per-request speculative metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
from ray.exceptions import RayError

from actors.calls import submit
from actors.config import ReplicaConfig
from actors.core import ReplicaCore, least_loaded, pipelining_pays
from actors.draft_worker import DraftWorker
from actors.metrics import RouterMetrics
from actors.streaming import RequestStream
from actors.suffix_hub import SuffixSync, VllmWorkerCache, hub_name
from actors.vllm_proposer import CONFIG_KEY, SPECULATIVE_ARG, TENANT_ARG
from actors.vllm_watchdog import OWNER_ENV
from cluster.placement import actor_options
from cluster.processes import pin_engine_cores
from specserve.config import SamplingParams, check_engine_fits
from specserve.errors import SpecServeError, TargetFailed
from specserve.models import ModelInfo, resolve_dtype
from specserve.outputs import StreamChunk
from specserve.sequence import Sequence

log = logging.getLogger("specserve.vllm_core")

#: The proposer class vLLM loads for each placement of our drafter (drafter.vllm_placement).
PROPOSER_CLASSES = {"draft_workers": "actors.vllm_proposer.VllmRemoteProposer",
                    "vllm_worker": "actors.vllm_proposer.VllmLocalProposer"}
#: What vLLM mixes into its worker so that the proposer can be attached and read (``collective_rpc``).
WORKER_EXTENSION = "actors.vllm_extension.ProposerExtension"
#: Seconds between reads of the proposer's counters.
STATS_PERIOD_S = 2.0
_VLLM_DTYPES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


@dataclass
class _Request:
    """What the core holds for one running request."""

    seq: Sequence
    engine: int  # index of the target group's engine serving it
    t_arrival: float
    sampling: object  # vllm.SamplingParams
    stream: RequestStream  # builds its chunks and token timing metrics


def check_tensor_parallel(info: ModelInfo, tp: int) -> None:
    """Refuse a tensor-parallel size that does not divide the model's attention heads."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(info.path)
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", heads)
    if heads and heads % tp:
        raise SpecServeError(f"topology.tensor_parallel_size {tp} does not divide the model's {heads} attention "
                             "heads", param="topology.tensor_parallel_size")
    if kv_heads and kv_heads % tp and tp % kv_heads:
        raise SpecServeError(f"topology.tensor_parallel_size {tp} does not fit the model's {kv_heads} KV heads",
                             param="topology.tensor_parallel_size")


def _check_cpu_sampling_fix() -> None:
    """Refuse to serve on the CPU without the plugin that keeps vLLM's speculative sampling exact."""
    from importlib.metadata import entry_points

    if not any(e.value == "actors.vllm_plugin:register" for e in entry_points(group="vllm.general_plugins")):
        raise SpecServeError("engine vllm on the CPU needs specserve's vLLM plugin (actors.vllm_plugin), which is "
                             "registered when specserve is installed with pip: reinstall it (make setup)",
                             param="model.engine")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and "specserve_cpu_sampling" not in allowed.split(","):
        raise SpecServeError("VLLM_PLUGINS leaves out specserve_cpu_sampling, without which vLLM's CPU speculative "
                             "sampling is not exact: add it or unset VLLM_PLUGINS", param="model.engine")


class VllmCore(ReplicaCore):
    """Engine vllm: request state around one vLLM engine per target group, our proposer inside each."""

    def __init__(self, config: ReplicaConfig):
        check_engine_fits(config.model, config.drafter)
        self.config = config
        self.info = ModelInfo.load(config.model, config.max_model_len)
        self.tokenizer = self.info.tokenizer
        self.metrics = RouterMetrics(config.model_name)
        self.requests: dict[str, _Request] = {}
        self.engines: list = []
        self.workers: list = []
        self.worker_names: list[str] = []
        self.worker_info: dict = {}
        self._request_numbers = itertools.count()
        self._failures_seen = 0  # draft worker failures the proposer reported that were counted already
        self.proposer_stats: dict = {}  # the proposer's counters, read every STATS_PERIOD_S
        self._stats_task: asyncio.Task | None = None
        self.suffix_syncs: list[SuffixSync] = []  # one per engine when the suffix cache is shared (actors.suffix_hub)
        self.closed = False  # set by shutdown: a start still under way stops what it started and raises

    # ------------------------------------------------------------------------------- startup

    @property
    def remote_drafting(self) -> bool:
        """True when our draft workers propose through vLLM's hook."""
        d = self.config.drafter
        return d.vllm_placement == "draft_workers" and d.kind != "none" and d.num_speculative_tokens > 0 \
            and self.config.topology.num_draft_workers > 0

    @property
    def proposer_drafting(self) -> bool:
        """True when vLLM drafts through our proposer hook (remote draft workers or the local drafter)."""
        d = self.config.drafter
        local = d.vllm_placement == "vllm_worker" and d.kind != "none" and d.num_speculative_tokens > 0
        return local or self.remote_drafting

    @property
    def speculating(self) -> bool:
        """True when the engines run with speculative decoding."""
        return self.speculative_config() is not None

    async def start(self) -> None:
        """Start the draft workers (remote drafting) and one vLLM engine per target group."""
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.config
        check_tensor_parallel(self.info, cfg.topology.tensor_parallel_size)
        if cfg.model.device == "cpu":
            _check_cpu_sampling_fix()
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(cfg.model.vllm.kv_cache_gb)))
        if self.remote_drafting:
            await self._start_workers()
            self._stop_if_closed()
        args = self.engine_args()
        # The engine's processes end themselves once this replica is gone, however it dies (actors.vllm_watchdog).
        os.environ[OWNER_ENV] = str(os.getpid())
        for _ in range(cfg.topology.num_target_groups):
            # Building an engine blocks until its processes have loaded the model: off the event loop, so the
            # replica answers (readiness 503s) meanwhile. Its output handler starts with the first request.
            self.engines.append(await asyncio.to_thread(AsyncLLM.from_engine_args, args))
            self._stop_if_closed()  # the replica stopped while this engine loaded: stop it rather than leave it
        if cfg.model.vllm.engine_core_on_worker_cores:
            for pid, cpus in pin_engine_cores(os.getpid()).items():
                log.info("vLLM engine core %d runs on its workers' cores %s", pid, sorted(cpus))
        if self.proposer_drafting:
            for engine in self.engines:
                await self._attach(engine)
            self._stop_if_closed()
            self._stats_task = asyncio.create_task(self._read_stats())
            if cfg.drafter.suffix_shared_cache:  # each engine trades with the hub (and so with this replica's others)
                self.suffix_syncs = [SuffixSync(VllmWorkerCache(e), hub_name(cfg.model.model),
                                                cfg.drafter.suffix_cache_requests) for e in self.engines]
                for sync in self.suffix_syncs:
                    sync.start()

    def _stop_if_closed(self) -> None:
        """After each slow step of ``start``: if ``shutdown`` came meanwhile, stop what was started since and raise."""
        if self.closed:
            self.shutdown()
            raise TargetFailed("the model replica was shut down while it started")

    async def _attach(self, engine) -> None:
        """Hand our proposer its model runner through vLLM's worker extension; refuse to serve without it
        (per-request ``speculative: false`` would be silently ignored)."""
        attached = await engine.collective_rpc("specserve_attach")
        if not attached or not attached[0]:
            engine.shutdown()
            raise RuntimeError(f"vLLM built no specserve proposer in its output worker (attached: {attached}); "
                               "check that speculative_config.method is custom_class with "
                               f"{PROPOSER_CLASSES[self.config.drafter.vllm_placement]}")

    async def refresh_proposer_stats(self) -> dict:
        """Read the proposer's counters now (output rank of each engine, summed over engines)."""
        total: dict = {}
        for engine in self.engines:
            if engine.errored:
                continue
            ranks = await engine.collective_rpc("specserve_stats")
            for key, value in (ranks[0] if ranks else {}).items():
                total[key] = total.get(key, 0) + value
        self.proposer_stats = total
        return total

    async def _read_stats(self) -> None:
        """Keep ``proposer_stats`` current while the engines run."""
        while self.engines:
            try:
                await self.refresh_proposer_stats()
            except Exception as e:  # an engine going down: its death is reported by healthy()
                log.debug("proposer stats unavailable: %s", e)
            await asyncio.sleep(STATS_PERIOD_S)

    async def _start_workers(self) -> None:
        cfg = self.config
        topo = cfg.topology
        namespace = ray.get_runtime_context().namespace
        tag = uuid.uuid4().hex[:8]
        self.worker_names = [f"specserve-draft-{tag}-{i}" for i in range(topo.num_draft_workers)]
        self.workers = [
            DraftWorker.options(name=name, namespace=namespace, **actor_options(topo.draft_worker)).remote(
                cfg.model.model_dump(mode="json"), cfg.drafter.model_dump(mode="json"), topo.draft_worker.num_threads)
            for name in self.worker_names
        ]
        self.worker_info = await submit(self.workers[0].info)

    def engine_args(self):
        """vLLM's engine arguments derived from the config."""
        from vllm import AsyncEngineArgs

        cfg = self.config
        v = cfg.model.vllm
        dtype = _VLLM_DTYPES[str(resolve_dtype(cfg.model.dtype, cfg.model.device))]
        tp = cfg.topology.tensor_parallel_size
        spec = self.speculative_config()
        return AsyncEngineArgs(
            model=self.info.path,
            dtype=dtype,
            max_model_len=self.info.max_context,
            enable_prefix_caching=v.enable_prefix_caching,
            enforce_eager=v.enforce_eager,
            max_num_seqs=v.max_num_seqs,
            tensor_parallel_size=tp,
            distributed_executor_backend="ray" if cfg.model.device.startswith("cuda") and tp > 1 else None,
            gpu_memory_utilization=v.gpu_memory_utilization,
            speculative_config=spec,
            additional_config={CONFIG_KEY: self.proposer_settings()} if self.proposer_drafting else {},
            worker_extension_cls=WORKER_EXTENSION if self.proposer_drafting else "",
            per_request_spec_decode_metrics="detailed" if spec else "none",
            disable_log_stats=True,
        )

    def speculative_config(self) -> dict | None:
        """vLLM's ``speculative_config`` for the configured drafter (None: plain decoding)."""
        d = self.config.drafter
        v = self.config.model.vllm
        ours = d.vllm_placement in PROPOSER_CLASSES
        # vLLM's own methods ignore drafter.kind: only k = 0 turns them off.
        if d.num_speculative_tokens == 0 or not d.drafts and ours:
            return None
        spec: dict = {"num_speculative_tokens": d.num_speculative_tokens}
        if ours:
            if not self.proposer_drafting:
                return None
            spec.update(method="custom_class", model=PROPOSER_CLASSES[d.vllm_placement])
        elif d.vllm_builtin_method == "ngram":
            spec.update(method="ngram", prompt_lookup_min=d.ngram_min, prompt_lookup_max=d.ngram_max)
        elif d.vllm_builtin_method == "suffix":
            spec.update(method="suffix")
        else:
            spec.update(method=d.vllm_builtin_method, model=d.path)
        if v.k_per_batch_size:
            spec["num_speculative_tokens_per_batch_size"] = [list(r) for r in v.k_per_batch_size]
        return spec

    def proposer_settings(self) -> dict:
        """What the proposer inside vLLM needs: its drafter, and how to reach the draft workers (JSON)."""
        cfg = self.config
        settings = {
            "drafter": cfg.drafter.model_dump(mode="json"),
            "k_per_batch_size": [list(r) for r in cfg.model.vllm.k_per_batch_size or []],
            "drafting_switch": cfg.model.vllm.drafting_switch,
        }
        if not self.remote_drafting:  # the local n-gram drafter: free, nothing to overlap
            return {**settings, "pipelining": False}
        cost = float(self.worker_info.get("draft_cost_per_token", 0.0))
        pipelining = cfg.model.vllm.pipelining
        return {
            **settings,
            "gcs_address": ray.get_runtime_context().gcs_address,
            "namespace": ray.get_runtime_context().namespace,
            "draft_workers": self.worker_names,
            "draft_cost_per_token": cost,
            "deadline_ms": cfg.model.vllm.draft_deadline_ms,
            "pipelining": pipelining_pays(pipelining, cost),
        }

    # ----------------------------------------------------------------------------------- API

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        """Decode one request on the least loaded engine, yielding a :class:`StreamChunk` per engine step.

        Raises ``SpecServeError`` (bad input), ``Saturated`` (queue full) or ``TargetFailed``.
        """
        self.info.check_fits(len(prompt_ids))
        self.admit(len(self.requests))
        seq_id = f"{request_id or 'req'}-{next(self._request_numbers)}"
        engine = least_loaded(range(len(self.engines)), lambda i: sum(r.engine == i for r in self.requests.values()))
        seq = Sequence(prompt_ids, params, self.tokenizer, self.info.eos_token_ids, seq_id=seq_id)
        sampling = self.vllm_params(seq)  # refuses what vLLM cannot run before anything starts
        t_arrival = time.perf_counter()
        req = _Request(seq, engine, t_arrival, sampling, RequestStream(seq, self.metrics, t_arrival))
        self.requests[seq_id] = req
        self.metrics.set_queue(len(self.requests), 0)
        self.metrics.prompt_tokens(len(prompt_ids))
        try:
            async for chunk in self._decode(req):
                yield chunk
        finally:
            self.requests.pop(seq_id, None)
            self.metrics.set_queue(len(self.requests), 0)

    def vllm_params(self, seq: Sequence):
        """vLLM sampling parameters for a sequence: tokens only, stop strings are checked by ``Sequence``."""
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        p = seq.params
        room = self.info.max_context - len(seq.prompt_ids)
        if p.top_k > 0 and self.speculating and self.config.model.device == "cpu":
            # vLLM 0.32's CPU top-k filter takes max() of the empty logits of a step in which no request
            # drafted, and the engine dies: refuse it (its per-token expansion is fixed by actors.vllm_plugin).
            raise SpecServeError("top_k is not supported on engine vllm with speculative decoding on the CPU "
                                 "(vLLM 0.32 fails on it); use top_p, or the hf engine", param="top_k")
        return VllmParams(max_tokens=max(1, min(p.max_tokens, room)), temperature=p.temperature, top_p=p.top_p,
                          top_k=p.top_k, seed=p.seed, ignore_eos=p.ignore_eos,
                          stop_token_ids=[] if p.ignore_eos else sorted(self.info.eos_token_ids),
                          detokenize=False, output_kind=RequestOutputKind.DELTA,
                          stream_interval=self.config.model.vllm.stream_interval,
                          # Our proposer drafts nothing for a request that turned speculation off (vLLM's own
                          # methods draft for the whole batch and ignore it).
                          extra_args={SPECULATIVE_ARG: p.speculative,
                                      **({TENANT_ARG: p.cache_tenant} if p.cache_tenant else {})})

    async def _decode(self, req: _Request) -> AsyncIterator[StreamChunk]:
        seq = req.seq
        engine = self.engines[req.engine]
        stream = engine.generate({"prompt_token_ids": seq.prompt_ids}, req.sampling, request_id=seq.seq_id)
        try:
            async for out in stream:
                completion = out.outputs[0]
                appended = seq.commit(completion.token_ids)
                if not seq.finished and out.finished:
                    seq.abort("length")  # vLLM stopped at the context limit
                if seq.finished:
                    self._record_spec(seq, completion.spec_decode_metrics, time.perf_counter() - req.t_arrival)
                yield req.stream.chunk(appended)
                if seq.finished:
                    break
        except (SpecServeError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            if getattr(engine, "errored", False):
                raise TargetFailed(f"vLLM engine {req.engine} failed: {e}") from None
            raise
        finally:
            await stream.aclose()  # aborts the request in vLLM if it is still running

    def _record_spec(self, seq: Sequence, metrics, e2e_s: float) -> None:
        """Per-request spec_decode stats and the speculative counters from vLLM's per-step record."""
        if metrics is None:
            return
        steps = list(zip(metrics.per_step_drafted, metrics.per_step_accepted))
        step_s = e2e_s / max(1, len(steps))
        proposer = self.proposer_stats
        # The proposer's mean time per step (draft worker round trip included); 0 for vLLM's own methods.
        draft_s = proposer["wait_s"] / proposer["steps"] if proposer.get("steps") else 0.0
        for drafted, accepted in steps:
            seq.stats.record(drafted, accepted)
            self.metrics.step(drafted, accepted, draft_s, step_s)
        seq.stats.draft_time_s = draft_s * len(steps)
        seq.stats.verify_time_s = e2e_s - seq.stats.draft_time_s
        for _ in range(proposer.get("failed", 0) - self._failures_seen):
            self.metrics.draft_failure()
        self._failures_seen = max(self._failures_seen, proposer.get("failed", 0))

    def status(self) -> dict:
        """Live counts, for health checks and leak tests."""
        return {"running": len(self.requests), "waiting": 0, "engine": "vllm",
                "groups": [{"index": i, "errored": bool(e.errored)} for i, e in enumerate(self.engines)],
                "draft_workers": len(self.workers), "max_context": self.info.max_context,
                "proposer": self.proposer_stats,
                **({"suffix_shared_received": sum(s.received for s in self.suffix_syncs)} if self.suffix_syncs else {})}

    async def held_sequences(self) -> dict:
        """Requests held here and in every engine (0 when idle); draft workers' history states are
        bounded by eviction, not freed per request."""
        drafts = await asyncio.gather(*[submit(w.history_states) for w in self.workers], return_exceptions=True)
        return {"router": len(self.requests), "draft_workers": [d if isinstance(d, int) else -1 for d in drafts],
                "target_groups": [e.output_processor.get_num_unfinished_requests() for e in self.engines]}

    async def placement(self) -> dict:
        """Node of every draft worker and engine host."""
        drafts = await asyncio.gather(*[submit(w.info) for w in self.workers], return_exceptions=True)
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"draft_workers": [d for d in drafts if isinstance(d, dict)],
                "target_groups": [[{"node_id": node, "pid": os.getpid(), "engine": "vllm"}] for _ in self.engines]}

    def healthy(self) -> bool:
        """False when an engine has died."""
        return bool(self.engines) and not any(e.errored for e in self.engines)

    def shutdown(self) -> None:
        """Stop the engines and every actor this core started (and, through ``_stop_if_closed``, what a start
        still under way starts after this)."""
        self.closed = True
        if self._stats_task is not None:
            self._stats_task.cancel()
        for sync in self.suffix_syncs:
            sync.stop()
        for e in self.engines:
            e.shutdown()
        self.engines = []
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except RayError:
                pass
        self.workers = []

