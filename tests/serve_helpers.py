"""Helpers for tests that talk to a real Serve app over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from cluster.local import LOOPBACK


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@contextmanager
def local_serve(http_port: int, env: dict[str, str] | None = None, **ray_options) -> Iterator[object]:
    """A local Ray (``init_local_ray(**ray_options)``) and Serve with HTTP on 127.0.0.1:``http_port``.

    ``env`` is set while Ray starts: its worker processes inherit the environment fixed then (as a pod's would).
    """
    from ray import serve

    from cluster.local import init_local_ray

    previous = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        ray = init_local_ray(**ray_options)
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    serve.start(http_options={"host": LOOPBACK, "port": http_port})
    try:
        yield serve
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(serve, base: str, name: str, prefix: str, config: dict) -> str:
    """Run the specserve app ``name`` at ``prefix``, wait until it answers, return its base URL."""
    from deployments.app import build_app, wait_until_ready

    serve.run(build_app(config), name=name, route_prefix=prefix, blocking=False)
    wait_until_ready(name)
    return base + (prefix if prefix != "/" else "")


def router_status(base: str) -> dict:
    """The router's ``/v1/router/status`` document."""
    return httpx.get(base + "/v1/router/status", timeout=30).json()


def wait_idle(base: str, timeout_s: float = 30, poll_s: float = 0.2) -> dict:
    """Poll the router until no request runs and no actor holds a sequence; the last status either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = router_status(base)
        held = status["held"]
        if status["running"] == 0 and held["router"] == 0 and not held.get("router_drafter") \
                and not any(held["draft_workers"]) \
                and not any(held["target_groups"]):
            return status
        if time.monotonic() > deadline:
            return status
        time.sleep(poll_s)
