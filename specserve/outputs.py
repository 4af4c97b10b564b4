"""Typed records of what a request produces, shared by the engine, the router and the HTTP layer.

A model replica (the hf router or the vLLM core) yields :class:`StreamChunk` records; the
last one carries ``finish_reason``, ``stats`` and ``usage``. An error ends the stream as a
chunk whose ``error`` is set, so it crosses a Serve handle with its status intact.
"""

from __future__ import annotations

from dataclasses import dataclass

from specserve.errors import ErrorInfo


@dataclass(frozen=True)
class Usage:
    """Token counts of one request, as OpenAI reports them."""

    prompt_tokens: int  # tokens in the prompt (after the chat template)
    completion_tokens: int  # tokens generated

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        """OpenAI's ``usage`` object."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class StreamChunk:
    """What one decode step of one request adds to its output."""

    token_ids: list[int]  # tokens committed by this step (after stop conditions)
    text: str  # text new since the previous chunk (a partial character or stop-string prefix is held back)
    finish_reason: str | None = None  # "stop" or "length" on the last chunk, else None
    stats: dict | None = None  # spec_decode statistics (SpecStats.to_dict()) on the last chunk
    usage: Usage | None = None  # token counts on the last chunk
    error: ErrorInfo | None = None  # set on a chunk that ends the stream with an error

    @property
    def finished(self) -> bool:
        """True on the last chunk of a request (finished or failed)."""
        return self.finish_reason is not None or self.error is not None

    @classmethod
    def failed(cls, error: ErrorInfo) -> StreamChunk:
        """A chunk that ends the stream with ``error``."""
        return cls([], "", error=error)
