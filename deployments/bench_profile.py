"""Where a served token's CPU goes: CPU seconds per 1,000 generated tokens by process role, and
the cores each role ran on, sampled from /proc while ``bench-serve`` loads a server.

On a 2-core machine the path's CPU time per token is the budget under load: vLLM's worker holds
core 0, everything else (proxy, replicas, engine-core loop, Ray's daemons, the client) shares the
other. CPU time is utime + stime of each process (all threads, children excluded). Cores: each
sample charges a thread's CPU ticks since the previous sample to the core it last ran on (the
``processor`` field), so a role's core split is exact for threads that stay put and an estimate
for threads that move within one sampling interval.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict

from cluster.processes import (
    CLK_TCK,
    Proc,
    cpu_ticks,
    cpus_allowed,
    machine_busy_seconds,
    process_tree,
    read_process,
    role_of,
    thread_ids,
)

#: Role of the benchmark's own process (the openai client and this sampler).
CLIENT = "bench client"
#: Role of the Ray driver that hosts our app or Ray Serve LLM (deployments.bench_host).
HOST = "bench host (Ray driver)"
#: Row of CPU time spent on this machine outside the server and the client (other users' work).
OUTSIDE = "outside the server and client"


def role(proc: Proc, client_pid: int) -> str:
    """The process's role, with the benchmark's own processes named."""
    if proc.pid == client_pid:
        return CLIENT
    if "deployments.bench_host" in proc.title:
        return HOST
    return role_of(proc)


class CpuProfile:
    """Samples a server's process tree and the client during one load (use as a context manager).

    ``result(tokens)`` then gives, per role: processes, CPU seconds, CPU seconds per 1,000
    tokens, the share of that CPU on each core, and the ``Cpus_allowed_list`` values seen.
    """

    def __init__(self, server_pid: int, client_pid: int | None = None, interval_s: float = 1.0):
        self.server_pid = server_pid
        self.client_pid = os.getpid() if client_pid is None else client_pid
        self.interval_s = interval_s
        self._first: dict[int, int] = {}  # pid -> process ticks at the start (0 for later processes)
        self._last: dict[int, int] = {}  # pid -> process ticks at the latest sample
        self._threads: dict[tuple[int, int], int] = {}  # (pid, tid) -> thread ticks at the latest sample
        self._cores: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))  # pid -> core -> ticks
        self._procs: dict[int, Proc] = {}
        self._allowed: dict[int, set[str]] = defaultdict(set)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-profile", daemon=True)
        self._machine = 0.0

    def __enter__(self) -> CpuProfile:
        self._machine = machine_busy_seconds()
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(first=False, affinity=True)
        self._machine = machine_busy_seconds() - self._machine

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample(first=False)

    def _tracked(self) -> dict[int, Proc]:
        procs = process_tree(self.server_pid)
        if self.client_pid not in procs and (client := read_process(self.client_pid)):
            procs[self.client_pid] = client
        return procs

    def _sample(self, first: bool, affinity: bool = False) -> None:
        for pid, proc in self._tracked().items():
            ticks = cpu_ticks(pid)
            if ticks is None:
                continue
            self._procs.setdefault(pid, proc)
            # A process first seen after the start did all its work inside the window.
            self._first.setdefault(pid, ticks[0] if first else 0)
            self._last[pid] = ticks[0]
            for tid in thread_ids(pid):
                self._sample_thread(pid, tid, first)
                if affinity and (allowed := cpus_allowed(pid, tid)):
                    self._allowed[pid].add(allowed)

    def _sample_thread(self, pid: int, tid: int, first: bool) -> None:
        ticks = cpu_ticks(pid, tid)
        if ticks is None:
            return
        total, core = ticks
        before = self._threads.get((pid, tid), total if first else 0)
        self._threads[(pid, tid)] = total
        if total > before:
            self._cores[pid][core] += total - before

    def result(self, tokens: int) -> dict[str, dict]:
        """Per role, in order of CPU time: what the docstring of the class lists; plus the machine's
        busy time outside these processes."""
        per_1k = 1000 / tokens if tokens else 0.0
        roles: dict[str, dict] = {}
        for pid, proc in self._procs.items():
            row = roles.setdefault(role(proc, self.client_pid), {"pids": [], "cpu_s": 0.0, "core_ticks": {},
                                                                   "cpus_allowed": set()})
            row["pids"].append(pid)
            row["cpu_s"] += (self._last[pid] - self._first[pid]) / CLK_TCK
            for core, ticks in self._cores[pid].items():
                row["core_ticks"][core] = row["core_ticks"].get(core, 0) + ticks
            row["cpus_allowed"] |= self._allowed[pid]
        out = {name: _finish(row, per_1k) for name, row in sorted(roles.items(), key=lambda kv: -kv[1]["cpu_s"])}
        outside = max(0.0, self._machine - sum(r["cpu_s"] for r in out.values()))
        out[OUTSIDE] = {"pids": [], "cpu_s": outside, "cpu_s_per_1k_tokens": outside * per_1k, "cores": {},
                        "cpus_allowed": []}
        return out


def _finish(row: dict, per_1k: float) -> dict:
    """A role's accumulators as JSON: core shares instead of ticks, sorted lists instead of sets."""
    ticks = sum(row["core_ticks"].values())
    return {"pids": sorted(row["pids"]), "cpu_s": row["cpu_s"], "cpu_s_per_1k_tokens": row["cpu_s"] * per_1k,
            "cores": {str(c): t / ticks for c, t in sorted(row["core_ticks"].items())} if ticks else {},
            "cpus_allowed": sorted(row["cpus_allowed"])}
