"""Running the ``specserve`` command: in this process (fast: no interpreter and import start-up per call)
or as a real subprocess (the installed entry point end to end)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, timeout: int = 300) -> CliResult:
    """``python -m specserve.cli ARGS`` in a subprocess."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "specserve.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    return CliResult(out.returncode, out.stdout, out.stderr)


def one_json_document(stdout: str) -> Any:
    """The document a ``--json`` command printed; fails the calling test unless stdout holds exactly one JSON
    document on one line and nothing else."""
    assert stdout.endswith("\n") and stdout.count("\n") == 1, f"stdout is not one line: {stdout[:3000]!r}"
    return json.loads(stdout)


def run_cli_here(*args: str) -> CliResult:
    """``specserve.cli.main(ARGS)`` in this process, its output captured. An exception escaping ``main``
    (what would print a traceback) fails the calling test."""
    from specserve.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own errors (usage line, exit 2)
            code = e.code if isinstance(e.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())
