"""``bench-serve``'s reports from results.json: table.md (throughput and latency percentiles per
server and concurrency, with ratios to the `vllm serve` peers), profile.md (CPU per 1,000 tokens
by process role) and serving.png (tok/s by concurrency)."""

from __future__ import annotations

from pathlib import Path

from deployments.bench_profile import OUTSIDE
from specserve.plotting import figure


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _warnings(results: dict) -> list[str]:
    return [f"> warning: {w}" for w in results.get("warnings", [])] + ([""] if results.get("warnings") else [])


def _streams(concurrency: int) -> str:
    return f"{concurrency} stream{'s' if concurrency > 1 else ''}"


def _concurrencies(results: dict) -> list[int]:
    return sorted({r["concurrency"] for rows in results["served"].values() for r in rows})


def markdown_table(results: dict) -> str:
    """One table per concurrency, one row per server: tok/s, ratios to the reference peers
    (``results['references']``), TTFT and TPOT p50/p99 in ms, failed requests."""
    refs = results.get("references", [])
    lines = _warnings(results) + _warm_up(results)
    for conc in _concurrencies(results):
        at = {name: next((r for r in rows if r["concurrency"] == conc), None)
              for name, rows in results["served"].items()}
        lines += [f"### {_streams(conc)}", "",
                  "| server | tok/s | " + "".join(f"x {ref} | " for ref in refs)
                  + "TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | failed |",
                  "|---|" + "---|" * (6 + len(refs))]
        for name, row in at.items():
            if row is None:
                continue
            ratios = "".join(f"{_ratio(row, at.get(ref))} | " for ref in refs)
            lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {ratios}{_num(row['ttft_p50_ms'], '.0f')} | "
                         f"{_num(row['ttft_p99_ms'], '.0f')} | {_num(row['tpot_p50_ms'])} | "
                         f"{_num(row['tpot_p99_ms'])} | {row['failed']} |")
        lines.append("")
    return "\n".join(lines)


def _warm_up(results: dict) -> list[str]:
    """What every server answered, untimed, before its timed waves (nothing without ``--warm-prompts``)."""
    warm = results.get("warm_up")
    if not warm:
        return []
    cfg = results["config"]
    lines = [f"Warm-up, untimed, once each server was ready and before its timed waves: {cfg['warm_prompts']} "
             f"prompts ({', '.join(cfg['warm_prompt_sources'])}) through the same API, {cfg['warm_streams']} "
             f"streams, max_tokens {cfg['max_tokens']} (one figure per round):", "",
             "| server | warm-up requests | failed | output tokens | seconds |", "|---|---|---|---|---|"]
    for name, rounds in warm.items():
        cells = " | ".join(" / ".join(format(r[key], fmt) for r in rounds)
                           for key, fmt in (("requests", "d"), ("failed", "d"), ("tokens", "d"), ("seconds", ".0f")))
        lines.append(f"| {name} | {cells} |")
    return lines + [""]


def _ratio(row: dict, ref: dict | None) -> str:
    return f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref and ref["tokens_per_s"] else "-"


def _cores(shares: dict[str, float]) -> str:
    return " ".join(f"c{core} {share:.0%}" for core, share in shares.items())


def profile_table(results: dict) -> str:
    """Per server: CPU seconds per 1,000 generated tokens by role at each concurrency (with the
    cores that role ran on), the total over the server and client, and the CPUs each role may use."""
    lines = _warnings(results) + [
        "CPU seconds (utime + stime, all threads, children excluded) per 1,000 generated tokens, by process role; "
        "in parentheses the share of that role's CPU time on each core (sampled every second). The bench client "
        "is the openai client and the sampler; the last row is the machine's busy time outside the server and "
        "client.", ""]
    for name, rows in results["served"].items():
        rows = [r for r in rows if r.get("cpu")]
        if not rows:
            continue
        # Roles that used no measurable CPU at any concurrency (idle daemons) would only lengthen the table.
        roles = list(dict.fromkeys(role for r in rows for role, v in r["cpu"].items()
                                   if role != OUTSIDE and v["cpu_s"] > 0))
        lines += [f"### {name}", "",
                  "| role | " + "".join(f"{_streams(r['concurrency'])} | " for r in rows) + "Cpus_allowed_list |",
                  "|---|" + "---|" * (len(rows) + 1)]
        for role in roles:
            cells = "".join(_profile_cell(r["cpu"].get(role)) for r in rows)
            allowed = sorted({a for r in rows for a in r["cpu"].get(role, {}).get("cpus_allowed", [])})
            lines.append(f"| {role} | {cells}{', '.join(allowed)} |")
        totals = "".join(f"**{sum(v['cpu_s_per_1k_tokens'] for k, v in r['cpu'].items() if k != OUTSIDE):.2f}** | "
                         for r in rows)
        lines.append(f"| **server + client** | {totals} |")
        outside = "".join(f"{r['cpu'].get(OUTSIDE, {}).get('cpu_s_per_1k_tokens', 0):.2f} | " for r in rows)
        lines += [f"| {OUTSIDE} (machine) | {outside} |", ""]
    return "\n".join(lines)


def _profile_cell(row: dict | None) -> str:
    if not row:
        return "- | "
    cores = f" ({_cores(row['cores'])})" if row["cores"] else ""
    return f"{row['cpu_s_per_1k_tokens']:.2f}{cores} | "


def plot(results: dict, path: Path) -> None:
    """serving.png: tok/s (all streams) by concurrency, one line per server."""
    with figure(path, figsize=(8, 5)) as (_, ax):
        for name, rows in results["served"].items():
            ax.plot([r["concurrency"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("served tokens/s (all streams)")
        model = results["config"]["model"]
        ax.set_title(f"{model['model']} {model['dtype']}, OpenAI client, closed loop")
        ax.legend(fontsize=7)
