"""Training text for online distillation: ShareGPT train-split conversations as fixed-length chunks.

Every conversation goes through the target's chat template with all of its turns. Each token
carries whether it belongs to an assistant turn (its content and end marker): blocks are anchored
only where the next token is an assistant token, which is what the drafter proposes at serving
time. A conversation is cut into chunks of ``seq_len`` tokens (at most ``max_chunks`` of them);
chunks with too few assistant tokens are skipped. The stream is deterministic and position-
addressable (``start`` = conversations to skip), so a resumed run continues where it stopped, and
rank r of a data-parallel group of w takes every w-th chunk.

No response is regenerated: the target's own distribution at every position is the label (see
``specserve.training.distill``), computed in the training step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

#: Fewest assistant tokens that make a chunk worth a target pass.
MIN_ASSISTANT_TOKENS = 16
#: Rendered characters per token are well below this: rendering stops once the text surely holds max_tokens.
CHARS_PER_TOKEN_MAX = 16


@dataclass
class Chunk:
    """One training sequence: token ids and which positions belong to assistant turns."""

    conversation: int  # position of its conversation in the stream (resume point)
    ids: list[int]
    assistant: list[bool]


def templated_turns(tokenizer, turns: list[dict], max_tokens: int) -> tuple[list[int], list[bool]]:
    """Ids of ``turns`` through the chat template and an assistant mask, cut at ``max_tokens``.

    Each turn's span is the difference between the rendered prefixes with and without it, so the
    template's own markers (and any default system prompt) are kept exactly. The text is rendered,
    then tokenized once with character offsets (what ``apply_chat_template(tokenize=True)`` does):
    linear in the conversation's length.
    """
    text, bounds = "", []  # bounds: (end char, is assistant) per turn
    for i, turn in enumerate(turns):
        prefix = tokenizer.apply_chat_template(turns[: i + 1], tokenize=False)
        if not prefix.startswith(text):  # a template that rewrites earlier turns: keep what is consistent
            break
        text = prefix
        bounds.append((len(text), turn["role"] == "assistant"))
        if len(text) > max_tokens * CHARS_PER_TOKEN_MAX:
            break
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_tokens], enc["offset_mapping"][:max_tokens]
    mask, turn = [], 0
    for start, _ in offsets:
        while turn < len(bounds) - 1 and start >= bounds[turn][0]:
            turn += 1
        mask.append(bounds[turn][1] if bounds else False)
    return list(ids), mask


def chunk_stream(tokenizer, conversations: Iterable[tuple[int, list[dict]]], seq_len: int, *,
                 max_chunks: int = 4, start: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[Chunk]:
    """Chunks of the conversations after the first ``start``; rank ``rank`` of ``world_size`` keeps every
    ``world_size``-th chunk."""
    n = 0
    for pos, (_, turns) in enumerate(conversations):
        if pos < start:
            continue
        ids, mask = templated_turns(tokenizer, turns, seq_len * max_chunks)
        for s in range(0, len(ids), seq_len):
            piece, piece_mask = ids[s:s + seq_len], mask[s:s + seq_len]
            # Anchors need an assistant token after them; position 0 has no context to draft from.
            if sum(piece_mask[1:]) < MIN_ASSISTANT_TOKENS:
                continue
            if n % world_size == rank:
                yield Chunk(pos, piece, piece_mask)
            n += 1


def token_frequencies(tokenizer, conversations: Iterable[tuple[int, list[dict]]], num_conversations: int,
                      max_tokens: int = 4096) -> Counter:
    """Counts of every token id in the first ``num_conversations`` templated conversations (all turns)."""
    counts: Counter = Counter()
    for i, (_, turns) in enumerate(conversations):
        if i == num_conversations:
            break
        counts.update(templated_turns(tokenizer, turns, max_tokens)[0])
    return counts


def draft_vocabulary(counts: Counter, size: int, vocab_size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent ids (``always`` first, e.g. EOS), sorted, as int64 [size].

    Ids never seen fill the rest in id order, so any size up to ``vocab_size`` works.
    """
    chosen = list(dict.fromkeys(always))
    for tok, _ in counts.most_common():
        if len(chosen) == size:
            break
        if tok not in chosen:
            chosen.append(tok)
    seen = set(chosen)
    fill = (t for t in range(vocab_size) if t not in seen)
    while len(chosen) < size:
        chosen.append(next(fill))
    return torch.tensor(sorted(chosen[:size]), dtype=torch.long)


def coverage(counts: Counter, vocab: torch.Tensor) -> float:
    """Fraction of counted tokens that fall inside ``vocab``."""
    total = sum(counts.values())
    inside = sum(counts[t] for t in vocab.tolist())
    return inside / total if total else 0.0
