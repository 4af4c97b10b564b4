"""``specserve serve``: a local Ray on 127.0.0.1 running the app, until interrupted."""

from __future__ import annotations

import signal
import threading

from cluster.local import LOOPBACK, init_local_ray, serve_throughput_mode
from deployments.app import APP_NAME, build_app, wait_until_ready
from deployments.config import AppConfig
from specserve.config import apply_serve_defaults, load_yaml


def start(config: AppConfig, app_name: str = APP_NAME) -> None:
    """Start Serve's HTTP proxy on the config's host/port and deploy the app (Ray must be running)."""
    from ray import serve

    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    serve.run(build_app(config.model_dump(mode="json")), name=app_name, route_prefix="/", blocking=False)
    wait_until_ready(app_name)


def serve_forever(config_path: str | None, host: str | None = None, port: int | None = None,
                  engine: str | None = None) -> int:
    """Run until SIGINT/SIGTERM. Binds 127.0.0.1:8000 unless the config or flags say otherwise."""
    data = load_yaml(config_path) if config_path else {}
    if engine:
        data.setdefault("model", {})["engine"] = engine
    data = apply_serve_defaults(data)
    if host or port:
        data.setdefault("serve", {})
        data["serve"].update({k: v for k, v in (("host", host), ("port", port)) if v})
    config = AppConfig.from_args(data)
    # Convert the embedded model (first run only) here, once, rather than in every actor at once.
    from specserve.models import resolve_model_path

    resolve_model_path(config.model.model, config.model.cache_dir)
    serve_throughput_mode()
    init_local_ray(include_dashboard=True)
    start(config)
    print(f"specserve: OpenAI API on http://{config.serve.host}:{config.serve.port}/v1 "
          f"(model {config.serve.model_name!r}, drafter {config.drafter.spec()}); Ctrl-C stops", flush=True)
    if config.serve.host != LOOPBACK:
        print("specserve: note: listening beyond loopback", flush=True)
    stop = threading.Event()
    # Both signals set the event: a SIGINT must stop the server even where it was started with SIGINT ignored
    # (a background job of a script), where Python raises no KeyboardInterrupt.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("specserve: stopping (engines, draft workers, Serve, Ray)", flush=True)
    # A second signal while shutting down ends the process at once; engine processes left by a stop
    # this hard end themselves once their replica is gone (actors/vllm_watchdog.py).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    import ray
    from ray import serve

    serve.shutdown()  # replicas shut their cores down: engines stopped, draft workers killed
    ray.shutdown()  # the local Ray this command started
    return 0
