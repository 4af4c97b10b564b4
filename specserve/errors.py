"""Errors a request or a configuration can end in, each with the HTTP status it is answered with.

Every layer raises these; only the HTTP front end turns them into OpenAI-style JSON bodies
(``deployments.openai_api.error_body``). ``ErrorInfo`` is the plain record that carries an
error across a Ray Serve streaming handle, where exception types are not preserved.
"""

from __future__ import annotations

from dataclasses import dataclass


class SpecServeError(Exception):
    """A user error: bad input or configuration (HTTP 400 unless ``status`` says otherwise).

    ``param`` names the offending parameter so that CLIs and HTTP front ends can report it
    (OpenAI error ``param`` field) without a traceback.
    """

    status: int = 400

    def __init__(self, message: str, param: str | None = None, *, status: int | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status

    def info(self) -> ErrorInfo:
        """This error as a plain record (what crosses actor and Serve boundaries)."""
        return ErrorInfo(self.status, self.message, self.param, self.code)


class Saturated(SpecServeError):
    """The server's queue is full: answered with HTTP 503 so the client retries later."""

    status = 503


class TargetFailed(SpecServeError):
    """A target worker died while verifying this request's block (HTTP 500)."""

    status = 500


@dataclass(frozen=True)
class ErrorInfo:
    """An error as data: what the router yields and the HTTP layer renders."""

    status: int  # HTTP status: 400/404/413/415 user error, 401 auth, 503 overloaded or starting, 500 server fault
    message: str  # one sentence naming the parameter and what is allowed
    param: str | None = None  # the offending request field, OpenAI's ``param``
    code: str | None = None  # OpenAI's machine-readable ``code`` (e.g. "model_not_found")

    @property
    def type(self) -> str:
        """OpenAI's error ``type`` for this status."""
        if 400 <= self.status < 500:
            return "invalid_request_error"
        return "server_overloaded" if self.status == 503 else "server_error"
