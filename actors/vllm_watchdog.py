"""specserve's vLLM plugin that ends an engine's processes when the replica that owns them is gone.

vLLM's engine core and its workers are child processes of the process that built the engine
(our model replica). When that replica is stopped hard (SIGKILL, ``ray stop --force``, a pod
killed after a short grace period), nothing tells them: they are re-parented to init and keep
their memory (~3.7 GB for the default model) and spin on the core the next engine binds to.

``VllmCore`` puts its own pid in ``SPECSERVE_ENGINE_OWNER_PID`` before it builds an engine; vLLM
loads general plugins in every process it starts, and in each of them (not in the owner itself)
:func:`register` starts a daemon thread that checks twice a second that the owner is alive and
that the process's own parent has not changed. Once the owner is gone, the process terminates itself
(SIGTERM, then SIGKILL after a grace period). A worker's own watchdog sees the same owner, so
the whole tree goes. Processes started without the variable (``vllm serve``) are left alone.
"""

from __future__ import annotations

import os
import signal
import threading
import time

#: Environment variable holding the pid of the process that owns an engine.
OWNER_ENV = "SPECSERVE_ENGINE_OWNER_PID"
#: Seconds between checks of the owner.
POLL_S = 0.5
#: Seconds between the SIGTERM a watchdog sends its own process and the SIGKILL that follows.
GRACE_S = 3.0


def owner_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, killed but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _watch(owner: int, parent: int) -> None:
    while owner_alive(owner) and os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # vLLM shuts down on SIGTERM where it still can
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def register() -> None:
    """Entry point (``vllm.general_plugins``): watch the owner named in the environment, if any."""
    owner = os.environ.get(OWNER_ENV, "")
    if not owner.isdigit() or int(owner) == os.getpid():
        return
    if getattr(register, "started", False):  # vLLM may load plugins more than once per process
        return
    register.started = True  # type: ignore[attr-defined]
    threading.Thread(target=_watch, args=(int(owner), os.getppid()), name="specserve-owner-watchdog",
                     daemon=True).start()
