"""The Ray Serve application: OpenAI-compatible routes on the model replica that decodes the requests.

``build_app(args)`` is what a RayService ``serveConfigV2`` imports
(``import_path: deployments.app:build_app``); ``args`` is validated as
:class:`deployments.config.AppConfig`. Deployment options (autoscaling, back-pressure)
are computed from that config by ``deployment_options`` and logged.
"""


import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from actors.core import ReplicaCore
from cluster.local import pin_serve_grpc_to_loopback
from deployments.auth import APIKeyAuth, protect
from deployments.config import AppConfig
from deployments.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    completion_body,
    error_body,
    first_chunk,
    new_id,
    parse,
    read_body,
    sse,
)
from deployments.readiness import RETRY_AFTER_S, Readiness
from deployments.routing import READY_KEY, STATS_PERIOD_S, ReadyFirstRouter
from specserve.config import SamplingParams, check_engine_fits
from specserve.errors import ErrorInfo, SpecServeError
from specserve.outputs import StreamChunk

log = logging.getLogger("specserve.app")

#: Bodies from this size on are tokenized in a thread (shorter ones cost less than the thread hop).
LONG_BODY_BYTES = 64 * 1024

#: Serve application name: the RayService's serveConfigV2 and the dashboards' queries use it too.
APP_NAME = "specserve"


api = FastAPI(title="specserve", description="OpenAI-compatible speculative decoding server")
# Every route below needs an API key when keys are configured (except /health); see deployments/auth.py.
protect(api, lambda: serve.get_replica_context().servable_object.auth)


@serve.deployment(name="SpecServer")
@serve.ingress(api)
class SpecServer:
    """One model replica behind its own HTTP routes: OpenAI requests are validated, tokenized and decoded here.

    The core (``RouterCore`` with its draft workers and target groups, or ``VllmCore`` with its vLLM
    engines) lives in this process, so a token crosses no Ray hop between the engine and the HTTP
    response: the only hop left is Serve's proxy, which forwards the response's bytes.

    The core starts in the background: the replica answers at once, ``/health`` says 503 (JSON naming
    what is starting) until the core can serve a request, and requests sent before that get the same
    503 instead of waiting in Serve's proxy for a minute.
    """

    async def __init__(self, config: dict):
        pin_serve_grpc_to_loopback()
        self.config = AppConfig.model_validate(config)
        replica = self.config.replica()
        if replica.model.engine == "vllm":
            from actors.vllm_core import VllmCore as Core
        else:
            from actors.router import RouterCore as Core
        self.core: ReplicaCore = Core(replica)
        self.info = self.core.info
        self.model_name = self.config.serve.model_name
        from actors.metrics import error_counter

        self.errors = error_counter(self.model_name)
        self.auth = APIKeyAuth.load(self.config.serve.api_keys_file,
                                    on_reject=lambda: self.errors.inc(1, tags={"status": "401"}))
        self.readiness = Readiness(self.core.start(), what=f"engine {replica.model.engine}")
        per_key = self.config.serve.cache_per_api_key
        self.cache_per_api_key = self.auth.enabled if per_key is None else per_key and self.auth.enabled

    # ------------------------------------------------------------------ Serve and operators

    async def check_health(self) -> None:
        """Serve's health check: a failed start or a dead engine makes Serve replace the replica."""
        if self.readiness.error is not None:
            raise RuntimeError(f"model replica failed to start: {self.readiness.error}")
        if self.readiness.ready and not self.core.healthy():
            raise RuntimeError("the model replica's engine or a target group is down")

    def record_routing_stats(self) -> dict:
        """What Serve's router knows of this replica: whether it serves yet (deployments.routing)."""
        return {READY_KEY: self.readiness.ready and self.readiness.error is None}

    async def is_ready(self) -> bool:
        """True once this replica serves requests (``wait_until_ready`` asks it); raises if the start failed."""
        if self.readiness.error is not None:
            raise RuntimeError(f"model replica failed to start: {self.readiness.error}")
        return self.readiness.ready

    async def status(self) -> dict:
        return self.core.status()

    async def held_sequences(self) -> dict:
        return await self.core.held_sequences()

    async def placement(self) -> dict:
        return await self.core.placement()

    def __del__(self):
        core = getattr(self, "core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception:
                pass

    # ----------------------------------------------------------------------------- routes

    def _error(self, e: ErrorInfo, headers: dict | None = None) -> JSONResponse:
        self.errors.inc(1, tags={"status": str(e.status)})
        return JSONResponse(error_body(e), status_code=e.status, headers=headers)

    def _not_ready(self) -> JSONResponse | None:
        """503 JSON while the core starts, after it failed to, or once its engine died; None while it serves."""
        info = self.readiness.unavailable()
        if info is None and not self.core.healthy():
            info = ErrorInfo(503, "the model replica's engine failed; Serve replaces the replica: retry shortly",
                             code="engine_failed")
        return None if info is None else self._error(info, headers={"Retry-After": str(RETRY_AFTER_S)})

    @api.get("/health")
    async def health(self):
        """Readiness: 200 once this replica can serve a request, 503 JSON saying what is starting before."""
        return self._not_ready() or {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "specserve", "max_model_len": self.info.max_context}]}

    @api.get("/v1/router/status")
    async def router_status(self):
        """Live request counts and sequences held by every worker (operators' view; tests check leaks)."""
        if (busy := self._not_ready()) is not None:
            return busy
        status = self.core.status()
        status["held"] = await self.core.held_sequences()
        return status

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, "text")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, "chat")

    async def _handle(self, request: Request, kind: str):
        if (busy := self._not_ready()) is not None:
            return busy
        try:
            body = await read_body(request, self.config.serve.max_body_bytes, self.config.serve.body_timeout_s)
            req = parse(ChatCompletionRequest if kind == "chat" else CompletionRequest, body)
            if req.model != self.model_name:
                raise SpecServeError(f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                                     "model", status=404, code="model_not_found")
            params = req.sampling(self.config.serve.default_max_tokens, self.config.serve.speculative)
            if self.cache_per_api_key:  # drafter caches per key: no client's text speeds up another's
                params = params.model_copy(
                    update={"cache_tenant": self.auth.tenant(request.headers.get("authorization"))})
            # The engine's outputs are handled on this event loop too: a long prompt is tokenized off it.
            prompt_ids = (self._prompt_ids(req, kind) if len(body) < LONG_BODY_BYTES
                          else await asyncio.to_thread(self._prompt_ids, req, kind))
            self.info.check_fits(len(prompt_ids), params.max_tokens, "messages" if kind == "chat" else "prompt")
        except SpecServeError as e:
            return self._error(e.info())
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        stream = self._chunks(prompt_ids, params, rid)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            first = await first_chunk(stream)
            if first.error is not None:
                await stream.aclose()
                return self._error(first.error)
            return StreamingResponse(self._sse(kind, rid, first, stream, include_usage),
                                     media_type="text/event-stream")
        parts, final = [], None
        async with contextlib.aclosing(stream):  # client gone or replica shutting down: the core frees it
            async for chunk in stream:
                if chunk.error is not None:
                    return self._error(chunk.error)
                parts.append(chunk.text)
                final = chunk
        return completion_body(kind, rid, self.model_name, "".join(parts), final.finish_reason if final else None,
                               final.usage.to_dict() if final and final.usage else None,
                               final.stats if final else None, chunk=False)

    async def _chunks(self, prompt_ids: list[int], params: SamplingParams, rid: str) -> AsyncIterator[StreamChunk]:
        """The core's chunks; a user or capacity error ends the stream as a chunk carrying its status."""
        gen = self.core.generate(prompt_ids, params, rid)
        try:
            async for chunk in gen:
                yield chunk
        except SpecServeError as e:
            yield StreamChunk.failed(e.info())
        finally:
            await gen.aclose()

    def _prompt_ids(self, req, kind: str) -> list[int]:
        if kind == "chat":
            messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                        for m in req.messages]
            return self.info.encode(messages)
        return self.info.encode(req.prompt)

    async def _sse(self, kind: str, rid: str, first: StreamChunk, stream, include_usage: bool) -> AsyncIterator[str]:
        # aclosing runs when the client disconnects mid-stream too: closing the core's generator frees its sequence.
        async with contextlib.aclosing(stream):
            async for event in self._events(kind, rid, first, stream, include_usage):
                yield event

    async def _events(self, kind: str, rid: str, first: StreamChunk, stream,
                      include_usage: bool) -> AsyncIterator[str]:
        chunk, is_first = first, True
        while True:
            if chunk.error is not None:
                yield sse(error_body(chunk.error))
                break
            if chunk.text or is_first or chunk.finished:
                yield sse(completion_body(kind, rid, self.model_name, chunk.text, chunk.finish_reason, None,
                                          chunk.stats, chunk=True, first=is_first))
                is_first = False
            if chunk.finished:
                if include_usage and chunk.usage is not None:
                    body = completion_body(kind, rid, self.model_name, "", None, chunk.usage.to_dict(), None,
                                           chunk=True)
                    body["choices"] = []
                    yield sse(body)
                break
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                break
        yield sse("[DONE]")


def deployment_options(config: AppConfig) -> dict[str, dict]:
    """Serve options of the deployment, computed from the config."""
    a = config.serve.replica_autoscaling
    return {
        "SpecServer": {
            "autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                   "target_ongoing_requests": a.target_ongoing_requests},
            # Admission control lives in the core (a JSON 503 naming the limit), so Serve must hand it every
            # request instead of queueing or dropping them in front of it: slack above its limits.
            "max_ongoing_requests": config.router.max_running_requests + config.router.max_waiting_requests + 64,
            "ray_actor_options": {"num_cpus": 0.1},
            "health_check_period_s": 10,
            # New replicas (scaled up, or replacing a failed one) get traffic once their engine serves.
            "request_router_config": RequestRouterConfig(request_router_class=ReadyFirstRouter,
                                                         request_routing_stats_period_s=STATS_PERIOD_S),
        },
    }


def build_app(args: dict | None = None) -> Application:
    """Application builder for ``serveConfigV2``: validates ``args`` as AppConfig."""
    config = AppConfig.from_args(args)
    check_engine_fits(config.model, config.drafter)
    opts = deployment_options(config)
    log.info("specserve deployment options: %s", opts)
    return SpecServer.options(**opts["SpecServer"]).bind(config.model_dump(mode="json"))


def wait_until_ready(app_name: str = APP_NAME, timeout_s: float = 600.0) -> None:
    """Block until the Serve application is RUNNING and its model replica serves (or raise saying why).

    The replica is asked from one event loop of this call's own: a handle made outside any loop cannot send
    where Serve runs its routers on the caller's loop (RAY_SERVE_THROUGHPUT_OPTIMIZED)."""
    asyncio.run(_wait_until_ready(app_name, timeout_s))


async def _wait_until_ready(app_name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {app_name} {status.status}: {status.message}")
        if status and status.status == "RUNNING" and await serve.get_app_handle(app_name).is_ready.remote():
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"application {app_name} not ready after {timeout_s} s")
