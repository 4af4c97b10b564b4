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


def _texts_as_committed(tokenizer, ids: list[int], stop: list[str], block: int):
    """Commit ``ids`` in blocks of ``block``; the sequence's text after each block, and the sequence."""
    from specserve.config import SamplingParams
    from specserve.sequence import Sequence

    seq = Sequence([1], SamplingParams(max_tokens=len(ids), stop=stop or None, ignore_eos=True), tokenizer, [])
    texts = []
    for i in range(0, len(ids), block):
        seq.commit(ids[i : i + block])
        texts.append(seq.text)
        if seq.finished:
            break
    return texts, seq


@pytest.mark.parametrize("block", [1, 3, 8])
def test_incremental_text_equals_decoding_the_whole_output_after_every_commit(tokenizer, block):
    import random

    rng = random.Random(block)
    sample = "Grüße aus Köln — 東京タワー 🚀🎉 ça va? naïve café, emoji: 👩‍💻\n\tdef f(x):\n    return x**2  # ok"
    ids = tokenizer.encode(sample, add_special_tokens=False)
    # Random ids too (byte tokens that split characters, special tokens that decoding skips).
    for trial in range(20):
        cases = ids if trial == 0 else [rng.randrange(len(tokenizer)) for _ in range(60)]
        texts, seq = _texts_as_committed(tokenizer, cases, [], block)
        for n, text in zip(range(block, len(cases) + block, block), texts):
            assert text == tokenizer.decode(cases[:n], skip_special_tokens=True), (trial, n)


def test_a_stop_string_ends_the_text_where_searching_the_whole_text_finds_it(tokenizer):
    ids = tokenizer.encode("one two three four five six seven", add_special_tokens=False)
    for stop in (["three"], ["e f"], ["six", "two t"], ["ven"], ["not there"]):
        _, seq = _texts_as_committed(tokenizer, ids, stop, 1)
        # The first token after which the whole text contains a stop string is where plain decoding stops.
        ends = [n for n in range(1, len(ids) + 1)
                if any(s in tokenizer.decode(ids[:n], skip_special_tokens=True) for s in stop)]
        expected_tokens = ends[0] if ends else len(ids)
        assert len(seq.output_ids) == expected_tokens, stop
        full = tokenizer.decode(ids[:expected_tokens], skip_special_tokens=True)
        cut = min((i for s in stop if (i := full.find(s)) >= 0), default=len(full))
        assert seq.text == full[:cut], stop
