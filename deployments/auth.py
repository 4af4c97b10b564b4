"""Optional API keys for the OpenAI-compatible endpoint (``Authorization: Bearer KEY``).

Keys come from the environment variable ``SPECSERVE_API_KEYS`` (comma-separated) and from a
key file (``serve.api_keys_file`` in the config, else the path in ``SPECSERVE_API_KEYS_FILE``;
one key per line or comma-separated, ``#`` comments). The accepted set is the union of both.
No key anywhere: authentication is off, which suits ``make serve`` on 127.0.0.1 only.
A key file that is named but missing or empty is an error at start-up, so a broken Secret
mount never leaves a deployment open.

Keys are loaded once, when the ingress starts, and kept only as SHA-256 digests: every
request's key is hashed and compared with each digest by ``hmac.compare_digest`` (constant
time, and the digests have one length, so not even a key's length leaks). Nothing here logs
or echoes a key. ``protect`` installs the check on a FastAPI app as a dependency of every
route except the open ones (``/health`` for probes); Ray's Prometheus endpoint is a different
server and is never affected.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from deployments.openai_api import error_body
from specserve.errors import SpecServeError

# Serve's logger: its records land in the ingress replica's log (Serve configures no other logger there).
log = logging.getLogger("ray.serve")

#: Comma-separated API keys.
KEYS_ENV = "SPECSERVE_API_KEYS"
#: Path of a key file, used when the config names none (the Helm chart sets it to the mounted Secret).
KEYS_FILE_ENV = "SPECSERVE_API_KEYS_FILE"
#: Routes that answer without a key: liveness/readiness probes.
OPEN_PATHS: tuple[str, ...] = ("/health",)


class InvalidAPIKey(SpecServeError):
    """A missing or wrong key, answered as OpenAI does: 401, ``invalid_request_error``, ``invalid_api_key``."""

    status = 401

    def __init__(self, message: str):
        super().__init__(message, code="invalid_api_key")


def parse_keys(text: str) -> list[str]:
    """Keys from a comma- or newline-separated text; blank entries and ``#`` comment lines are skipped."""
    lines = (line.strip() for line in text.splitlines())
    return [k.strip() for line in lines if not line.startswith("#") for k in line.split(",") if k.strip()]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class APIKeyAuth:
    """The accepted keys (as digests) and the check of a request's ``Authorization`` header."""

    def __init__(self, keys: Iterable[str], on_reject: Callable[[], None] | None = None):
        """``keys``: accepted keys (none: authentication off); ``on_reject``: called on every 401 (metrics)."""
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]
        self._on_reject = on_reject

    @classmethod
    def load(cls, keys_file: str | Path | None = None, environ: Mapping[str, str] | None = None,
             on_reject: Callable[[], None] | None = None) -> APIKeyAuth:
        """Keys from ``$SPECSERVE_API_KEYS`` plus ``keys_file`` (default ``$SPECSERVE_API_KEYS_FILE``).

        Raises SpecServeError (param ``serve.api_keys_file``) when a named file is unreadable or holds no key.
        """
        env = os.environ if environ is None else environ
        keys = parse_keys(env.get(KEYS_ENV, ""))
        path = keys_file or env.get(KEYS_FILE_ENV) or None
        sources = [KEYS_ENV] if keys else []
        if path:
            try:
                from_file = parse_keys(Path(path).read_text())
            except (OSError, UnicodeDecodeError) as e:
                raise SpecServeError(f"serve.api_keys_file: cannot read API key file {path}: "
                                     f"{type(e).__name__}", param="serve.api_keys_file") from None
            if not from_file:
                raise SpecServeError(f"serve.api_keys_file: API key file {path} holds no key",
                                     param="serve.api_keys_file")
            keys += from_file
            sources.append(str(path))
        auth = cls(keys, on_reject)
        if auth.enabled:
            log.info("API keys required: %d key(s) from %s", len(auth._digests), ", ".join(sources))
        else:
            log.warning("API keys are off: anyone who reaches this endpoint can use it. Set %s or %s "
                        "(or serve.api_keys_file) before exposing it beyond 127.0.0.1.", KEYS_ENV, KEYS_FILE_ENV)
        return auth

    @property
    def enabled(self) -> bool:
        """True when requests must carry a key."""
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Accept a valid ``Bearer`` key (or any request when off); raise InvalidAPIKey otherwise."""
        if not self.enabled:
            return
        scheme, _, key = (authorization or "").strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            self._reject("You didn't provide an API key. Pass it in an Authorization header using Bearer auth "
                         "(Authorization: Bearer YOUR_KEY); the openai client sends its api_key that way.")
        presented = _digest(key)
        match = False
        for digest in self._digests:  # no early exit: the time taken does not depend on which key matched
            match |= hmac.compare_digest(presented, digest)
        if not match:
            self._reject("Incorrect API key provided. Ask the operator of this server for a valid key.")

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant a checked request belongs to: a short digest of its key (never the key), None when off.

        Keys are the operator's tenants: requests with the same key share drafter caches, others do not.
        """
        if not self.enabled:
            return None
        _, _, key = (authorization or "").strip().partition(" ")
        return _digest(key.strip()).hex()[:32]

    def _reject(self, message: str) -> None:
        if self._on_reject is not None:
            self._on_reject()
        raise InvalidAPIKey(message)


def protect(app: FastAPI, get_auth: Callable[[], APIKeyAuth], open_paths: tuple[str, ...] = OPEN_PATHS) -> None:
    """Require a key on every route of ``app`` declared after this call, except ``open_paths``.

    ``get_auth`` returns the APIKeyAuth loaded at start-up (it is called per request, so the app can be
    built before the keys are loaded). Missing or wrong keys get a 401 OpenAI-style JSON body.
    """

    async def require_api_key(request: Request) -> None:
        route = request.scope.get("route")
        if getattr(route, "path", None) in open_paths:
            return
        get_auth().check(request.headers.get("authorization"))

    async def unauthorized(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidAPIKey)
        return JSONResponse(error_body(exc.info()), status_code=exc.status, headers={"WWW-Authenticate": "Bearer"})

    app.router.dependencies.append(Depends(require_api_key))
    app.add_exception_handler(InvalidAPIKey, unauthorized)
