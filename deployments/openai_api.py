"""OpenAI-compatible request models, error bodies and response/stream formatting (no Ray here).

Errors are :class:`specserve.errors.SpecServeError` (with their HTTP status) everywhere;
``error_body`` renders one as OpenAI does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from specserve.config import SamplingParams, user_error_from
from specserve.errors import ErrorInfo, SpecServeError
from specserve.outputs import StreamChunk


def error_body(error: ErrorInfo) -> dict:
    """OpenAI's error body: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


class _Common(BaseModel):
    """Fields shared by completions and chat completions. Unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Served model name (see GET /v1/models).")
    max_tokens: int | None = Field(None, description="Most tokens to generate.")
    temperature: float = Field(1.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, description="Nucleus sampling mass in (0, 1].")
    top_k: int = Field(0, description="Top-k filter (extension; 0 = off).")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings.")
    n: int = Field(1, description="Choices per request; only 1 is supported.")
    stream: bool = Field(False, description="Stream server-sent events.")
    stream_options: dict | None = Field(None, description="{'include_usage': bool}.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past EOS.")
    speculative: bool | None = Field(
        None, description="Extension: false decodes this request plainly (no drafting); None: the server's "
        "default (serve.speculative).",
    )
    presence_penalty: float = Field(0.0, description="Not supported beyond 0.")
    frequency_penalty: float = Field(0.0, description="Not supported beyond 0.")
    logprobs: Any = Field(None, description="Not supported.")

    def sampling(self, default_max_tokens: int, default_speculative: bool = True) -> SamplingParams:
        """Validated core sampling parameters; errors name the OpenAI field."""
        if self.n != 1:
            raise SpecServeError(f"n must be 1 (got {self.n}): one choice per request is supported", "n")
        if self.presence_penalty or self.frequency_penalty:
            raise SpecServeError("presence_penalty and frequency_penalty are not supported; pass 0",
                           "presence_penalty" if self.presence_penalty else "frequency_penalty")
        if self.logprobs not in (None, False, 0):
            raise SpecServeError("logprobs are not supported", "logprobs")
        data = {"max_tokens": self.max_tokens if self.max_tokens is not None else default_max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "stop": self.stop, "ignore_eos": self.ignore_eos,
                "speculative": default_speculative if self.speculative is None else self.speculative}
        try:
            return SamplingParams.model_validate(data)
        except ValidationError as e:
            raise user_error_from(e) from None


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] = Field(description="Prompt text (or one-element list, or token ids).")
    echo: bool = Field(False, description="Not supported.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            return v[0]
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, description="Newer name of max_tokens.")

    @field_validator("messages")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("messages must contain at least one message")
        return v

    def sampling(self, default_max_tokens: int, default_speculative: bool = True) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens, default_speculative)


#: An oversized body up to this size is read to its end (and dropped) before the 413 answer.
DRAIN_MAX_BYTES = 256 * 1024 * 1024

#: Content types a request body may declare (a missing Content-Type is read as JSON too).
JSON_CONTENT_TYPES = ("application/json",)


async def read_body(request, max_bytes: int, timeout_s: float) -> bytes:
    """The request's body, refused (SpecServeError) before parsing when it is too large, cut off or not JSON.

    ``request`` is a Starlette request. The declared length is checked first, then the bytes as they
    arrive, so an oversized body is never held whole: 413 naming ``serve.max_body_bytes``. A body that
    stops arriving for ``timeout_s`` before its declared end is answered 400 instead of waited for.
    """
    from starlette.requests import ClientDisconnect

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype not in JSON_CONTENT_TYPES and not ctype.endswith("+json"):
        raise SpecServeError(f"Content-Type must be application/json (got {ctype!r})", "Content-Type", status=415)
    too_large = SpecServeError(f"request body is larger than {max_bytes} bytes (serve.max_body_bytes)", "body",
                               status=413, code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise SpecServeError(f"Content-Length must be a number of bytes (got {declared!r})", "Content-Length")
        if int(declared) > DRAIN_MAX_BYTES:
            raise too_large  # not worth reading: the client may see its connection reset under the answer
    parts, size = [], 0
    stream = _with_timeout(request.stream(), timeout_s)
    try:
        async for part in stream:
            size += len(part)
            if size > max_bytes:
                # Read the rest and drop it, so that the answer is not lost to a connection reset by the bytes
                # the client is still sending (Serve's proxy has asked for them already).
                async for rest in stream:
                    size += len(rest)
                    if size > DRAIN_MAX_BYTES:
                        break
                raise too_large
            parts.append(part)
    except ClientDisconnect:
        raise SpecServeError("request body was cut off before its end", "body") from None
    except TimeoutError:
        raise SpecServeError(f"request body stopped arriving: {size} bytes of {declared or 'an unknown length'} came, "
                             f"then nothing for {timeout_s:g} s (serve.body_timeout_s)", "body") from None
    if declared is not None and size != int(declared):
        raise SpecServeError(f"request body has {size} bytes, Content-Length says {declared}", "body")
    return b"".join(parts)


async def _with_timeout(parts, timeout_s: float):
    """The async iterator's items, raising TimeoutError when one takes longer than ``timeout_s``."""
    it = aiter(parts)
    while True:
        try:
            yield await asyncio.wait_for(anext(it), timeout_s)
        except StopAsyncIteration:
            return


def parse(model_cls: type[_Common], body: bytes) -> _Common:
    """Parse a request body or raise a SpecServeError (400) naming the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecServeError(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SpecServeError("request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise user_error_from(e) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(kind: str, rid: str, model: str, text: str, finish_reason: str | None, usage: dict | None,
                    stats: dict | None, *, chunk: bool, first: bool = False) -> dict:
    """A completion (``kind='text'``) or chat completion (``kind='chat'``) response or stream chunk.

    ``spec_decode`` carries the request's speculative decoding statistics (an extension, like vLLM's).
    """
    created = int(time.time())
    if kind == "chat":
        if chunk:
            delta: dict = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    body: dict = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    if stats is not None:
        body["spec_decode"] = spec_decode_summary(stats)
    return body


def spec_decode_summary(stats: dict) -> dict:
    """The per-request statistics clients see, named as vLLM names them."""
    keys = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "mean_accepted_length", "acceptance_rate",
            "accepted_per_position", "acceptance_by_position", "num_pipelined_drafts", "draft_time_s",
            "verify_time_s")
    return {k: stats[k] for k in keys if k in stats}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def first_chunk(stream) -> StreamChunk:
    """The first chunk of a replica's stream (errors arrive as a chunk too)."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return StreamChunk.failed(ErrorInfo(500, "generation ended without output"))
