"""Helpers for tests that talk to a real Serve app over HTTP on 127.0.0.1."""

from __future__ import annotations

import socket
import time

import httpx

from cluster.local import LOOPBACK


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


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
        if status["running"] == 0 and held["router"] == 0 and not any(held["draft_workers"]) \
                and not any(held["target_groups"]):
            return status
        if time.monotonic() > deadline:
            return status
        time.sleep(poll_s)
