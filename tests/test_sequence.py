"""Stop conditions and what may be streamed: a sequence's text is final only up to the hold-back."""

import pytest

from specserve.sequence import stream_holdback
from specserve.step import run_sync


@pytest.mark.parametrize("text,stop,emitted,expected", [
    ("Hello world", [], 0, 0),  # nothing can change: stream everything
    ("Hello world", ["END"], 0, 2),  # "ld" could be the start of "END"... any 2 trailing chars may
    ("Hello world", ["a", "END", "STOP!"], 0, 4),  # the longest stop string decides
    ("caf\ufffd", [], 0, 1),  # an incomplete UTF-8 character waits for its next byte
    ("ab\ufffd\ufffd", [], 0, 2),
    ("ab\ufffd", [], 3, 0),  # never hold back what was already sent
    ("x\ufffd", ["END"], 0, 2),  # the stop-string hold-back covers the partial character
    ("\ufffd\ufffd", [], 0, 2),
])
def test_stream_holdback(text, stop, emitted, expected):
    assert stream_holdback(text, stop, emitted) == expected


def test_run_sync_returns_the_value_of_a_coroutine_that_never_suspends():
    async def no_wait(x):
        return x * 2

    assert run_sync(no_wait(21)) == 42


def test_run_sync_refuses_a_coroutine_that_suspends():
    class Suspend:
        def __await__(self):
            yield  # what a real I/O wait does: hand control back to an event loop

    async def waits():
        await Suspend()

    with pytest.raises(RuntimeError, match="suspended"):
        run_sync(waits())
