"""Where the command line's output goes: results on stdout, every log on stderr (or a log file).

vLLM, Ray, torch and their child processes (vLLM's engine core and worker, Ray's daemons) write to the
process's file descriptors 1 and 2, not to Python's ``sys.stdout``: the guarantees here are made on the
descriptors, which child processes inherit, as well as on the Python streams.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from specserve.errors import SpecServeError

#: Log level by the number of ``-v`` flags: none, ``-v``, ``-vv`` (and more).
LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_level(verbosity: int) -> int:
    """The log level of ``verbosity`` ``-v`` flags: WARNING, INFO, then DEBUG."""
    return LEVELS[min(max(verbosity, 0), len(LEVELS) - 1)]


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted, so it follows
    :func:`stderr_to` and a test's capture instead of keeping the stream it was created with."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)  # not StreamHandler's: it would bind one stream for good

    @property
    def stream(self) -> TextIO:
        """The current ``sys.stderr``."""
        return sys.stderr


def configure_logging(verbosity: int = 0) -> int:
    """Send vLLM's, Ray's and our logs to stderr at WARNING (``-v``: INFO, ``-vv``: DEBUG); return the level.

    Call before vllm and ray are imported: both read these variables once, and the processes they start
    (vLLM's engine core and worker, Ray's workers) inherit them. vLLM logs to stdout unless told otherwise.
    """
    level = log_level(verbosity)
    name = logging.getLevelName(level)
    os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"
    os.environ["VLLM_LOGGING_LEVEL"] = name
    # The default of ray.init(logging_level=...), read when ray is imported.
    os.environ["RAY_LOGGER_LEVEL"] = name.lower()
    root = logging.getLogger()
    # Replace only our own handler: main() may run more than once in a process (tests), and other
    # handlers on the root logger (pytest's capture) are not ours to remove.
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    return level


@contextmanager
def stderr_to(log_file: str | None) -> Iterator[None]:
    """While the block runs, send descriptor 2 and ``sys.stderr`` to ``log_file`` (appended to); without a
    file, change nothing. Whatever the block's children write to their stderr lands in the file too."""
    if log_file is None:
        yield
        return
    try:
        f = open(log_file, "a", encoding="utf-8", buffering=1)
    except OSError as e:
        raise SpecServeError(f"cannot write {log_file}: {e.strerror}", param="log_file") from None
    try:
        with _redirected(2, f.fileno(), "stderr", f):
            yield
    finally:
        f.close()


@contextmanager
def json_stdout() -> Iterator[Callable[[Any], None]]:
    """Reserve stdout for exactly one JSON document.

    While the block runs, descriptor 1 and ``sys.stdout`` point at stderr, so nothing else can reach stdout:
    not vLLM's log, a library's ``print``, a C library or a child process started in the block. The block
    passes its result to the yielded function; the document is printed on the restored stdout when the
    block ends without an error.
    """
    documents: list[Any] = []
    with _redirected(1, 2, "stdout", sys.stderr):
        yield documents.append
    if len(documents) != 1:
        raise RuntimeError(f"a --json command gave {len(documents)} documents; it must give one")
    sys.stdout.write(json.dumps(documents[0]) + "\n")
    sys.stdout.flush()


@contextmanager
def _redirected(fd: int, target_fd: int, name: str, target: TextIO) -> Iterator[None]:
    """Point descriptor ``fd`` at ``target_fd``'s file while the block runs, then back.

    ``sys.<name>`` follows its descriptor by itself; when it writes elsewhere (a test's in-memory capture)
    it is pointed at ``target`` for the block.
    """
    stream = getattr(sys, name)
    _flush()  # what the Python streams hold so far belongs where the descriptors pointed until now
    saved = os.dup(fd)
    os.dup2(target_fd, fd)
    swap = not _writes_to(stream, fd)
    if swap:
        setattr(sys, name, target)
    try:
        yield
    finally:
        _flush()
        if swap:
            setattr(sys, name, stream)
        os.dup2(saved, fd)
        os.close(saved)


def _writes_to(stream: TextIO, fd: int) -> bool:
    """True when ``stream`` writes to descriptor ``fd``."""
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # in-memory streams have no descriptor
        return False


def _flush() -> None:
    """Flush the Python streams that may buffer text for descriptors 1 and 2."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None and not getattr(stream, "closed", False):
            stream.flush()
