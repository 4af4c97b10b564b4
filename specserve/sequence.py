"""One request's token state and its stop conditions.

Tokens are committed one at a time, checking max tokens, EOS and stop strings after
each, so a block that crosses a stop condition ends exactly where plain decoding would.

Text is decoded incrementally: each update decodes only the tokens since the last point
where the text was complete (plus that window's start for context), so a step costs
O(new tokens), not O(output), and stop strings are searched only where a new match can end.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

from specserve.config import SamplingParams
from specserve.stats import SpecStats

_ids = itertools.count()


class Sequence:
    """Prompt, generated tokens, finish state and statistics of one request."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: Iterable[int],
        seq_id: str | None = None,
    ):
        self.seq_id = seq_id or f"seq-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.tokenizer = tokenizer
        self.eos_token_ids = set() if params.ignore_eos else set(eos_token_ids)
        self.finished = False
        self.finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
        self.stop_text_end: int | None = None  # text is cut here when a stop string matched
        self.stats = SpecStats()
        self._stable = ""  # text of output_ids[:_read_offset], complete characters only
        self._tail = ""  # text of the tokens after _read_offset (may end in an incomplete character)
        self._prefix_offset = 0  # start of the decode window: context for the tokens after _read_offset
        self._read_offset = 0  # tokens up to here are in _stable
        self._decoded = 0  # tokens up to here are in _stable + _tail
        self._max_stop = max((len(x) for x in params.stop), default=0)

    @property
    def all_ids(self) -> list[int]:
        """Prompt followed by generated tokens."""
        return self.prompt_ids + self.output_ids

    @property
    def last_id(self) -> int:
        """The newest token: the one the next verification step starts from."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def remaining(self) -> int:
        """Tokens still allowed by max_tokens."""
        return self.params.max_tokens - len(self.output_ids)

    def commit(self, tokens: Iterable[int]) -> list[int]:
        """Append verified tokens until a stop condition; return the tokens actually appended."""
        appended: list[int] = []
        for tok in tokens:
            if self.finished:
                break
            self.output_ids.append(tok)
            appended.append(tok)
            if tok in self.eos_token_ids:
                self._finish("stop")
            elif self.params.stop and self._hit_stop_string():
                self._finish("stop")
            elif len(self.output_ids) >= self.params.max_tokens:
                self._finish("length")
        return appended

    def _hit_stop_string(self) -> bool:
        # The last check found no match in the text then; of it, only the stable part is unchanged now.
        unchanged = len(self._stable)
        self._sync_text()
        text = self._stable + self._tail
        start = max(0, unchanged - self._max_stop + 1)
        hits = [i for s in self.params.stop if (i := text.find(s, start)) >= 0]
        if hits:
            self.stop_text_end = min(hits)
            return True
        return False

    def _sync_text(self) -> None:
        """Decode the tokens committed since the last call: one decode of the window since the last
        complete character, diffed against the window's already-known start."""
        ids = self.output_ids
        if self._decoded == len(ids):
            return
        known = self._decode(ids[self._prefix_offset : self._read_offset])
        new = self._decode(ids[self._prefix_offset :])[len(known) :]
        self._decoded = len(ids)
        if new and not new.endswith("\ufffd"):  # complete characters: the window moves on
            self._stable += new
            self._tail = ""
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        else:
            self._tail = new

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason

    @property
    def text(self) -> str:
        """Generated text, special tokens removed, cut before a matched stop string."""
        self._sync_text()
        text = self._stable + self._tail
        return text[: self.stop_text_end] if self.stop_text_end is not None else text

    def abort(self, reason: str = "abort") -> None:
        """End the sequence early (client gone, server error)."""
        self._finish(reason)


def stream_holdback(text: str, stop: list[str], emitted: int) -> int:
    """Characters at the end of ``text`` not to stream yet.

    A possible stop-string prefix (up to the longest stop string minus one) and an incomplete
    UTF-8 character (decoded as U+FFFD) may still change; never hold back what was already sent.
    """
    hold = max([len(s) - 1 for s in stop] + [0])
    while len(text) - hold > emitted and text[len(text) - hold - 1] == "\ufffd":
        hold += 1
    return hold
