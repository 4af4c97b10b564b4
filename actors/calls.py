"""Actor calls a cancelled request cannot cut short.

When an HTTP client goes away, Ray Serve cancels the request with ``ray.cancel(..., recursive=True)``.
Ray then also cancels every actor task the request's method submitted, including calls still queued
in this process and calls its clean-up submits afterwards. For our actors that is never what we want:

- a draft worker executes its tasks in submission order; a call cancelled before it left this process
  leaves a hole in that order, and the worker stops serving every request for 30 s before it gives up
  waiting for it (Ray's reorder timeout) and fails the calls queued behind it;
- the ranks of a tensor-parallel group must all run the same step: cancelling one rank's call while
  the others run it hangs the group in its collective;
- the frees that run after the request ends would be cancelled too, and the sequence would stay
  held on the workers forever.

So every call to our own actors is submitted as the replica's call, not as a child of the request being
served (:func:`submit`). Cancelling a request still stops its coroutine at once; the actor calls it
already made finish, and the request's clean-up (submitted after them, so ordered after them on each
actor) frees what they hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:  # Ray keeps the task an asyncio coroutine runs for in this context variable (Ray's own tests clear it so)
    from ray._raylet import async_task_id as _REQUEST_TASK
except ImportError:  # pragma: no cover - a Ray without it: calls stay children of the request
    _REQUEST_TASK = None


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Inside the block, actor calls are not children of the request task this coroutine runs for."""
    if _REQUEST_TASK is None:
        yield
        return
    token = _REQUEST_TASK.set(None)
    try:
        yield
    finally:
        _REQUEST_TASK.reset(token)


def submit(method: Any, *args: Any, **kwargs: Any) -> Any:
    """``method.remote(*args, **kwargs)`` submitted detached from the request (see the module's docstring)."""
    with detached():
        return method.remote(*args, **kwargs)
