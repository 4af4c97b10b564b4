"""The router's batcher gathers one step of every sequence of a group into one pass.

A sequence whose block arrives late (a draft worker's reply) is waited for, up to a fraction of
the mean pass time; one that left (finished) is not. The target group here is a stand-in that
records the passes it is asked for: what is under test is the batcher's scheduling, not the model.

Every test runs on an event loop with virtual time (:class:`_VirtualTimeLoop`) and hands the
batcher that loop's clock, so the stand-in's pass time, a block's lateness and the batcher's wait
are exact: no outcome depends on how busy the machine is, and no test sleeps in real time.
"""

from __future__ import annotations

import asyncio
import selectors

import pytest

from actors.batcher import Batcher
from specserve.cost import VerifyCost
from specserve.sampling import Verdict
from specserve.target import StepRequest, StepResult

PASS_S = 0.2  # every pass of the stand-in group takes this long (virtual seconds)


class _VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when every task waits: it then jumps to the next timer.

    Timers (``asyncio.sleep``, ``asyncio.wait_for``) fire in the order of their virtual times, however
    long the code between them takes in real time.
    """

    def __init__(self):
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


class _JumpingSelector(selectors.DefaultSelector):
    """Instead of blocking until the loop's next timer is due, advance the loop's clock to it."""

    def __init__(self, loop: _VirtualTimeLoop):
        super().__init__()
        self.loop = loop

    def select(self, timeout=None):
        if timeout is None:  # no timer and nothing ready: with no I/O here, nothing could ever run again
            raise RuntimeError("deadlock: every task waits and no timer is due")
        self.loop.now += timeout
        return super().select(0)


def _run(main):
    with asyncio.Runner(loop_factory=_VirtualTimeLoop) as runner:
        return runner.run(main)


def _batcher(group: _Group, wait_fraction: float) -> Batcher:
    """A batcher timed by the running (virtual time) loop's clock."""
    return Batcher(group, 16, None, VerifyCost(0.03), _Metrics(), wait_fraction,
                   clock=asyncio.get_running_loop().time)


class _Group:
    index, generation, ranks = 0, 1, [object()]

    def __init__(self):
        self.passes: list[list[str]] = []
        self.started: list[float] = []  # when each pass began (the loop's virtual time)
        self.widths: list[dict[str, int]] = []  # draft tokens each sequence had verified, per pass

    async def step_batch(self, reqs):
        self.passes.append(sorted(r.seq_id for r in reqs))
        self.started.append(asyncio.get_running_loop().time())
        self.widths.append({r.seq_id: len(r.draft_tokens) for r in reqs})
        await asyncio.sleep(PASS_S)
        return [StepResult(Verdict([0], 0)) for _ in reqs]


class _Metrics:
    def verify_pass(self, n: int) -> None:
        """Not under test."""


async def _steps(wait_fraction: float, late_s: float, leave_b: bool = False) -> tuple[list[list[str]], float]:
    """The passes of one step of "a" and "b" when b's block comes ``late_s`` after a's, and when
    (after a's block was submitted) the step's first pass began."""
    loop = asyncio.get_running_loop()
    group = _Group()
    batcher = _batcher(group, wait_fraction)
    for s in ("a", "b"):
        batcher.join(s)
    await batcher.submit(StepRequest("a", 0, [], None))  # a first pass of one: the batcher learns the pass time
    await batcher.submit(StepRequest("b", 0, [], None))
    if leave_b:
        batcher.leave("b")
    t0 = loop.time()
    first = batcher.submit(StepRequest("a", 0, [], None))
    await asyncio.sleep(late_s)  # b's block arrives late (or, having left, a new sequence's does)
    await batcher.submit(StepRequest("b", 0, [], None))
    await first
    batcher.task.cancel()
    return group.passes[2:], group.started[2] - t0


def test_a_late_member_joins_the_pass_when_it_arrives_within_the_window():
    passes, started = _run(_steps(wait_fraction=0.5, late_s=0.02))
    assert passes == [["a", "b"]]
    assert started == pytest.approx(0.02)  # the pass ran as soon as b came, not at the end of the 0.1 s window


def test_without_waiting_the_late_member_gets_a_pass_of_its_own():
    passes, started = _run(_steps(wait_fraction=0.0, late_s=0.02))
    assert passes == [["a"], ["b"]]
    assert started == pytest.approx(0.0)


def test_a_member_later_than_the_window_does_not_hold_the_pass():
    # The window is 0.25 x 0.2 s = 0.05 s; b comes just after it closed (while a's pass runs).
    passes, started = _run(_steps(wait_fraction=0.25, late_s=0.06))
    assert passes == [["a"], ["b"]]
    assert started == pytest.approx(0.05)  # a waited for b exactly the window, no longer


def test_a_member_that_left_is_not_waited_for():
    # Had the batcher waited for "b", the block arriving 0.03 s later (inside the 0.1 s window) would share the pass.
    passes, started = _run(_steps(wait_fraction=0.5, late_s=0.03, leave_b=True))
    assert passes == [["a"], ["b"]]
    assert started == pytest.approx(0.0)  # a's pass did not wait at all


def test_one_long_draft_in_a_big_pass_is_cut_to_what_pays_and_reported_as_such():
    async def run():
        group = _Group()
        batcher = _batcher(group, 0.0)
        futures = [batcher.submit(StepRequest("long", 0, [5] * 6, None), alpha=0.6)]
        futures += [batcher.submit(StepRequest(f"s{i}", 0, [], None)) for i in range(15)]
        fixed = batcher.submit(StepRequest("fixed", 0, [7] * 3, None))  # no alpha: a fixed k is never cut
        results = await asyncio.gather(*futures, fixed)
        batcher.task.cancel()
        return group.widths, results

    widths, results = _run(run())
    # 17 sequences > 16 per pass: the first pass holds "long" and 15 plain ones; "fixed" runs next, uncut.
    assert widths[0]["long"] == 0 and len(widths[0]) == 16
    assert widths[1] == {"fixed": 3}
    assert results[0].num_verified == 0
    assert results[-1].num_verified is None


def test_a_pass_failing_on_a_live_rank_rebuilds_the_group_too():
    # A rank of a tensor-parallel group died mid-pass; the first error back may be the live rank's own (its
    # collective lost its peer: a RayTaskError), not the dead rank's RayActorError. Either breaks the group.
    from ray.exceptions import RayTaskError

    from specserve.errors import TargetFailed

    class _BrokenGroup(_Group):
        async def step_batch(self, reqs):
            await asyncio.sleep(PASS_S)
            raise RayTaskError("step_batch", "Traceback: gloo connection closed by peer",
                               RuntimeError("Connection closed by peer"))

    async def run():
        group, rebuilt = _BrokenGroup(), []

        async def on_failure(g):
            rebuilt.append(g)

        batcher = Batcher(group, 16, on_failure, VerifyCost(0.03), _Metrics(), 0.0,
                          clock=asyncio.get_running_loop().time)
        results = await asyncio.gather(batcher.submit(StepRequest("a", 0, [], None)),
                                       batcher.submit(StepRequest("b", 0, [], None)), return_exceptions=True)
        await asyncio.sleep(0)
        batcher.task.cancel()
        return results, rebuilt

    results, rebuilt = _run(run())
    assert all(isinstance(r, TargetFailed) for r in results), results
    assert len(rebuilt) == 1
