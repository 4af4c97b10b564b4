"""vLLM proposer that drafts with specserve drafters: on draft workers (Ray actors), or in process.

vLLM builds one of these classes inside its worker process (``speculative_config={"method":
"custom_class", "model": "actors.vllm_proposer.VllmRemoteProposer", ...}``) and calls ``propose``
after every step with the token history of each running request: token ids only.
``VllmRemoteProposer`` (``drafter.vllm_placement = "draft_workers"``) sends the whole batch to the
draft workers in one call per worker; ``VllmLocalProposer`` (``"vllm_worker"``, a model-free n-gram or
suffix drafter) drafts right here, with no Ray at all, its state keyed by vLLM's request ids (started
with the prompt, ended when vLLM drops the request; a request's ``TENANT_ARG`` picks the suffix
drafter's per-tenant cache). Both share ``VllmProposer``: rows, adaptive k, the measured cost.

- **Measured cost, adaptive k.** The time from returning drafts to the next call is vLLM's
  step over the tokens it verified, so the proposer fits what one more draft token costs at
  this batch size (``specserve.cost.VerifyCost``); each row's adaptive k weighs that
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
  k drafts less as the batch grows and a verified token costs more; with ``drafting_switch`` whole
  steps are timed too (``specserve.cost.DraftingSwitch``): per batch-size bucket, committed tokens per second of
  steps that verified drafts against steps that drafted nothing, so drafting stops at the batch
  sizes where it loses on this machine, whatever the per-token price says. ``k_per_batch_size``
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
from specserve.cost import DraftingSwitch, VerifyCost
from specserve.strategy import KStrategy, make_strategy

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
    gcs_address: str | None = None  # Ray cluster to join (the host's own); remote drafting only
    namespace: str | None = None  # Ray namespace of the named draft workers
    draft_workers: list[str] = field(default_factory=list)  # actor names
    draft_cost_per_token: float = 0.0  # the drafter's own estimate, for adaptive k
    deadline_ms: float = 200.0
    pipelining: bool = True
    k_per_batch_size: list[list[int]] = field(default_factory=list)  # [[lo, hi, k], ...]; empty = no cap
    drafting_switch: bool = True  # time whole steps and draft only at batch sizes where that pays


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


@dataclass
class _Worker:
    handle: object  # a DraftWorker actor handle
    skip_until_step: int = 0  # failed or late: plain decoding for its rows until this step
    late: object | None = None  # a call that missed its deadline and has not finished yet


def k_cap(schedule: list[list[int]], batch_size: int, k_max: int) -> int:
    """Largest k the schedule allows at this batch size (``k_max`` when no range covers it)."""
    for lo, hi, k in schedule:
        if lo <= batch_size <= hi:
            return min(k, k_max)
    return k_max if not schedule else min(schedule[-1][2], k_max)


class VllmProposer:
    """What every specserve proposer in vLLM's worker shares, behind vLLM's one ``propose()``.

    One record per running request (:class:`_Row`, keyed by its history), its adaptive k priced by the
    verification cost measured between calls, the per-request switch read from the attached runner, the
    counters. Subclasses say where the drafts come from (``_draft``) and what to start after returning
    them (``_after``).
    """

    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.k_max = int(spec.num_speculative_tokens)
        self.settings = ProposerSettings(**vllm_config.additional_config[CONFIG_KEY])
        self.drafter_cfg = DrafterConfig.model_validate(self.settings.drafter)
        self.active = _is_output_rank()
        self.runner = None  # vLLM's model runner, attached by the host (actors.vllm_extension)
        self.rows: dict[bytes, _Row] = {}
        self.step = 0
        # Measured verification cost: the time from returning drafts to the next call is vLLM's step
        # over the tokens it verified (1 + drafts per row), so adaptive k learns what a draft token costs
        # on this machine at this batch size (and drafts nothing where that does not pay).
        self.verify_cost = VerifyCost(self.drafter_cfg.verify_cost_per_token)
        # And whole steps: whether drafting at all pays at this batch size (what the per-token price misses).
        self.switch = DraftingSwitch() if self.settings.drafting_switch else None
        self._called_at: float | None = None  # when the previous call started (a step is call to call)
        self._drafted = False  # the previous call returned drafts: the step that followed verified them
        self.batch_size = 1
        self._returned_at: float | None = None
        self._verified_tokens = 0  # tokens vLLM verifies after the last return (0: do not measure)
        # Counters, read by tests and the benchmark through ``stats()``.
        self.counts = {"steps": 0, "plain_steps": 0, "calls": 0, "late": 0, "failed": 0, "pipelined_hits": 0,
                       "wait_s": 0.0}

    def load_model(self, *args, **kwargs) -> None:
        """vLLM hands over the target model here; our drafters need none of it."""

    def stats(self) -> dict:
        """Counters: steps, steps the switch kept plain, drafting calls, late and failed calls, pipelined hits,
        time spent drafting."""
        return dict(self.counts)

    # ------------------------------------------------------------------------------- the hook

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings=None) -> list[list[int]]:
        """Draft tokens per running request (row i of the batch), or [] where there are none."""
        batch = len(sampled_token_ids)
        if not self.active or not self._can_draft():
            return [[] for _ in range(batch)]
        self.step += 1
        self.counts["steps"] += 1
        t0 = time.perf_counter()
        if self._verified_tokens and self._returned_at is not None:
            self.verify_cost.observe(self._verified_tokens, t0 - self._returned_at)
        step_s = t0 - self._called_at if self._called_at is not None else 0.0
        self._called_at = t0
        previous_batch, self.batch_size = self.batch_size, batch
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
        # The step just done, timed call to call, if no request's prefill ran in it (a prefill's time is
        # not a decode step's): its committed tokens per second, drafting or plain, for the switch.
        prefill_free = all(r is not None and r.steps > 1 for r in rows)
        if self.switch is not None and step_s > 0 and prefill_free:
            self.switch.observe(previous_batch, self._drafted, sum(map(len, sampled_token_ids)), step_s)
        drafting = self.switch.draft(batch) if self.switch is not None else True
        if not drafting:
            self.counts["plain_steps"] += 1
        cap = k_cap(self.settings.k_per_batch_size, batch, self.k_max) if drafting else 0
        requests = self._requests(batch)
        ks = [min(r.strategy.next_k(), cap) if r is not None and not (q and q.plain) else 0
              for r, q in zip(rows, requests)]
        drafts = self._draft(histories, rows, requests, ks)
        for row, d in zip(rows, drafts):
            if row is not None:
                row.drafts = d
        self._after(histories, rows, drafts, ks)
        # Measure the next step only when every row continues a known one: a new request's prefill
        # would be counted as a verification of a few tokens.
        self._verified_tokens = sum(1 + len(d) for d in drafts) if prefill_free else 0
        self._drafted = any(drafts)
        self._returned_at = time.perf_counter()
        self.counts["wait_s"] += self._returned_at - t0
        return drafts

    def _can_draft(self) -> bool:
        return True

    def _draft(self, histories: list, rows: list, requests: list, ks: list[int]) -> list[list[int]]:
        """Drafts of up to ``ks[i]`` tokens per row (``[]`` for rows without a history or with k 0)."""
        raise NotImplementedError

    def _after(self, histories: list, rows: list, drafts: list[list[int]], ks: list[int]) -> None:
        """Work to start once the drafts are returned, while vLLM verifies them (nothing by default)."""

    def _new_row_worker(self) -> int:
        """The draft worker a new request's rows go to (0 where there is one drafter)."""
        return 0

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

    def _row_for(self, h: np.ndarray, num_sampled: int) -> _Row:
        prev = self.rows.get(h[: len(h) - num_sampled].tobytes())
        if prev is not None:
            # The new history accepted num_sampled - 1 tokens of the previous draft.
            prev.strategy.update(len(prev.drafts), min(num_sampled - 1, len(prev.drafts)))
            prev.steps += 1
            return prev
        return _Row(self._new_row_worker(), make_strategy(self.drafter_cfg, self.settings.draft_cost_per_token,
                                                          lambda: self.verify_cost.per_token(self.batch_size)))


class VllmLocalProposer(VllmProposer):
    """A model-free drafter (n-gram, suffix) in vLLM's worker process: no Ray, drafts at once.

    With the model runner attached, drafter state is keyed by vLLM's request ids: a request's state
    starts with its prompt (and its tenant's cache), and ends as soon as vLLM drops the request (a
    suffix drafter's output then joins its cross-request cache at once). Without a runner (a proposer
    built by hand) it is keyed by token history, as on a draft worker.
    """

    def __init__(self, vllm_config):
        super().__init__(vllm_config)
        from specserve.drafters import make_drafter
        from specserve.drafters.history import HistoryDrafter

        self.drafter = make_drafter(self.drafter_cfg, None)  # type: ignore[arg-type]
        self.by_history = HistoryDrafter(self.drafter)
        # A suffix drafter whose finished outputs the engine's host trades with other replicas (actors.suffix_hub).
        self.shared_suffix = None
        if self.drafter_cfg.suffix_shared_cache:
            self.shared_suffix = self.drafter
            self.shared_suffix.share()
        self.started: set[str] = set()  # request ids with drafter state

    def stats(self) -> dict:
        """The counters and the drafter's own (a suffix drafter's cache size)."""
        own = getattr(self.drafter, "stats", None)
        return {**self.counts, **(own() if own is not None else {})}

    def take_shared(self) -> list:
        """The outputs finished since the last call, as (tenant, tokens), for the other replicas; [] unless the
        cache is shared. Requests vLLM dropped since the last step are ended first (an idle engine runs no step)."""
        if self.shared_suffix is None:
            return []
        if self.runner is not None:
            self._retire(self.runner.requests)
        return self.shared_suffix.take_outbox()

    def learn_shared(self, outputs: list) -> int:
        """Add other replicas' finished outputs, (tenant, tokens), to the cache; how many were added."""
        return self.shared_suffix.learn_all(outputs) if self.shared_suffix is not None else 0

    def _draft(self, histories: list, rows: list, requests: list, ks: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in histories]
        if self.runner is not None:
            self._retire(self.runner.requests)
        todo = [i for i, (h, q, k) in enumerate(zip(histories, requests, ks))
                if h is not None and (k > 0 or q is not None)]  # known requests commit even at k = 0
        if not todo:
            return out
        self.counts["calls"] += 1
        if self.runner is None:
            found = self.by_history.propose_batch([histories[i].tolist() for i in todo], [ks[i] for i in todo])
        else:
            found = [self._propose_request(requests[i], histories[i].tolist(), ks[i]) for i in todo]
        for i, d in zip(todo, found):
            out[i] = d
        return out

    def _propose_request(self, req: _RowRequest, history: list[int], k: int) -> list[int]:
        from specserve.drafters.history import GREEDY

        if req.req_id not in self.started:
            params = GREEDY.model_copy(update={"cache_tenant": req.tenant}) if req.tenant else GREEDY
            self.drafter.start(req.req_id, history[: req.prompt_len], params)
            self.started.add(req.req_id)
        self.drafter.commit(req.req_id, history)
        return [int(t) for t in self.drafter.propose(req.req_id, history, k).token_ids] if k > 0 else []

    def _retire(self, live) -> None:
        """End the state of every request vLLM no longer holds (``live``: its request ids)."""
        for req_id in [r for r in self.started if r not in live]:
            self.started.discard(req_id)
            self.drafter.finish(req_id)


class VllmRemoteProposer(VllmProposer):
    """Drafts from specserve DraftWorker actors, one batch call per worker per step.

    Each request's rows stay with one worker (its history-keyed state, a draft model's KV cache, is
    reused); a late or failed call gives that worker's rows no drafts and the worker is skipped for
    ``REATTACH_EVERY`` steps; with pipelining the block after each full draft is asked for at once.
    """

    def __init__(self, vllm_config):
        super().__init__(vllm_config)
        self.deadline_s = self.settings.deadline_ms / 1000.0
        self.workers: list[_Worker] = []
        if self.active:
            if not ray.is_initialized():
                ray.init(address=self.settings.gcs_address, namespace=self.settings.namespace,
                         logging_level=logging.WARNING, log_to_driver=False)
            self.workers = [_Worker(ray.get_actor(name, namespace=self.settings.namespace))
                            for name in self.settings.draft_workers]
        self.pipelined: dict[bytes, tuple[object, int]] = {}  # bytes(h + d) -> (ref, index in that call)
        self._next_worker = 0

    def _can_draft(self) -> bool:
        return bool(self.workers)

    def _new_row_worker(self) -> int:
        worker = self._next_worker % len(self.workers)
        self._next_worker += 1
        return worker

    def _draft(self, histories: list, rows: list, requests: list, ks: list[int]) -> list[list[int]]:
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

    def _after(self, histories: list, rows: list, drafts: list[list[int]], ks: list[int]) -> None:
        """With pipelining: ask for the block after each full draft now, while vLLM verifies this one."""
        if not self.settings.pipelining:
            return
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
        """Start worker ``w``'s batch call (a Ray reference)."""
        self.counts["calls"] += 1
        return self.workers[w].handle.propose_batch.remote(histories, k)

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
