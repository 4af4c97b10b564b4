"""The in-process speculative decoding engine: one target, one drafter, the generate loop.

One step of the loop (the same steps the Ray router takes across actors)::

    k      = strategy.next_k()                          # adaptive or fixed block length
    block  = drafter.propose(seq, tokens, k)             # k' <= k draft tokens (+ q if sampled)
    result = verifier.step(newest token + block)         # one target pass, accept/reject, KV rollback
    seq.commit(result.verdict.tokens)                   # accepted + recovered/bonus, stop conditions
    drafter.commit(seq, tokens, hidden)                 # drafter rolls back to the committed prefix
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from specserve.config import DrafterConfig, EngineConfig, SamplingParams
from specserve.drafters import Drafter, make_drafter
from specserve.errors import SpecServeError
from specserve.models import LoadedModel, load_model
from specserve.sequence import Sequence
from specserve.stats import SpecStats
from specserve.strategy import make_strategy
from specserve.target import StepRequest, Verifier


@dataclass
class GenerationResult:
    """Output of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: SpecStats
    num_prompt_tokens: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per wall-clock second, prefill included."""
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict: the ``specserve generate --json`` output."""
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "num_prompt_tokens": self.num_prompt_tokens,
            "stats": self.stats.to_dict(),
            "elapsed_s": self.elapsed_s,
            "tokens_per_s": self.tokens_per_s,
        }


def encode_prompt(target: LoadedModel, prompt: str | list[dict], chat: bool) -> list[int]:
    """Token ids of a prompt (raw text, or chat messages / text through the chat template)."""
    if isinstance(prompt, str) and not prompt.strip():
        raise SpecServeError("prompt is empty: pass some text to continue", param="prompt")
    tok = target.tokenizer
    if chat or isinstance(prompt, list):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if not messages:
            raise SpecServeError("messages is empty: pass at least one message", param="messages")
        if tok.chat_template is None:
            raise SpecServeError(f"model {target.path!r} has no chat template; drop --chat", param="chat")
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
    return tok.encode(prompt)


def check_lengths(prompt_len: int, params: SamplingParams, max_context: int) -> None:
    """Refuse a prompt that leaves no room to generate within the model's context."""
    if prompt_len == 0:
        raise SpecServeError("prompt is empty after tokenization", param="prompt")
    if prompt_len >= max_context:
        raise SpecServeError(
            f"prompt has {prompt_len} tokens; the model's context is {max_context}: shorten the prompt",
            param="prompt",
        )


class SpecEngine:
    """Speculative decoding of one request at a time, in this process."""

    def __init__(self, target: LoadedModel, drafter: Drafter, drafter_cfg: DrafterConfig):
        self.target = target
        self.drafter = drafter
        self.drafter_cfg = drafter_cfg
        self.verifier = Verifier(target, hidden_layers=drafter.target_layers)

    @classmethod
    def from_config(cls, cfg: EngineConfig, target: LoadedModel | None = None) -> SpecEngine:
        """Load the target (unless given) and build the drafter ``cfg`` names."""
        target = target or load_model(cfg.model)
        return cls(target, make_drafter(cfg.drafter, target), cfg.drafter)

    def with_drafter(self, drafter_cfg: DrafterConfig) -> SpecEngine:
        """Another engine over the same loaded target with a different drafter (for benchmarks)."""
        return SpecEngine(self.target, make_drafter(drafter_cfg, self.target), drafter_cfg)

    def generate(
        self,
        prompt: str | list[dict] | list[int],
        params: SamplingParams | None = None,
        *,
        chat: bool = False,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        """Generate a completion; ``on_tokens`` receives each step's committed tokens (streaming)."""
        params = params or SamplingParams()
        t_start = time.perf_counter()
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            prompt_ids = list(prompt)  # already token ids
        else:
            prompt_ids = encode_prompt(self.target, prompt, chat)
        check_lengths(len(prompt_ids), params, self.target.max_context)
        seq = Sequence(prompt_ids, params, self.target.tokenizer, self.target.eos_token_ids)
        try:
            self._run(seq, on_tokens)
        finally:
            self.verifier.free(seq.seq_id)
            self.drafter.finish(seq.seq_id)
        return GenerationResult(
            text=seq.text,
            token_ids=seq.output_ids,
            finish_reason=seq.finish_reason or "stop",
            stats=seq.stats,
            num_prompt_tokens=len(prompt_ids),
            elapsed_s=time.perf_counter() - t_start,
        )

    def _run(self, seq: Sequence, on_tokens: Callable[[list[int]], None] | None) -> None:
        stats = seq.stats
        strategy = make_strategy(self.drafter_cfg, self.drafter.draft_cost_per_token)
        max_context = self.target.max_context
        t0 = time.perf_counter()
        hidden = self.verifier.add(seq.seq_id, seq.prompt_ids, seq.params)
        stats.prefill_time_s += time.perf_counter() - t0
        self.drafter.start(seq.seq_id, seq.prompt_ids, seq.params, hidden)
        while not seq.finished:
            # Never draft past max_tokens or the context: those tokens could only be thrown away.
            room = min(seq.remaining - 1, max_context - len(seq.prompt_ids) - len(seq.output_ids) - 1)
            if room < 0:
                seq.abort("length")
                break
            k = min(strategy.next_k(), room)
            t0 = time.perf_counter()
            block = self.drafter.propose(seq.seq_id, seq.all_ids, k) if k > 0 else None
            t1 = time.perf_counter()
            draft_tokens = block.token_ids[:k] if block else []
            draft_probs = block.probs[: len(draft_tokens)] if block and block.probs is not None else None
            result = self.verifier.step(StepRequest(seq.seq_id, seq.last_id, draft_tokens, draft_probs))
            stats.draft_time_s += t1 - t0
            stats.verify_time_s += result.verify_time_s
            stats.record(len(draft_tokens), result.verdict.num_accepted)
            strategy.update(len(draft_tokens), result.verdict.num_accepted)
            appended = seq.commit(result.verdict.tokens)
            if not seq.finished:
                self.drafter.commit(seq.seq_id, seq.all_ids, result.hidden)
            if on_tokens and appended:
                on_tokens(appended)
