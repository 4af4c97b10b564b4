"""One Serve application under test in a local Ray of its own, for ``bench-serve``:
``python -m deployments.bench_host KIND PORT CONFIG_JSON READY_FILE``.

KIND ``app`` deploys our app (``CONFIG_JSON``: ``build_app`` args); KIND ``ray-llm`` deploys Ray
Serve LLM's OpenAI app (``CONFIG_JSON``: the model directory, dtype and optional speculative
config). Each runs in its own process and Ray so that two apps never share a Ray, and so that
everything the server started is one process tree the benchmark can profile and clean up.
Writes READY_FILE once the application is RUNNING; SIGTERM shuts Serve and Ray down.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from cluster.local import LOOPBACK, init_local_ray, serve_throughput_mode
from deployments.bench_load import SERVED_NAME

#: Serve application name of whatever this host deploys.
APP = "bench"


def with_loopback_hook(runtime_env: dict | None) -> dict:
    """Ray's ``RAY_RUNTIME_ENV_HOOK``: the job's runtime env, with every worker pinning Serve's
    inter-deployment gRPC server to loopback (Serve binds it to every interface; our own replicas
    pin it themselves, Ray Serve LLM's do not). Only a job-level setup hook runs in the workers."""
    return {**(runtime_env or {}), "worker_process_setup_hook": "cluster.local.pin_serve_grpc_to_loopback"}


def ray_serve_llm_app(config: dict):
    """Ray Serve LLM's OpenAI app on the model: one replica, one CPU bundle for its engine."""
    from ray.serve.llm import LLMConfig, build_openai_app

    engine = {"dtype": config["dtype"], "max_model_len": 4096}
    if config.get("speculative_config"):
        engine["speculative_config"] = config["speculative_config"]
    llm = LLMConfig(model_loading_config={"model_id": SERVED_NAME, "model_source": config["model_dir"]},
                    engine_kwargs=engine, placement_group_config={"bundles": [{"CPU": 1}]})
    return build_openai_app({"llm_configs": [llm]})


def host(kind: str, port: int, config: dict, ready_file: Path) -> None:
    """Deploy, signal readiness, serve until SIGTERM; then (or on a failure) shut Serve and Ray down."""
    os.environ["RAY_RUNTIME_ENV_HOOK"] = "deployments.bench_host.with_loopback_hook"  # read by ray.init
    # Ray Serve LLM replaces the job's setup hook in its engine replica with a no-op of its own, unless told not to.
    os.environ["RAYLLM_ENABLE_WORKER_PROCESS_SETUP_HOOK"] = "0"
    # Logical CPUs oversubscribed: Ray Serve LLM's ingress is never scheduled with 2 (ENV.md).
    if kind == "app":  # as `specserve serve` runs it; Ray Serve LLM as its users run it (Serve's defaults)
        serve_throughput_mode()
    ray = init_local_ray(num_cpus=8)
    from ray import serve

    from deployments.app import build_app, wait_until_ready

    try:
        serve.start(http_options={"host": LOOPBACK, "port": port})
        # serve.run returns once the application is RUNNING: Ray Serve LLM's replica is up once its
        # engine is; our app's replica starts its engine in the background, so wait for it to serve.
        serve.run(build_app(config) if kind == "app" else ray_serve_llm_app(config), name=APP, route_prefix="/",
                  blocking=False)
        if kind == "app":
            wait_until_ready(APP, timeout_s=900)
        # Ray's driver installs its own SIGTERM handler, which (with Ray Serve LLM loaded) ends the process
        # at once: Serve and Ray are not shut down and their agents linger. Ours, set last, shuts them down.
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        ready_file.write_text("ready\n")
        stop.wait()
    finally:
        # Serve's shutdown stops the replicas, which stop their engines: a Ray torn down under them
        # leaves vLLM's engine processes running. The times land in the server's log.
        t0 = time.monotonic()
        serve.shutdown()
        print(f"bench_host: serve.shutdown {time.monotonic() - t0:.1f} s", flush=True)
        ray.shutdown()
        print(f"bench_host: ray.shutdown {time.monotonic() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    kind, port, config, ready = sys.argv[1:5]
    if kind not in ("app", "ray-llm"):
        sys.exit(f"bench_host: KIND must be app or ray-llm, not {kind!r}")
    host(kind, int(port), json.loads(config), Path(ready))
