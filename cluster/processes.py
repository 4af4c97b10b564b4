"""Processes on this machine as /proc shows them: find engines and Ray by title, walk a process
tree, read CPU times and cores, end processes by pid.

A benchmark beside a leftover ``VLLM::EngineCore`` (a hard-stopped server leaves one spinning
on core 0) measures the leftover as much as the server, so ``bench-serve`` refuses to start
beside one (issue 22). Linux only: everything here reads ``/proc``.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
#: Clock ticks per second: the unit of utime, stime and starttime in /proc/PID/stat.
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: vLLM's engine processes (titles set by setproctitle) and a `vllm serve` started as a module.
ENGINE_TITLE = re.compile(r"^VLLM::|vllm\.entrypoints")
#: Ray's daemons and workers: worker titles (``ray::ProxyActor``), the dashboard's subprocesses,
#: and the Python daemons and native binaries shipped in the ray package.
RAY_TITLE = re.compile(r"^ray::|^ray-dashboard-|ray\.dashboard\.|/ray/(core/src/ray|dashboard|autoscaler|_private)/")

#: vLLM's engine core (scheduler) and its workers.
ENGINE_CORE_TITLE = re.compile(r"^VLLM::EngineCore")
WORKER_TITLE = re.compile(r"^VLLM::Worker")

#: Process roles by title, first match wins; ``{0}`` is the pattern's first group.
ROLES: list[tuple[re.Pattern, str]] = [
    (ENGINE_CORE_TITLE, "VLLM::EngineCore"),
    (WORKER_TITLE, "VLLM::Worker"),
    (re.compile(r"^VLLM::APIServer|vllm\.entrypoints"), "vllm serve API server"),
    (re.compile(r"^(VLLM::\w+)"), "{0}"),
    (re.compile(r"^ray::ProxyActor"), "Serve proxy"),
    (re.compile(r"^ray::ServeController"), "Serve controller"),
    # Ray appends the running method (``ray::ServeReplica:APP:DEPLOYMENT.method``): a replica is one role.
    (re.compile(r"^ray::ServeReplica:([^\s.]+)"), "Serve replica {0}"),
    (re.compile(r"^ray::(\w+)"), "ray::{0}"),
    (re.compile(r"/raylet/raylet(\s|$)"), "raylet"),
    (re.compile(r"/gcs/gcs_server(\s|$)"), "gcs_server"),
    (re.compile(r"^ray-dashboard-|ray\.dashboard\.|/ray/dashboard/"), "Ray dashboard"),
    (re.compile(r"/ray/_private/log_monitor"), "Ray log monitor"),
    (re.compile(r"/ray/_private/ray_process_reaper"), "Ray process reaper"),
    (re.compile(r"/ray/autoscaler/"), "Ray autoscaler monitor"),
]


@dataclass(frozen=True)
class Proc:
    """One process: ``start_ticks`` (boot-relative start time) tells it apart from a later one
    that reuses its pid."""

    pid: int
    ppid: int
    name: str  # comm: the kernel's 15-character name
    cmdline: str
    start_ticks: int
    state: str  # 'R', 'S', ... 'Z' for a zombie (dead, waiting to be reaped)

    @property
    def title(self) -> str:
        """What ``ps`` shows: the command line (process titles live there), else the name."""
        return self.cmdline or self.name

    def describe(self) -> str:
        """``PID ROLE``: the pid to act on and a name a person recognises (see ``role_of``)."""
        return f"{self.pid} {role_of(self)}"


def _stat_fields(text: str) -> tuple[str, list[str]]:
    """(comm, fields from the state on) of a /proc/.../stat line; comm may hold spaces and parentheses."""
    right = text.rfind(")")
    return text[text.find("(") + 1 : right], text[right + 2 :].split()


# Offsets into _stat_fields' list: proc(5) field N (1-based, counting pid and comm) is at N - 3.
_PPID, _UTIME, _STIME, _START, _PROCESSOR = 1, 11, 12, 19, 36


def read_process(pid: int) -> Proc | None:
    """The process ``pid`` now, or None if there is none."""
    try:
        comm, fields = _stat_fields((PROC / str(pid) / "stat").read_text())
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # setproctitle pads the title with NULs or spaces.
    cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return Proc(pid, int(fields[_PPID]), comm, cmdline, int(fields[_START]), fields[0])


def all_processes() -> dict[int, Proc]:
    """Every live process (zombies left out), by pid."""
    out = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (proc := read_process(int(entry.name))) and proc.state != "Z":
            out[proc.pid] = proc
    return out


def process_tree(root: int, procs: dict[int, Proc] | None = None) -> dict[int, Proc]:
    """``root`` and all its descendants, by pid (empty if ``root`` is gone)."""
    procs = all_processes() if procs is None else procs
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    out, todo = {}, [root] if root in procs else []
    while todo:
        pid = todo.pop()
        out[pid] = procs[pid]
        todo += children.get(pid, [])
    return out


def find_by_env(key: str, value: str, procs: dict[int, Proc] | None = None) -> list[Proc]:
    """Processes whose environment holds ``key=value``: every process a command started inherits a tag set
    in its environment (Ray's daemons and workers, Serve replicas, vLLM's engine processes), so a tag
    finds what one server started even after its tree was broken by a hard stop."""
    procs = all_processes() if procs is None else procs
    needle = f"{key}={value}".encode()
    found = []
    for pid, proc in sorted(procs.items()):
        try:
            if needle in (PROC / str(pid) / "environ").read_bytes().split(b"\0"):
                found.append(proc)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def find_by_title(pattern: re.Pattern, procs: dict[int, Proc] | None = None) -> list[Proc]:
    """Processes whose title matches ``pattern``, by pid."""
    procs = all_processes() if procs is None else procs
    return [p for pid, p in sorted(procs.items()) if pattern.search(p.title)]


def is_engine_or_ray(proc: Proc) -> bool:
    """A vLLM engine, a `vllm serve`, or a Ray daemon or worker."""
    return bool(ENGINE_TITLE.search(proc.title) or RAY_TITLE.search(proc.title)
                or proc.name in ("raylet", "gcs_server"))


def find_leftovers(own_root: int | None = None) -> list[Proc]:
    """Engine and Ray processes on this machine outside ``own_root``'s tree (default: this process's).

    What a run started itself lives in its own tree; anything else would share the cores.
    """
    procs = all_processes()
    own = process_tree(os.getpid() if own_root is None else own_root, procs)
    return [p for pid, p in sorted(procs.items()) if pid not in own and is_engine_or_ray(p)]


def role_of(proc: Proc) -> str:
    """What the process does, from its title (``ROLES``); else the start of its title, the
    executable's directory left out."""
    for pattern, role in ROLES:
        if match := pattern.search(proc.title):
            return role.format(*match.groups())
    executable, _, rest = proc.title.partition(" ")
    return f"{os.path.basename(executable)} {rest}".strip()[:60]


def is_alive(proc: Proc) -> bool:
    """The same process (same pid and start time) still runs and is not a zombie."""
    now = read_process(proc.pid)
    return now is not None and now.start_ticks == proc.start_ticks and now.state != "Z"


def wait_gone(procs: list[Proc], timeout_s: float, poll_s: float = 0.2) -> list[Proc]:
    """Wait until every process has exited (at most ``timeout_s``); the ones still alive."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if is_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(poll_s)
        alive = [p for p in alive if is_alive(p)]
    return alive


def _signal(procs: list[Proc], sig: int) -> None:
    for proc in procs:
        if is_alive(proc):  # never signal a newer process that reused the pid
            try:
                os.kill(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def end_processes(procs: list[Proc], grace_s: float = 10.0) -> list[Proc]:
    """SIGTERM each process by pid, SIGKILL what outlives ``grace_s``; the ones that still run."""
    _signal(procs, signal.SIGTERM)
    alive = wait_gone(procs, grace_s)
    _signal(alive, signal.SIGKILL)
    return wait_gone(alive, 5.0)


# ------------------------------------------------------------------------------------- CPU time


def cpu_ticks(pid: int, tid: int | None = None) -> tuple[int, int] | None:
    """(utime + stime in clock ticks, the core it last ran on) of a process (all its threads, its
    children excluded) or of one of its threads; None if gone."""
    path = PROC / str(pid) / ("stat" if tid is None else f"task/{tid}/stat")
    try:
        _, fields = _stat_fields(path.read_text())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(fields[_UTIME]) + int(fields[_STIME]), int(fields[_PROCESSOR])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all threads, children excluded; None if gone."""
    ticks = cpu_ticks(pid)
    return None if ticks is None else ticks[0] / CLK_TCK


def thread_ids(pid: int) -> list[int]:
    """The process's threads now (empty if it is gone)."""
    try:
        return [int(t.name) for t in (PROC / str(pid) / "task").iterdir()]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def cpus_allowed(pid: int, tid: int | None = None) -> str | None:
    """``Cpus_allowed_list`` of a process or one of its threads (e.g. ``0-1``); None if gone."""
    path = PROC / str(pid) / ("status" if tid is None else f"task/{tid}/status")
    try:
        for line in path.read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq; not steal)."""
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in
                                                         (PROC / "stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / CLK_TCK


# ------------------------------------------------------------------------------------- cores


def set_cpus(pid: int, cpus: set[int]) -> int:
    """Bind every thread of ``pid`` to ``cpus`` (threads it starts later inherit it); the threads bound."""
    bound = 0
    for tid in thread_ids(pid):
        try:
            os.sched_setaffinity(tid, cpus)
            bound += 1
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile, or not ours to move
            continue
    return bound


def pin_engine_cores(owner: int, engine_title: re.Pattern = ENGINE_CORE_TITLE,
                     worker_title: re.Pattern = WORKER_TITLE) -> dict[int, set[int]]:
    """Put each vLLM engine core under ``owner`` on the cores its own workers are bound to.

    vLLM's CPU workers bind to their cores and leave the engine core (scheduler) free to run anywhere, so
    it runs on the core that the path around the engine (API server or Serve replica, proxy, Ray's daemons)
    needs. Scheduling is synchronous on the CPU: the engine core works only while its workers wait for it
    and the other way round (both busy-poll with ``sched_yield``), so one core serves both, and the other
    cores are left to the path. Engines whose workers are not bound (GPUs) are left alone. Returns
    ``{engine core pid: cores}`` for the engine cores moved.
    """
    procs = all_processes()
    moved = {}
    for core in [p for p in process_tree(owner, procs).values() if engine_title.search(p.title)]:
        workers = [p for p in process_tree(core.pid, procs).values() if worker_title.search(p.title)]
        try:
            cpus = set().union(*(os.sched_getaffinity(w.pid) for w in workers))
            now = os.sched_getaffinity(core.pid)
        except (ProcessLookupError, PermissionError):
            continue
        if cpus and cpus < now and set_cpus(core.pid, cpus):
            moved[core.pid] = cpus
    return moved
