"""Servers under test for ``bench-serve``, each a process tree started and cleaned up in turn.

Three kinds: our app and Ray Serve LLM, each hosted in a Ray of its own
(``deployments.bench_host``), and ``vllm serve``. Before a server starts, no engine or Ray
process may run outside this benchmark (a leftover engine spinning on a core skews every
number, issue 22); after it stops, every process it had must be gone within a bounded wait,
or it is ended by pid and the results say so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cluster.local import LOOPBACK
from cluster.processes import Proc, end_processes, find_leftovers, process_tree, wait_gone
from deployments.bench_load import SERVED_NAME
from specserve.errors import SpecServeError

#: KV cache of every engine under test, GiB (our app's default kv_cache_gb is the same).
KV_CACHE_GB = "2"


def check_leftovers(kill: bool, allow: bool) -> list[str]:
    """Refuse to measure beside engine or Ray processes this run did not start.

    ``kill`` ends them by pid instead; ``allow`` measures anyway. Returns the warnings to keep
    with the results.
    """
    leftovers = find_leftovers()
    if not leftovers:
        return []
    listed = "; ".join(p.describe() for p in leftovers)
    if kill:
        survivors = end_processes(leftovers)
        if survivors:
            raise SpecServeError("could not end leftover processes: " + "; ".join(p.describe() for p in survivors),
                                 param="--kill-leftovers")
        return [f"ended {len(leftovers)} leftover processes before measuring: {listed}"]
    if allow:
        return [f"measured beside {len(leftovers)} engine/Ray processes of another run: {listed}"]
    raise SpecServeError(f"{len(leftovers)} engine/Ray processes of another run share this machine and would "
                         f"skew the measurement: {listed}. End them, or pass --kill-leftovers to end them by pid")


class Server:
    """A server under test: its process, log, readiness check and every process it started."""

    def __init__(self, label: str, cmd: list[str], log_path: Path, ready: Callable[[], bool],
                 ready_file: Path | None = None):
        self.label = label
        self.ready_file = ready_file
        self.log = open(log_path, "a")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GB)}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self._ready = ready
        self.seen: dict[int, Proc] = {}

    @property
    def pid(self) -> int:
        """Root of the server's process tree."""
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 900.0) -> None:
        """Block until the server answers (raise if it exits or does not come up in time)."""
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            self.track()  # engines start before the server is ready: a failed start must not orphan them
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label}: server exited with {self.proc.returncode}; see {self.log.name}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.label}: not ready after {timeout_s:.0f} s; see {self.log.name}")
            time.sleep(1)
        self.track()

    def track(self) -> None:
        """Remember every process now in the server's tree: once it stops, orphans have no parent
        to find them by."""
        for pid, proc in process_tree(self.pid).items():
            self.seen.setdefault(pid, proc)

    def stop(self, timeout_s: float = 60.0) -> list[str]:
        """SIGTERM the server, wait (bounded) until all its processes are gone, end survivors by pid.

        Returns warnings for the results: a clean stop returns none.
        """
        self.track()
        deadline = time.monotonic() + timeout_s
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        survivors = wait_gone([p for p in self.seen.values() if p.pid != self.pid],
                              max(0.0, deadline - time.monotonic()))
        if self.proc.poll() is None:
            survivors.insert(0, self.seen[self.pid])
        warnings = []
        if survivors:
            left = end_processes(survivors, grace_s=5.0)
            warnings.append(f"{self.label}: {len(survivors)} processes outlived the stop by {timeout_s:.0f} s and "
                            f"were ended by pid: " + "; ".join(p.describe() for p in survivors))
            if left:
                warnings.append(f"{self.label}: still running: " + "; ".join(p.describe() for p in left))
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        self.log.close()
        if self.ready_file:
            self.ready_file.unlink(missing_ok=True)
        return warnings


def _log_path(log_dir: Path, label: str) -> Path:
    return log_dir / (re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() + ".log")


def start_vllm_serve(label: str, port: int, model_dir: str, dtype: str, spec: dict | None, log_dir: Path) -> Server:
    """``vllm serve`` on the model, on 127.0.0.1 (``spec``: its speculative config, None = plain)."""
    import httpx

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", SERVED_NAME, "--host", LOOPBACK, "--port", str(port), "--dtype", dtype,
           "--disable-log-stats"]
    if spec:
        cmd += ["--speculative-config", json.dumps(spec)]

    def ready() -> bool:
        try:
            return httpx.get(f"http://{LOOPBACK}:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return Server(label, cmd, _log_path(log_dir, label), ready)


def start_hosted(label: str, kind: str, port: int, config: dict, log_dir: Path) -> Server:
    """Our app (``kind`` app, ``config``: build_app args) or Ray Serve LLM (``kind`` ray-llm) in a
    Ray of its own (``deployments.bench_host``)."""
    log_path = _log_path(log_dir, label)
    ready_file = log_path.with_suffix(".ready")
    ready_file.unlink(missing_ok=True)  # a previous round's
    cmd = [sys.executable, "-m", "deployments.bench_host", kind, str(port), json.dumps(config), str(ready_file)]
    return Server(label, cmd, log_path, ready_file.exists, ready_file)
