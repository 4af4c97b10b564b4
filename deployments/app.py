"""The Ray Serve application: an OpenAI-compatible ingress in front of the speculative router.

``build_app(args)`` is what a RayService ``serveConfigV2`` imports
(``import_path: deployments.app:build_app``); ``args`` is validated as
:class:`deployments.config.AppConfig`. Deployment options (autoscaling, back-pressure)
are computed from that config by ``deployment_options`` and logged.
"""


import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application

from actors.config import ReplicaConfig
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
    sse,
)
from specserve.config import SamplingParams, check_engine_fits
from specserve.errors import ErrorInfo, SpecServeError
from specserve.models import ModelInfo
from specserve.outputs import StreamChunk

log = logging.getLogger("specserve.app")

#: Serve application name: the RayService's serveConfigV2 and the dashboards' queries use it too.
APP_NAME = "specserve"


@serve.deployment(name="SpecRouter")
class SpecRouter:
    """One model replica: a core with its own draft workers and target groups."""

    async def __init__(self, config: dict):
        pin_serve_grpc_to_loopback()
        replica = ReplicaConfig.model_validate(config)
        if replica.model.engine == "vllm":
            from actors.vllm_core import VllmCore as Core
        else:
            from actors.router import RouterCore as Core
        self.core = Core(replica)
        await self.core.start()

    async def generate(self, prompt_ids: list[int], params: dict, request_id: str) -> AsyncIterator[StreamChunk]:
        """Stream the request's chunks; an error ends the stream as a chunk (types do not cross the handle)."""
        try:
            async for chunk in self.core.generate(prompt_ids, SamplingParams.model_validate(params), request_id):
                yield chunk
        except SpecServeError as e:
            yield StreamChunk.failed(e.info())

    async def status(self) -> dict:
        return self.core.status()

    async def held_sequences(self) -> dict:
        return await self.core.held_sequences()

    async def placement(self) -> dict:
        return await self.core.placement()

    async def check_health(self) -> None:
        if not self.core.healthy():
            raise RuntimeError("a target group has no ranks")

    def __del__(self):
        core = getattr(self, "core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception:
                pass


api = FastAPI(title="specserve", description="OpenAI-compatible speculative decoding server")
# Every route below needs an API key when keys are configured (except /health); see deployments/auth.py.
protect(api, lambda: serve.get_replica_context().servable_object.auth)


@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    """HTTP front: validates OpenAI requests, tokenizes, streams the replica's chunks back."""

    def __init__(self, router, config: dict):
        pin_serve_grpc_to_loopback()
        self.config = AppConfig.model_validate(config)
        self.info = ModelInfo.load(self.config.model, self.config.serve.max_model_len)
        self.router = router
        self.model_name = self.config.serve.model_name
        from actors.metrics import error_counter

        self.errors = error_counter(self.model_name)
        self.auth = APIKeyAuth.load(self.config.serve.api_keys_file,
                                    on_reject=lambda: self.errors.inc(1, tags={"status": "401"}))

    def _error(self, e: ErrorInfo) -> JSONResponse:
        self.errors.inc(1, tags={"status": str(e.status)})
        return JSONResponse(error_body(e), status_code=e.status)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "specserve", "max_model_len": self.info.max_context}]}

    @api.get("/v1/router/status")
    async def router_status(self) -> dict:
        """Live request counts and sequences held by every worker (operators' view; tests check leaks)."""
        status = await self.router.status.remote()
        status["held"] = await self.router.held_sequences.remote()
        return status

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, "text")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, "chat")

    async def _handle(self, request: Request, kind: str):
        try:
            body = await request.body()
            req = parse(ChatCompletionRequest if kind == "chat" else CompletionRequest, body)
            if req.model != self.model_name:
                raise SpecServeError(f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                                     "model", status=404, code="model_not_found")
            params = req.sampling(self.config.serve.default_max_tokens, self.config.serve.speculative)
            prompt_ids = self._prompt_ids(req, kind)
            self.info.check_fits(len(prompt_ids), params.max_tokens, "messages" if kind == "chat" else "prompt")
        except SpecServeError as e:
            return self._error(e.info())
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        stream = self.router.options(stream=True).generate.remote(prompt_ids, params.model_dump(mode="json"), rid)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            first = await first_chunk(stream)
            if first.error is not None:
                return self._error(first.error)
            return StreamingResponse(self._sse(kind, rid, first, stream, include_usage),
                                     media_type="text/event-stream")
        text, final = "", None
        try:
            async for chunk in stream:
                if chunk.error is not None:
                    return self._error(chunk.error)
                text += chunk.text
                final = chunk
        except BaseException:
            stream.cancel()  # client gone or replica shutting down: the router frees the sequence
            raise
        return completion_body(kind, rid, self.model_name, text, final.finish_reason if final else None,
                               final.usage.to_dict() if final and final.usage else None,
                               final.stats if final else None, chunk=False)

    def _prompt_ids(self, req, kind: str) -> list[int]:
        if kind == "chat":
            messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                        for m in req.messages]
            return self.info.encode(messages)
        return self.info.encode(req.prompt)

    async def _sse(self, kind: str, rid: str, first: StreamChunk, stream, include_usage: bool) -> AsyncIterator[str]:
        try:
            async for event in self._events(kind, rid, first, stream, include_usage):
                yield event
        finally:
            # Runs when the client disconnects mid-stream too: cancelling frees the router's sequence.
            stream.cancel()

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
                async for _ in stream:  # let the router's generator finish and free the sequence itself
                    pass
                break
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                break
        yield sse("[DONE]")


def deployment_options(config: AppConfig) -> dict[str, dict]:
    """Serve options of each deployment, computed from the config."""
    s = config.serve
    return {
        "OpenAIIngress": {
            "autoscaling_config": {"min_replicas": s.autoscaling.min_replicas,
                                   "max_replicas": s.autoscaling.max_replicas,
                                   "target_ongoing_requests": s.autoscaling.target_ongoing_requests},
            "max_ongoing_requests": s.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": 0.1},
        },
        "SpecRouter": {
            "autoscaling_config": {"min_replicas": s.replica_autoscaling.min_replicas,
                                   "max_replicas": s.replica_autoscaling.max_replicas,
                                   "target_ongoing_requests": s.replica_autoscaling.target_ongoing_requests},
            # Admission control lives in the router (a JSON 503 naming the limit), so Serve must hand it
            # every request instead of queueing or dropping them in front of it: slack above its limits.
            "max_ongoing_requests": config.router.max_running_requests + config.router.max_waiting_requests + 64,
            "ray_actor_options": {"num_cpus": 0.1},
            "health_check_period_s": 10,
        },
    }


def build_app(args: dict | None = None) -> Application:
    """Application builder for ``serveConfigV2``: validates ``args`` as AppConfig."""
    config = AppConfig.from_args(args)
    check_engine_fits(config.model, config.drafter)
    opts = deployment_options(config)
    log.info("specserve deployment options: %s", opts)
    router = SpecRouter.options(**opts["SpecRouter"]).bind(config.replica().model_dump(mode="json"))
    return OpenAIIngress.options(**opts["OpenAIIngress"]).bind(router, config.model_dump(mode="json"))


def wait_until_ready(app_name: str = APP_NAME, timeout_s: float = 300.0) -> None:
    """Block until the Serve application is RUNNING (or raise with its status message)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status and status.status == "RUNNING":
            return
        if status and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {app_name} {status.status}: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"application {app_name} not ready after {timeout_s} s")
