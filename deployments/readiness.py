"""Readiness of a model replica whose core starts in the background.

A replica answers HTTP at once, while its engine and draft workers start (a minute for a
vLLM engine on a CPU). Until the start finishes, readiness is a 503 that says what is
starting; a failed start stays a 503 naming the failure, and Serve's health check replaces
the replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

from specserve.errors import ErrorInfo

log = logging.getLogger("specserve.readiness")

#: Seconds a client is told to wait (``Retry-After``) before asking a starting replica again.
RETRY_AFTER_S = 5


class Readiness:
    """Runs a start coroutine as a task and answers whether the replica serves yet."""

    def __init__(self, start: Awaitable[None], what: str):
        self.what = what
        self.t_start = time.monotonic()
        self.ready = False
        self.error: str | None = None
        self.task = asyncio.ensure_future(self._run(start))

    async def _run(self, start: Awaitable[None]) -> None:
        try:
            await start
        except Exception as e:  # the replica stays up to say why; its health check fails
            self.error = f"{type(e).__name__}: {e}"
            log.exception("model replica failed to start")
            return
        self.ready = True
        log.info("model replica ready after %.1f s", time.monotonic() - self.t_start)

    def unavailable(self) -> ErrorInfo | None:
        """The 503 to answer while not serving (None once ready)."""
        if self.ready:
            return None
        if self.error is not None:
            return ErrorInfo(503, f"model replica failed to start ({self.error}); Serve replaces it",
                             code="model_start_failed")
        waited = time.monotonic() - self.t_start
        return ErrorInfo(503, f"model replica is starting ({self.what}, {waited:.0f} s so far); retry in "
                         f"{RETRY_AFTER_S} s", code="model_starting")
