"""The proposer vLLM loads for remote drafting, driven as vLLM's model runner drives it, against real
draft worker actors on a local Ray: batching, sticky rows, pipelining, deadlines, a killed worker."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from actors.vllm_proposer import CONFIG_KEY, REATTACH_EVERY, VllmLocalProposer, VllmRemoteProposer
from specserve.config import DrafterConfig
from specserve.drafters.ngram import lookup

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    from cluster.local import init_local_ray

    ray = init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def start_worker(ray, name: str, drafter: dict):
    from actors.draft_worker import DraftWorker

    worker = DraftWorker.options(name=name, num_cpus=0.1).remote({"dtype": "fp32"}, drafter, 1)
    ray.get(worker.info.remote())
    return worker


def vllm_config(k: int, **options) -> SimpleNamespace:
    """A config shaped as vLLM's (the two fields the proposer reads)."""
    return SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=k),
                           additional_config={CONFIG_KEY: options})


def make_proposer(ray, names: list[str], drafter: dict, k: int = 4, **settings) -> VllmRemoteProposer:
    """The proposer of remote drafting, against the named draft workers."""
    ctx = ray.get_runtime_context()
    return VllmRemoteProposer(vllm_config(k, gcs_address=ctx.gcs_address, namespace=ctx.namespace,
                                           draft_workers=names, drafter=drafter, **settings))


class Batch:
    """vLLM's view of running requests: token rows and counts, grown by the accepted drafts + one token."""

    def __init__(self, histories: list[list[int]]):
        self.rows = [list(h) for h in histories]
        self.sampled = [[h[-1]] for h in histories]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(r) for r in self.rows) + 16
        tokens = np.zeros((len(self.rows), width), dtype=np.int32)  # [max_num_reqs, max_model_len]
        for i, r in enumerate(self.rows):
            tokens[i, : len(r)] = r
        return np.array([len(r) for r in self.rows], dtype=np.int32), tokens

    def propose(self, proposer) -> list[list[int]]:
        counts, tokens = self.arrays()
        return proposer.propose(self.sampled, counts, tokens)

    def advance(self, drafts: list[list[int]], accept: list[int], bonus: list[int]) -> None:
        """Accept ``accept[i]`` tokens of each draft, then the sampled ``bonus[i]``."""
        self.sampled = []
        for i, d in enumerate(drafts):
            new = d[: accept[i]] + [bonus[i]]
            self.rows[i] += new
            self.sampled.append(new)


HISTORIES = [[5, 6, 7, 8, 9, 5, 6, 7], [1, 2, 3, 1, 2, 3, 1, 2], [40, 41, 42, 43, 40, 41]]
NGRAM = DrafterConfig(kind="ngram", adaptive_k=False, num_speculative_tokens=4).model_dump(mode="json")


def test_one_call_drafts_the_whole_batch_as_the_drafter_would(ray_local):
    worker = start_worker(ray_local, "pw-batch", NGRAM)  # noqa: F841 (a named actor lives while a handle does)
    proposer = make_proposer(ray_local, ["pw-batch"], NGRAM, pipelining=False)
    batch = Batch(HISTORIES)
    drafts = batch.propose(proposer)
    assert drafts == [lookup(h, 4, 1, 4) for h in HISTORIES]
    assert proposer.counts["calls"] == 1
    # Rows without a sampled token (a prefill chunk) get no draft and cost nothing.
    batch.sampled[1] = []
    assert batch.propose(proposer)[1] == []


def test_the_local_drafter_drafts_the_batch_in_process_as_the_drafter_would():
    proposer = VllmLocalProposer(vllm_config(4, drafter=NGRAM))
    batch = Batch(HISTORIES)
    assert batch.propose(proposer) == [lookup(h, 4, 1, 4) for h in HISTORIES]
    assert proposer.counts["failed"] == proposer.counts["late"] == 0


def rejecting_steps(proposer, batch: Batch, steps: int) -> list[list[list[int]]]:
    """``steps`` engine steps in which vLLM rejects every first draft token: the sampled token is
    another token of the history, so the n-gram drafter still finds a match to propose from."""
    out = []
    for _ in range(steps):
        drafts = batch.propose(proposer)
        out.append(drafts)
        bonus = [next(t for t in (1, 2, 3) if not d or t != d[0]) for d in drafts]
        batch.advance(drafts, accept=[0] * len(drafts), bonus=bonus)
    return out


@pytest.mark.parametrize("b_over_a, drafts_after", [(0.005, True), (0.5, False)], ids=["cheap", "dear"])
def test_adaptive_k_drafts_only_where_the_measured_verification_cost_lets_it_pay(b_over_a, drafts_after):
    adaptive = DrafterConfig(kind="ngram", num_speculative_tokens=4).model_dump(mode="json")
    proposer = VllmLocalProposer(vllm_config(4, drafter=adaptive))
    # What the proposer would time between calls: passes of 1-8 tokens at a + b * tokens seconds.
    for tokens in list(range(1, 9)) * 3:
        proposer.verify_cost.observe(tokens, 0.1 + 0.1 * b_over_a * tokens)
    assert proposer.verify_cost.ratio() == pytest.approx(b_over_a, rel=1e-3)
    batch = Batch([[1, 2, 3, 1, 2, 3, 1, 2] * 4])  # a history the n-gram drafter always matches
    steps = rejecting_steps(proposer, batch, 6)
    assert all(steps[i] != [[]] for i in (0, 1)), "the prior lets a new request draft"
    # Acceptance gone: a draft token that costs half a step no longer pays, a cheap one still does.
    assert (steps[-1] != [[]]) == drafts_after


def test_rows_stay_with_their_worker_and_learn_their_acceptance(ray_local):
    workers = [start_worker(ray_local, name, NGRAM) for name in ("pw-a", "pw-b")]  # noqa: F841
    adaptive = DrafterConfig(kind="ngram", num_speculative_tokens=4).model_dump(mode="json")
    proposer = make_proposer(ray_local, ["pw-a", "pw-b"], adaptive, pipelining=False)
    batch = Batch(HISTORIES)
    drafts = batch.propose(proposer)
    assigned = {h.tobytes(): r.worker for h, r in zip([np.asarray(r) for r in batch.rows], proposer.rows.values())}
    assert len(set(assigned.values())) == 2, "rows are spread over the workers"
    alphas = [r.strategy.alpha for r in proposer.rows.values()]
    batch.advance(drafts, accept=[len(d) for d in drafts], bonus=[0, 0, 0])
    batch.propose(proposer)
    rows = list(proposer.rows.values())
    assert [r.worker for r in rows] == list(assigned.values())
    assert all(r.strategy.alpha > a for r, a, d in zip(rows, alphas, drafts) if d)


def test_pipelined_drafts_are_used_when_the_whole_draft_was_accepted(ray_local):
    worker = start_worker(ray_local, "pw-pipe", NGRAM)  # noqa: F841
    proposer = make_proposer(ray_local, ["pw-pipe"], NGRAM, pipelining=True)
    plain = make_proposer(ray_local, ["pw-pipe"], NGRAM, pipelining=False)
    batch = Batch([[1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2]])
    drafts = batch.propose(proposer)
    assert drafts == [[3, 4, 5, 6]]
    batch.advance(drafts, accept=[4], bonus=[1])  # all accepted and the bonus is what the guess drafted next
    calls = proposer.counts["calls"]
    assert batch.propose(proposer) == batch.propose(plain)
    assert proposer.counts["pipelined_hits"] == 1
    assert proposer.counts["calls"] == calls + 1, "only the next pipelined call, no synchronous one"


def test_late_drafts_give_empty_proposals_and_the_worker_is_skipped_then_retried(ray_local):
    worker = start_worker(ray_local, "pw-late", NGRAM)  # noqa: F841
    proposer = make_proposer(ray_local, ["pw-late"], NGRAM, pipelining=False, deadline_ms=0.001)
    batch = Batch(HISTORIES)
    assert batch.propose(proposer) == [[], [], []]
    assert proposer.counts["late"] == 1
    time.sleep(0.5)
    proposer.deadline_s = 5.0
    for _ in range(REATTACH_EVERY - 1):
        assert batch.propose(proposer) == [[], [], []]  # skipped: plain decoding, no call
    assert batch.propose(proposer) == [lookup(h, 4, 1, 4) for h in HISTORIES]


def test_a_killed_worker_gives_empty_proposals_and_is_used_again_once_restarted(ray_local):
    worker = start_worker(ray_local, "pw-kill", NGRAM)
    proposer = make_proposer(ray_local, ["pw-kill"], NGRAM, pipelining=False, deadline_ms=2000)
    batch = Batch(HISTORIES)
    expected = [lookup(h, 4, 1, 4) for h in HISTORIES]
    assert batch.propose(proposer) == expected
    os.kill(ray_local.get(worker.info.remote())["pid"], 9)
    assert batch.propose(proposer) == [[], [], []]
    assert proposer.counts["failed"] + proposer.counts["late"] >= 1
    got = []
    for _ in range(20 * REATTACH_EVERY):
        got = batch.propose(proposer)
        if got == expected:
            break
        time.sleep(0.05)
    assert got == expected, "drafting resumed on the restarted worker"


def test_actors_on_the_local_ray_are_not_niced_so_an_engine_they_start_keeps_its_core(ray_local):
    # A vLLM engine inherits its niceness from the replica that starts it; at Ray's default (15) its
    # CPU worker yields to every nice-0 Ray daemon on the node.
    @ray_local.remote(num_cpus=0.1)
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, 0)

    assert ray_local.get(niceness.remote()) == 0
