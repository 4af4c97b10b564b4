"""Start `specserve serve` (the default app), serve a request, stop it hard; N times; memory before and after.

A hard stop is what a supervisor, a short pod grace period or a benchmark script does: SIGTERM to the
server's process group, 3 s, SIGKILL, then every Ray process of that server SIGKILLed (``ray stop
--force`` for this server's Ray only). Each server carries a tag in its environment, which every
process it starts inherits, so its survivors are found by tag. Prints one line per cycle and a JSON
summary (MemAvailable before the first cycle and after the last, survivors per cycle).

    .venv/bin/python scripts/stop_cycles.py --cycles 10 --out docs/bench/stop-cycles/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from cluster.local import LOOPBACK
from cluster.processes import find_by_env, wait_gone

TAG_KEY = "SPECSERVE_STOP_CYCLE"


def mem_available_mb() -> float:
    """MemAvailable from /proc/meminfo, in MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def one_cycle(port: int, log_dir: Path) -> dict:
    """Start, wait for /health 200, one chat request, hard stop; what survived it."""
    tag = uuid.uuid4().hex[:12]
    log = open(log_dir / f"serve-{tag}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "specserve.cli", "serve", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, TAG_KEY: tag}, start_new_session=True)
    t0 = time.monotonic()
    base = f"http://{LOOPBACK}:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    ready_s = time.monotonic() - t0
    r = httpx.post(base + "/v1/chat/completions", timeout=120, json={
        "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16, "temperature": 0})
    r.raise_for_status()
    engines = [p for p in find_by_env(TAG_KEY, tag) if p.title.startswith("VLLM::")]
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    for p in find_by_env(TAG_KEY, tag):  # `ray stop --force`, for this server's Ray only
        if not p.title.startswith("VLLM::"):
            os.kill(p.pid, signal.SIGKILL)
    survivors = wait_gone(find_by_env(TAG_KEY, tag), 30)
    log.close()
    return {"ready_s": round(ready_s, 1), "engine_processes": len(engines),
            "survivors": [f"{p.pid} {p.title[:40]}" for p in survivors]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--port", type=int, default=8177)
    ap.add_argument("--out", required=True, help="results.json to write (its directory gets the server logs)")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    before = mem_available_mb()
    cycles = []
    for i in range(args.cycles):
        cycle = one_cycle(args.port, out.parent)
        time.sleep(2)
        cycle["mem_available_mb"] = round(mem_available_mb())
        cycles.append(cycle)
        print(f"cycle {i + 1}: ready after {cycle['ready_s']} s, {cycle['engine_processes']} engine processes, "
              f"survivors {cycle['survivors'] or 'none'}, MemAvailable {cycle['mem_available_mb']} MB", flush=True)
    summary = {"cycles": cycles, "mem_available_before_mb": round(before),
               "mem_available_after_mb": cycles[-1]["mem_available_mb"],
               "survivors": sum(len(c["survivors"]) for c in cycles)}
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "cycles"}))
    for log in out.parent.glob("serve-*.log"):  # kept only while a cycle runs: they hold machine paths
        log.unlink()
    return 0 if summary["survivors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
