"""The router's batcher gathers one step of every sequence of a group into one pass.

A sequence whose block arrives late (a draft worker's reply) is waited for, up to a fraction of
the mean pass time; one that left (finished) is not. The target group here is a stand-in that
records the passes it is asked for: what is under test is the batcher's scheduling, not the model.
"""

from __future__ import annotations

import asyncio

from actors.router import _Batcher
from specserve.cost import VerifyCost
from specserve.sampling import Verdict
from specserve.target import StepRequest, StepResult

PASS_S = 0.2  # every pass of the stand-in group takes this long


class _Group:
    index, generation, ranks = 0, 1, [object()]

    def __init__(self):
        self.passes: list[list[str]] = []
        self.widths: list[dict[str, int]] = []  # draft tokens each sequence had verified, per pass

    async def step_batch(self, reqs):
        self.passes.append(sorted(r.seq_id for r in reqs))
        self.widths.append({r.seq_id: len(r.draft_tokens) for r in reqs})
        await asyncio.sleep(PASS_S)
        return [StepResult(Verdict([0], 0)) for _ in reqs]


class _Metrics:
    def verify_pass(self, n: int) -> None:
        """Not under test."""


async def _steps(wait_fraction: float, late_s: float, leave_b: bool = False) -> list[list[str]]:
    group = _Group()
    batcher = _Batcher(group, 16, None, VerifyCost(0.03), _Metrics(), wait_fraction)
    for s in ("a", "b"):
        batcher.join(s)
    await batcher.submit(StepRequest("a", 0, [], None))  # a first pass of one: the batcher learns the pass time
    await batcher.submit(StepRequest("b", 0, [], None))
    if leave_b:
        batcher.leave("b")
    first = batcher.submit(StepRequest("a", 0, [], None))
    await asyncio.sleep(late_s)  # b's block arrives late (or, having left, a new sequence's does)
    await batcher.submit(StepRequest("b", 0, [], None))
    await first
    batcher.task.cancel()
    return group.passes[2:]


def test_a_late_member_joins_the_pass_when_it_arrives_within_the_window():
    assert asyncio.run(_steps(wait_fraction=0.5, late_s=0.02)) == [["a", "b"]]


def test_without_waiting_the_late_member_gets_a_pass_of_its_own():
    assert asyncio.run(_steps(wait_fraction=0.0, late_s=0.02)) == [["a"], ["b"]]


def test_a_member_later_than_the_window_does_not_hold_the_pass():
    assert asyncio.run(_steps(wait_fraction=0.25, late_s=0.3)) == [["a"], ["b"]]


def test_a_member_that_left_is_not_waited_for():
    # Had the batcher waited for "b", the block arriving 0.03 s later (inside the 0.1 s window) would share the pass.
    assert asyncio.run(_steps(wait_fraction=0.5, late_s=0.03, leave_b=True)) == [["a"], ["b"]]


def test_one_long_draft_in_a_big_pass_is_cut_to_what_pays_and_reported_as_such():
    async def run():
        group = _Group()
        batcher = _Batcher(group, 16, None, VerifyCost(0.03), _Metrics(), 0.0)
        futures = [batcher.submit(StepRequest("long", 0, [5] * 6, None), alpha=0.6)]
        futures += [batcher.submit(StepRequest(f"s{i}", 0, [], None)) for i in range(15)]
        fixed = batcher.submit(StepRequest("fixed", 0, [7] * 3, None))  # no alpha: a fixed k is never cut
        results = await asyncio.gather(*futures, fixed)
        batcher.task.cancel()
        return group.widths, results

    widths, results = asyncio.run(run())
    # 17 sequences > 16 per pass: the first pass holds "long" and 15 plain ones; "fixed" runs next, uncut.
    assert widths[0]["long"] == 0 and len(widths[0]) == 16
    assert widths[1] == {"fixed": 3}
    assert results[0].num_verified == 0
    assert results[-1].num_verified is None
