"""Measuring one server for ``bench-serve``: start it, warm it up, run the closed loop at every
concurrency with its CPU profiled, read our proposer's counters, stop it.

A server that does not come up is a warning and no rows; leftovers of other runs are checked
before every start (``deployments.bench_servers``).
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from cluster.local import LOOPBACK
from deployments.bench_load import (
    requests_per_run,
    run_closed_loop,
    send_warm_prompts,
    summarize,
    unseen_slices,
)
from deployments.bench_profile import CpuProfile
from deployments.bench_servers import Server, check_leftovers, start_hosted, start_vllm_serve
from deployments.bench_targets import Target


def start_server(target: Target, args, model_dir: str, dtype: str, log_dir: Path) -> Server:
    """Start the target's server process on ``args.port`` (not yet ready)."""
    if target.kind == "vllm":
        return start_vllm_serve(target.label, args.port, model_dir, dtype, target.peer_spec, log_dir)
    if target.kind == "ray-llm":
        config = {"model_dir": model_dir, "dtype": dtype, "speculative_config": target.peer_spec}
        return start_hosted(target.label, "ray-llm", args.port, config, log_dir)
    return start_hosted(target.label, "app", args.port, target.app_args, log_dir)


def warm_up(port: int, prompts: list[str], args) -> None:
    """Decode whole responses, alone and in a batch as large as the largest measured.

    A compiling engine (vLLM's torch.compile on the CPU) compiles for the draft and batch shapes
    it meets on first use, which must not land inside a measurement.
    """
    top = max(args.concurrency)
    run_closed_loop(port, prompts, args.max_tokens, 1, 1)
    run_closed_loop(port, prompts, 32, top, top)


def measure(label: str, server: Server, prompts: list[str], args) -> list[dict]:
    """Warm up, then a closed loop of ``--waves`` full waves at every concurrency, each profiled.

    With ``--unseen-prompts`` the warm-up and every concurrency take prompts of their own
    (:func:`deployments.bench_load.unseen_slices`): no request repeats an earlier one.
    """
    if getattr(args, "unseen_prompts", False):
        warm, slices = unseen_slices(len(prompts), args.concurrency, args.waves)
        per_run = [[prompts[i] for i in s] for s in slices]
        warm_up(args.port, [prompts[i] for i in warm], args)
    else:
        per_run = [prompts] * len(args.concurrency)
        warm_up(args.port, prompts, args)
    rows = []
    for conc, run_prompts in zip(args.concurrency, per_run):
        server.track()
        with CpuProfile(server.pid) as profile:
            records, wall = run_closed_loop(args.port, run_prompts, args.max_tokens, conc,
                                            requests_per_run(conc, args.waves, len(run_prompts)),
                                            desc=f"{label} c={conc}")
        row = summarize(records, wall, conc)
        row["cpu"] = profile.result(row["tokens"])
        rows.append(row)
        tqdm.write(_summary_line(label, row))
    return rows


def _summary_line(label: str, row: dict) -> str:
    return (f"{label:<36} c={row['concurrency']:<3} {row['tokens_per_s']:7.1f} tok/s  TTFT p50/p99 "
            f"{row['ttft_p50_ms'] or 0:.0f}/{row['ttft_p99_ms'] or 0:.0f} ms  TPOT p50/p99 "
            f"{row['tpot_p50_ms'] or 0:.1f}/{row['tpot_p99_ms'] or 0:.1f} ms"
            + (f"  {row['failed']} failed" if row["failed"] else ""))


def proposer_stats(port: int) -> dict | None:
    """Our app's proposer counters: the ``proposer`` key of GET /v1/router/status, if it has one."""
    import httpx

    try:
        status = httpx.get(f"http://{LOOPBACK}:{port}/v1/router/status", timeout=30).json()
    except (httpx.HTTPError, ValueError):
        return None
    return status.get("proposer") if isinstance(status, dict) else None


def measure_server(target: Target, prompts: list[str], args, model_dir: str, dtype: str, out: Path,
                   warm_prompts: list[str] | None = None
                   ) -> tuple[list[dict] | None, dict | None, dict | None, list[str]]:
    """Check for leftovers, start the server, send it the warm prompts, measure it, stop it and check
    nothing is left: (rows, proposer statistics or None, warm-up or None, warnings). A server that does
    not come up is a warning and no rows: one peer failing to start must not cost a long run the others."""
    warnings = check_leftovers(args.kill_leftovers, args.allow_leftovers)
    server = start_server(target, args, model_dir, dtype, out)
    rows = stats = warm = None
    try:
        if _wait_ready(server, warnings):
            if warm_prompts:
                warm = send_warm_prompts(args.port, warm_prompts, args.max_tokens, desc=f"{target.label} warm-up")
                if warm["failed"]:
                    warnings.append(f"{target.label}: {warm['failed']} of {warm['requests']} warm-up requests "
                                    f"failed: {warm['errors'][0]}")
            rows = measure(target.label, server, prompts, args)
            stats = proposer_stats(args.port) if target.kind == "app" else None
    finally:
        warnings += server.stop()
    for w in warnings:
        tqdm.write(f"warning: {w}")
    return rows, stats, warm, warnings


def _wait_ready(server: Server, warnings: list[str]) -> bool:
    """Wait for the server; False (and a warning) if it exited or timed out instead."""
    try:
        server.wait_ready()
    except (RuntimeError, TimeoutError) as e:
        warnings.append(f"{server.label}: not measured: {e}")
        return False
    return True
