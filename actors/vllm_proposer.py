"""vLLM proposer that drafts with specserve drafters: on draft workers (Ray actors), or in process.

vLLM builds this class inside its worker process (``speculative_config={"method":
"custom_class", "model": "actors.vllm_proposer.DraftWorkerProposer", ...}``) and calls
``propose`` after every step with the token history of each running request: token ids
only. The whole batch goes to the draft workers in one call per worker;
with ``local`` settings (``drafter.vllm_method = "local"``, a model-free n-gram or suffix
drafter) the drafter runs right here instead, with no Ray at all, its state keyed by vLLM's
request ids (started with the prompt, ended when vLLM drops the request; a request's
``TENANT_ARG`` picks the suffix drafter's per-tenant cache).

- **Measured cost, adaptive k.** The time from returning drafts to the next call is vLLM's
  step over the tokens it verified, so the proposer fits what one more draft token costs at
  this batch size (``specserve.strategy.VerifyCost``); each row's adaptive k weighs that
  against its running acceptance and drafts nothing where drafting does not pay.

- **Per-request switch.** The hook is not given request ids; the engine's host attaches the
  model runner through vLLM's worker extension (``actors.vllm_extension``), and the proposer
  reads each batch row's request from it: a request whose ``sampling_params.extra_args``
  say ``SPECULATIVE_ARG: False`` (``"speculative": false``) gets no drafts.
- **Sticky rows.** A request's history at step t+1 is its history at step t plus the
  accepted drafts plus one sampled token, i.e. plus ``sampled_token_ids[i]``: cutting
  those off finds the row's record from the previous step in one dict lookup. The record
  keeps its draft worker (so the worker's history-keyed state, a draft model's KV cache,
  is reused) and its adaptive k (``specserve.strategy``), learned from how much of the
  previous draft the new history accepted.
- **Load-aware k.** The measured cost is fitted over passes of every batch size, so adaptive
  k drafts less as the batch grows and a verified token costs more. ``k_per_batch_size``
  (optional) adds a fixed cap by running batch size (the same schedule is vLLM's
  ``num_speculative_tokens_per_batch_size``, so its scheduler sizes the verification to it);
  k = 0 is plain decoding.
- **Pipelining.** After returning drafts d for history h, the worker is already asked for
  k + 1 tokens after h + d, assuming full acceptance; vLLM verifies d meanwhile. If the
  next history is h + d + [x] and that block starts with x, its rest is the next draft
  with no wait.
- **Deadline, death, re-attach.** Each wait is bounded by ``deadline_ms``: late drafts or a
  dead worker give empty proposals (plain decoding for that step), never a failed or
  stuck request. A worker whose call failed or is still late is skipped, and tried again
  every ``REATTACH_EVERY`` steps (Ray restarts dead draft workers).

Only tensor-parallel rank 0 drafts: vLLM takes the drafts of its output rank.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError

from specserve.config import DrafterConfig
from specserve.strategy import KStrategy, VerifyCost, make_strategy

log = logging.getLogger("specserve.vllm_proposer")

#: Key under ``VllmConfig.additional_config`` holding this proposer's settings.
CONFIG_KEY = "specserve"
#: A skipped (failed or late) worker is tried again after this many steps.
REATTACH_EVERY = 8
#: Key of vLLM's ``SamplingParams.extra_args`` holding a request's ``speculative`` switch.
SPECULATIVE_ARG = "specserve_speculative"
#: Key of ``SamplingParams.extra_args`` naming a request's tenant (its API key's digest) when cross-request
#: caches are kept per tenant.
TENANT_ARG = "specserve_tenant"


@dataclass
class ProposerSettings:
    """What the engine's host passes through ``additional_config[CONFIG_KEY]`` (JSON-able)."""

    drafter: dict  # DrafterConfig as JSON (adaptive k and its cost model)
    local: bool = False  # draft in this process (a free drafter: n-gram), no Ray and no draft workers
    gcs_address: str | None = None  # Ray cluster to join (the host's own); remote drafting only
    namespace: str | None = None  # Ray namespace of the named draft workers
    draft_workers: list[str] = field(default_factory=list)  # actor names
    draft_cost_per_token: float = 0.0  # the drafter's own estimate, for adaptive k
    deadline_ms: float = 200.0
    pipelining: bool = True
    k_per_batch_size: list[list[int]] = field(default_factory=list)  # [[lo, hi, k], ...]; empty = no cap


@dataclass
class _RowRequest:
    """A batch row's request as vLLM's runner holds it."""

    req_id: str
    prompt_len: int
    tenant: str | None  # the cross-request cache it may read and feed (None: the replica's shared one)
    plain: bool  # the request turned speculation off


@dataclass
class _Row:
    """One running request as the proposer knows it, keyed by its history."""

    worker: int
    strategy: KStrategy
    drafts: list[int] = field(default_factory=list)  # what was proposed after the key history
    steps: int = 1  # calls this row has been in


class LocalDrafter:
    """A model-free drafter (n-gram, suffix) in the proposer's own process, answering at once.

    With the model runner attached, drafter state is keyed by vLLM's request ids: a request's state
    starts with its prompt, and ends as soon as vLLM drops the request (a suffix drafter's output then
    joins its cross-request cache at once). Without a runner (a proposer built by hand) it is keyed by
    token history, as on a draft worker.
    """

    def __init__(self, cfg: DrafterConfig):
        from specserve.drafters import make_drafter
        from specserve.drafters.history import HistoryDrafter

        self.drafter = make_drafter(cfg, None)  # type: ignore[arg-type]
        self.history = HistoryDrafter(self.drafter)
        self.started: set[str] = set()  # request ids with drafter state

    def propose_batch(self, histories: list[list[int]], k: int | list[int]) -> list[list[int]]:
        """Greedy drafts of up to ``k`` tokens after each history (as ``DraftWorker.propose_batch``)."""
        return self.history.propose_batch(histories, k)

    def propose_requests(self, requests: list[tuple[str, int, str | None]], histories: list[list[int]],
                         ks: list[int]) -> list[list[int]]:
        """Drafts for rows known by request: ``(request id, prompt length, tenant)`` per history."""
        from specserve.drafters.history import GREEDY

        out = []
        for (req_id, prompt_len, tenant), history, k in zip(requests, histories, ks):
            if req_id not in self.started:
                params = GREEDY.model_copy(update={"cache_tenant": tenant}) if tenant else GREEDY
                self.drafter.start(req_id, history[:prompt_len], params)
                self.started.add(req_id)
            self.drafter.commit(req_id, history)
            out.append([int(t) for t in self.drafter.propose(req_id, history, k).token_ids] if k > 0 else [])
        return out

    def retire(self, live) -> None:
        """End the state of every request vLLM no longer holds (``live``: its request ids)."""
        for req_id in [r for r in self.started if r not in live]:
            self.started.discard(req_id)
            self.drafter.finish(req_id)

    def stats(self) -> dict:
        """The drafter's own counters (a suffix drafter's cache size), {} for drafters without any."""
        stats = getattr(self.drafter, "stats", None)
        return stats() if stats is not None else {}


@dataclass
class _Worker:
    handle: object  # a DraftWorker actor handle, or a LocalDrafter
    skip_until_step: int = 0  # failed or late: plain decoding for its rows until this step
    late: object | None = None  # a call that missed its deadline and has not finished yet


def k_cap(schedule: list[list[int]], batch_size: int, k_max: int) -> int:
    """Largest k the schedule allows at this batch size (``k_max`` when no range covers it)."""
    for lo, hi, k in schedule:
        if lo <= batch_size <= hi:
            return min(k, k_max)
    return k_max if not schedule else min(schedule[-1][2], k_max)


class DraftWorkerProposer:
    """vLLM ``custom_class`` proposer backed by specserve DraftWorker actors."""

    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.k_max = int(spec.num_speculative_tokens)
        self.settings = ProposerSettings(**vllm_config.additional_config[CONFIG_KEY])
        self.drafter_cfg = DrafterConfig.model_validate(self.settings.drafter)
        self.deadline_s = self.settings.deadline_ms / 1000.0
        self.active = _is_output_rank()
        self.workers: list[_Worker] = []
        if self.active and self.settings.local:
            self.workers = [_Worker(LocalDrafter(self.drafter_cfg))]
        elif self.active:
            if not ray.is_initialized():
                ray.init(address=self.settings.gcs_address, namespace=self.settings.namespace,
                         logging_level=logging.WARNING, log_to_driver=False)
            self.workers = [_Worker(ray.get_actor(name, namespace=self.settings.namespace))
                            for name in self.settings.draft_workers]
        self.runner = None  # vLLM's model runner, attached by the host (actors.vllm_extension)
        self.rows: dict[bytes, _Row] = {}
        self.pipelined: dict[bytes, tuple[object, int]] = {}  # bytes(h + d) -> (ref, index in that call)
        self.step = 0
        self._next_worker = 0
        # Measured verification cost: the time from returning drafts to the next call is vLLM's step
        # over the tokens it verified (1 + drafts per row), so adaptive k learns what a draft token costs
        # on this machine at this batch size (and drafts nothing where that does not pay).
        self.verify_cost = VerifyCost(self.drafter_cfg.verify_cost_per_token)
        self.batch_size = 1
        self._returned_at: float | None = None
        self._verified_tokens = 0  # tokens vLLM verifies after the last return (0: do not measure)
        # Counters, read by tests and the benchmark through ``stats()``.
        self.counts = {"steps": 0, "calls": 0, "late": 0, "failed": 0, "pipelined_hits": 0,
                       "wait_s": 0.0}

    def load_model(self, *args, **kwargs) -> None:
        """vLLM hands over the target model here; remote drafting needs none of it."""

    def stats(self) -> dict:
        """Counters: steps, worker calls, late and failed calls, pipelined hits, time spent waiting; an in-process
        drafter's own (a suffix drafter's cache size)."""
        local = [w.handle.stats() for w in self.workers if isinstance(w.handle, LocalDrafter)]
        return {**self.counts, **(local[0] if local else {})}

    # ------------------------------------------------------------------------------- the hook

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings=None) -> list[list[int]]:
        """Draft tokens per running request (row i of the batch), or [] where there are none."""
        batch = len(sampled_token_ids)
        if not self.active or not self.workers:
            return [[] for _ in range(batch)]
        self.step += 1
        self.counts["steps"] += 1
        t0 = time.perf_counter()
        if self._verified_tokens and self._returned_at is not None:
            self.verify_cost.observe(self._verified_tokens, t0 - self._returned_at)
        self.batch_size = batch
        cap = k_cap(self.settings.k_per_batch_size, batch, self.k_max)
        histories: list[np.ndarray | None] = []
        rows: list[_Row | None] = []
        new_rows: dict[bytes, _Row] = {}
        for i, sampled in enumerate(sampled_token_ids):
            if not sampled:  # a prefill chunk or a discarded step: nothing to draft after
                histories.append(None)
                rows.append(None)
                continue
            h = token_ids_cpu[i, : int(num_tokens_no_spec[i])].astype(np.int64)  # [n]
            row = self._row_for(h, len(sampled))
            histories.append(h)
            rows.append(row)
            new_rows[h.tobytes()] = row
        self.rows = new_rows
        requests = self._requests(batch)
        ks = [min(r.strategy.next_k(), cap) if r is not None and not (q and q.plain) else 0
              for r, q in zip(rows, requests)]
        local = self.workers[0].handle if self.settings.local and self.runner is not None else None
        if local is not None:  # keyed by request: state ends with the request, not by guessing from histories
            drafts = self._local_drafts(local, histories, requests, ks)
        else:
            drafts = self._drafts(histories, rows, ks)
        for row, d in zip(rows, drafts):
            if row is not None:
                row.drafts = d
        if self.settings.pipelining:
            self._pipeline(histories, rows, drafts, ks)
        # Measure the next step only when every row continues a known one: a new request's prefill
        # would be counted as a verification of a few tokens.
        continuing = all(r is not None and r.steps > 1 for r in rows)
        self._verified_tokens = sum(1 + len(d) for d in drafts) if continuing else 0
        self._returned_at = time.perf_counter()
        self.counts["wait_s"] += self._returned_at - t0
        return drafts

    def _requests(self, batch: int) -> list[_RowRequest | None]:
        """Per row of the batch, its request as vLLM's runner holds it (None: no runner attached)."""
        runner = self.runner
        if runner is None:  # unattached: only a proposer built by hand (tests); the host refuses to serve so
            return [None] * batch
        out: list[_RowRequest | None] = []
        for req_id in runner.input_batch.req_ids[:batch]:
            state = runner.requests.get(req_id) if req_id else None
            if state is None:
                out.append(None)
                continue
            extra = (state.sampling_params.extra_args if state.sampling_params else None) or {}
            out.append(_RowRequest(req_id, len(state.prompt_token_ids or ()), extra.get(TENANT_ARG),
                                   extra.get(SPECULATIVE_ARG) is False))
        return out + [None] * (batch - len(out))

    def _local_drafts(self, local: LocalDrafter, histories: list, requests: list, ks: list[int]) -> list[list[int]]:
        """The in-process drafter's drafts, its state keyed by vLLM's request ids (ended once vLLM drops them)."""
        local.retire(self.runner.requests)
        todo = [i for i, (h, q) in enumerate(zip(histories, requests)) if h is not None and q is not None
                and not q.plain]
        out: list[list[int]] = [[] for _ in histories]
        if todo:
            self.counts["calls"] += 1
            found = local.propose_requests([(requests[i].req_id, requests[i].prompt_len, requests[i].tenant)
                                            for i in todo], [histories[i].tolist() for i in todo],
                                           [ks[i] for i in todo])
            for i, d in zip(todo, found):
                out[i] = d
        return out

    def _row_for(self, h: np.ndarray, num_sampled: int) -> _Row:
        prev = self.rows.get(h[: len(h) - num_sampled].tobytes())
        if prev is not None:
            # The new history accepted num_sampled - 1 tokens of the previous draft.
            prev.strategy.update(len(prev.drafts), min(num_sampled - 1, len(prev.drafts)))
            prev.steps += 1
            return prev
        worker = self._next_worker % len(self.workers)
        self._next_worker += 1
        return _Row(worker, make_strategy(self.drafter_cfg, self.settings.draft_cost_per_token,
                                          lambda: self.verify_cost.per_token(self.batch_size)))

    def _drafts(self, histories: list, rows: list, ks: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in histories]
        todo: dict[int, list[int]] = {}  # worker -> rows still needing a draft
        pipelined = self.pipelined
        self.pipelined = {}
        for i, (h, row, k) in enumerate(zip(histories, rows, ks)):
            if row is None or k == 0:
                continue
            hit = pipelined.get(h[:-1].tobytes())
            if hit is not None:
                block = self._result(row.worker, hit[0])
                if block is not None and len(block[hit[1]]) >= 2 and block[hit[1]][0] == int(h[-1]):
                    out[i] = block[hit[1]][1 : k + 1]
                    self.counts["pipelined_hits"] += 1
                    continue
            todo.setdefault(row.worker, []).append(i)
        calls = {}
        for w, idx in todo.items():
            if self._usable(w):
                calls[w] = (self._call(w, [histories[i].tolist() for i in idx], [ks[i] for i in idx]), idx)
        for w, (ref, idx) in calls.items():
            result = self._result(w, ref)
            if result is not None:
                for i, d in zip(idx, result):
                    out[i] = d
        return out

    def _pipeline(self, histories: list, rows: list, drafts: list[list[int]], ks: list[int]) -> None:
        """Ask for the block after each full draft now, while vLLM verifies this one."""
        todo: dict[int, list[np.ndarray]] = {}
        for h, row, d, k in zip(histories, rows, drafts, ks):
            if row is not None and d and len(d) == k:
                todo.setdefault(row.worker, []).append(np.concatenate([h, np.asarray(d, dtype=np.int64)]))
        for w, guessed in todo.items():
            if not self._usable(w):
                continue
            ref = self._call(w, [g.tolist() for g in guessed], self.k_max + 1)
            for j, g in enumerate(guessed):
                self.pipelined[g.tobytes()] = (ref, j)

    def _call(self, w: int, histories: list[list[int]], k: int | list[int]):
        """Start worker ``w``'s batch call: a Ray reference, or the drafts themselves for a local drafter."""
        self.counts["calls"] += 1
        handle = self.workers[w].handle
        if isinstance(handle, LocalDrafter):
            return handle.propose_batch(histories, k)
        return handle.propose_batch.remote(histories, k)

    def _usable(self, w: int) -> bool:
        worker = self.workers[w]
        if worker.late is not None:
            ready, _ = ray.wait([worker.late], timeout=0)
            if not ready:
                return False
            worker.late = None
        return self.step >= worker.skip_until_step

    def _result(self, w: int, ref) -> list[list[int]] | None:
        """The call's drafts, or None when it is late or failed (the worker is then skipped a while)."""
        if isinstance(ref, list):  # a local drafter's drafts
            return ref
        worker = self.workers[w]
        try:
            return ray.get(ref, timeout=self.deadline_s)
        except GetTimeoutError:
            self.counts["late"] += 1
            worker.late = ref
        except RayError as e:
            self.counts["failed"] += 1
            log.warning("draft worker %d failed (%s); plain decoding for its requests for now", w, type(e).__name__)
        worker.skip_until_step = self.step + REATTACH_EVERY
        return None


def _is_output_rank() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # no parallel state (a unit test building the proposer by hand)
        return True
