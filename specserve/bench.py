"""``specserve bench``: speculative decoding against plain decoding of the same model, in one run.

For every prompt the baseline (drafter 'none') and each chosen drafter run back to back
(interleaved, so drift in machine speed hits both alike), optionally followed by peers
(transformers' ``generate`` with and without prompt lookup). Writes ``results.json``
and ``speedup.png``.

Warm prompts, when given, are decoded untimed before the timed prompts, with the benchmark's sampling
settings, by the first drafter that learns across requests (the suffix drafter's global cache); every
other such drafter learns the same outputs without decoding them again. Each is then measured warm, as on
a server that has run a while, from the same cache.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.config import DrafterConfig, SamplingParams
from specserve.engine import SpecEngine
from specserve.plotting import figure

BASELINE = "none"
PEERS = ("hf_generate", "hf_prompt_lookup")


@dataclass
class BenchSpec:
    """What to run."""

    drafters: list[DrafterConfig]
    params: SamplingParams
    chat: bool
    peers: bool = True
    prompt_lookup_num_tokens: int = 10
    warm_prompts: list[dict] = field(default_factory=list)  # decoded untimed first by drafters that learn across requests


def run_bench(engine: SpecEngine, prompts: list[dict], spec: BenchSpec, out_dir: Path) -> dict:
    """Run the benchmark and write ``results.json`` and ``speedup.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline = engine.with_drafter(DrafterConfig(kind="none", num_speculative_tokens=0))
    engines = {BASELINE: baseline} | {method_name(d): engine.with_drafter(d) for d in spec.drafters}
    methods = list(engines) + (list(PEERS) if spec.peers else [])
    encoded, warm = _encode(engine, prompts, spec.chat), _encode(engine, spec.warm_prompts, spec.chat)
    # Drafters that learn across requests start warm: the first of them decodes the warm prompts (untimed) and
    # the others learn the same outputs without decoding them again (equal caches make a fair A/B, e.g. suffix
    # chain against suffix tree, and the warm-up costs one decode, not one per drafter). Every method then
    # builds its kernels on a short decode (a warm prompt where there are any, so that no timed prompt's text
    # reaches a cache early): a method's first pass builds kernels for its shapes (trees' 4D masks, wide
    # passes), which cost seconds once and would land on the first prompt.
    warmed = [name for name, eng in engines.items() if eng.drafter.learns_across_requests] if warm else []
    warm_up = {"prompts": len(warm), "prompt_tokens": sum(map(len, warm)), "methods": {}}
    if warmed:
        decoded = decode_warm_prompts(engines[warmed[0]], warm, spec.params, desc=f"warm-up {warmed[0]}")
        warm_up["methods"][warmed[0]] = {k: v for k, v in decoded.items() if k != "outputs"}
        for name in warmed[1:]:
            for i, (ids, out) in enumerate(zip(warm, decoded["outputs"])):
                learn_output(engines[name].drafter, f"warm-{i}", ids, out, spec.params)
            warm_up["methods"][name] = {"learned_from": warmed[0], "prompts": len(warm)}
    short = spec.params.model_copy(update={"max_tokens": 8})
    kernel_prompt = warm[0] if warm else encoded[0]
    for name in methods:
        if name == (warmed[0] if warmed else None):
            continue
        if name in engines:
            engines[name].generate(kernel_prompt, short)
        else:
            _run_peer(engine, kernel_prompt, replace(spec, params=short), name)

    rows = []
    bar = tqdm(total=len(prompts) * len(methods), desc="bench", unit="run")
    for rec, ids in zip(prompts, encoded):
        row: dict = {"id": rec["id"], "set": rec.get("set", ""), "prompt_tokens": len(ids), "runs": {}}
        for name in methods:
            if name in engines:
                drafter = engines[name].drafter
                is_tree = hasattr(drafter, "num_nodes")  # a TreeDrafter counts the nodes it proposes
                nodes_before = drafter.num_nodes if is_tree else 0
                r = engines[name].generate(ids, spec.params)
                s = r.stats
                run = {"tokens": len(r.token_ids), "seconds": r.elapsed_s, "token_ids": r.token_ids,
                       "mean_accepted_length": s.mean_accepted_length,
                       "acceptance_by_position": s.acceptance_by_position(),
                       # Draft tokens verified: tree nodes for trees, block tokens for chains.
                       "nodes_verified": drafter.num_nodes - nodes_before if is_tree else s.num_draft_tokens,
                       "stats": s.to_dict()}
            else:
                run = _run_peer(engine, ids, spec, name)
            run["tokens_per_s"] = run["tokens"] / run["seconds"] if run["seconds"] else 0.0
            row["runs"][name] = run
            bar.set_postfix_str(f"{name} {run['tokens_per_s']:.1f} tok/s")
            bar.update()
        base = row["runs"][BASELINE]
        for run in row["runs"].values():
            run["speedup"] = run["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0.0
            run["matches_baseline"] = run["token_ids"] == base["token_ids"]
        rows.append(row)
    bar.close()

    results = {
        "config": {
            "model": Path(engine.target.path).name,  # the name, not this machine's cache path
            "dtype": str(engine.target.dtype).removeprefix("torch."),
            "params": spec.params.model_dump(),
            "chat": spec.chat,
            "drafters": [d.model_dump() for d in spec.drafters],
            "threads": torch.get_num_threads(),
        },
        "warm_up": warm_up,
        "methods": methods,
        "overall": summarize(rows, methods),
        "by_set": {s: summarize([r for r in rows if r["set"] == s], methods)
                   for s in sorted({r["set"] for r in rows})},
        "prompts": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / "speedup.png")
    plot_acceptance(results, out_dir / "acceptance.png")
    return results


def _encode(engine: SpecEngine, prompts: list[dict], chat: bool) -> list[list[int]]:
    """Prompt records as token ids, each checked to fit the context."""
    encoded = []
    for rec in prompts:
        ids = engine.info.encode(rec["prompt"], chat=chat)
        engine.info.check_fits(len(ids))
        encoded.append(ids)
    return encoded


def decode_warm_prompts(engine: SpecEngine, warm: list[list[int]], params: SamplingParams,
                        desc: str | None = None) -> dict:
    """Decode the encoded prompts ``warm`` on ``engine`` one after another, untimed by the benchmark, so that
    its drafter's cross-request state (the suffix drafter's global cache) holds their outputs.

    Returns what was decoded: prompts, output tokens, the seconds it took and the outputs (token ids).
    """
    t0, outputs = time.perf_counter(), []
    for ids in tqdm(warm, desc=desc, unit="prompt", leave=False, disable=desc is None):
        outputs.append(engine.generate(ids, params).token_ids)
    return {"prompts": len(warm), "tokens": sum(map(len, outputs)), "seconds": time.perf_counter() - t0,
            "outputs": outputs}


def learn_output(drafter, seq_id: str, prompt_ids: list[int], output_ids: list[int], params: SamplingParams) -> None:
    """Let ``drafter`` see a finished request (its prompt, then its output) as if it had drafted for it."""
    drafter.start(seq_id, prompt_ids, params)
    drafter.commit(seq_id, list(prompt_ids) + list(output_ids))
    drafter.finish(seq_id)


def warm_up_line(results: dict) -> str:
    """One line saying what the drafters decoded before the timed prompts ('' when nothing)."""
    warm = results.get("warm_up") or {}
    if not warm.get("prompts"):
        return ""
    decoded = [f"{name} {w['tokens']:,}" for name, w in warm["methods"].items() if "tokens" in w]
    learned = [f"{name} (from {w['learned_from']})" for name, w in warm["methods"].items() if "learned_from" in w]
    line = (f"Warm-up, untimed, before the timed prompts: {warm['prompts']} prompts ({warm['prompt_tokens']:,} prompt "
            f"tokens) decoded by the first drafter that learns across requests; output tokens: "
            f"{', '.join(decoded) or 'none'}.")
    if learned:
        line += f" Learned the same outputs without decoding them: {', '.join(learned)}."
    return line + (" The others (plain decoding, n-gram, the peers) keep nothing across requests and were not "
                   "warmed.")


def _run_peer(engine: SpecEngine, ids: list[int], spec: BenchSpec, name: str) -> dict:
    """transformers' own generate, plain or with prompt lookup (assisted generation), greedy."""
    model = engine.target.model
    kwargs: dict = {"max_new_tokens": spec.params.max_tokens, "do_sample": False,
                    "pad_token_id": engine.target.tokenizer.eos_token_id}
    if name == "hf_prompt_lookup":
        kwargs["prompt_lookup_num_tokens"] = spec.prompt_lookup_num_tokens
    if spec.params.temperature > 0:
        kwargs.update(do_sample=True, temperature=spec.params.temperature, top_p=spec.params.top_p)
    input_ids = torch.tensor([ids], device=engine.target.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    seconds = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    return {"tokens": len(new), "seconds": seconds, "token_ids": new}


def summarize(rows: list[dict], methods: list[str]) -> dict:
    """Per method: aggregate tokens/s (total tokens over total time), speedup over the baseline,
    median per-prompt speedup, mean accepted length, exact-match share."""
    out = {}
    if not rows:
        return out
    base_tps = _tps(rows, BASELINE)
    for m in methods:
        tps = _tps(rows, m)
        runs = [r["runs"][m] for r in rows]
        out[m] = {
            "tokens_per_s": tps,
            "speedup": tps / base_tps if base_tps else 0.0,
            "median_speedup": statistics.median(r["speedup"] for r in runs),
            "min_speedup": min(r["speedup"] for r in runs),
            "mean_accepted_length": statistics.fmean(r.get("mean_accepted_length", 1.0) for r in runs),
            "matches_baseline": sum(r["matches_baseline"] for r in runs) / len(runs),
            "prompts": len(runs),
        }
        if all("stats" in r for r in runs):
            out[m].update(_pooled(runs))
    return out


def _pooled(runs: list[dict]) -> dict:
    """Speculation figures pooled over runs (sums of counters, not means of per-prompt ratios)."""
    stats = [r["stats"] for r in runs]
    drafts = sum(st["num_drafts"] for st in stats)
    steps = sum(st["num_steps"] for st in stats)
    accepted, drafted = [], []
    for st in stats:
        for i, (a, d) in enumerate(zip(st["accepted_per_position"], st["drafted_per_position"])):
            if i == len(accepted):
                accepted.append(0)
                drafted.append(0)
            accepted[i] += a
            drafted[i] += d
    return {
        "pooled_accepted_length": 1 + sum(st["num_accepted_tokens"] for st in stats) / drafts if drafts else 1.0,
        # Tokens committed per target pass, passes without a draft included: what a drafter gains per pass
        # across the whole output. The accepted length above counts only drafted blocks, so a drafter that
        # drafts only where it is sure scores high on it while drafting for few of the passes.
        "tokens_per_pass": sum(r["tokens"] for r in runs) / steps if steps else 1.0,
        "acceptance_by_depth": [a / d if d else 0.0 for a, d in zip(accepted, drafted)],
        "verify_ms_per_pass": 1000 * sum(st["verify_time_s"] for st in stats) / steps if steps else 0.0,
        "nodes_per_draft": sum(r["nodes_verified"] for r in runs) / drafts if drafts else 0.0,
    }


def method_name(d: DrafterConfig) -> str:
    """How results name a drafter: its spec, plus the tree budget when it drafts trees, and ``+linear``
    when adaptive k keeps the linear cost prior instead of measured pass times."""
    name = f"{d.spec()}+tree{d.tree.max_nodes}" if d.tree.max_nodes else d.spec()
    return name + "+linear" if d.adaptive_k and not d.measured_pass_cost and d.kind != "none" else name


def _tps(rows: list[dict], method: str) -> float:
    tokens = sum(r["runs"][method]["tokens"] for r in rows)
    seconds = sum(r["runs"][method]["seconds"] for r in rows)
    return tokens / seconds if seconds else 0.0


def plot(results: dict, path: Path) -> None:
    """Speedup over plain decoding per prompt set and method, with per-prompt points."""
    methods = [m for m in results["methods"] if m != BASELINE]
    sets = list(results["by_set"])
    with figure(path, figsize=(max(6, 2.2 * len(sets) * max(1, len(methods)) / 2), 4.5)) as (_, ax):
        width = 0.8 / max(1, len(methods))
        for j, m in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(sets))]
            ys = [results["by_set"][s][m]["speedup"] for s in sets]
            ax.bar(xs, ys, width, label=m)
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.2f}x", (x, y), ha="center", va="bottom", fontsize=8)
            for i, s in enumerate(sets):
                pts = [r["runs"][m]["speedup"] for r in results["prompts"] if r["set"] == s]
                ax.scatter([xs[i]] * len(pts), pts, s=6, color="black", alpha=0.4, zorder=3)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_ylabel("speedup over plain decoding (tokens/s ratio)")
        cfg = results["config"]
        ax.set_title(f"{Path(cfg['model']).name} {cfg['dtype']}, max_tokens={cfg['params']['max_tokens']}, "
                     f"T={cfg['params']['temperature']}")
        ax.legend(fontsize=8)


def markdown_table(results: dict) -> str:
    """The overall and per-set summary as a markdown table (for docs/benchmarks.md), and below it what the
    drafters decoded before the timed prompts, if anything."""
    lines = ["| prompts | method | tokens/s | speedup vs plain | median per-prompt speedup | min | tokens / pass "
             "| mean accepted length | output = plain |", "|---|---|---|---|---|---|---|---|---|"]
    for set_name, summary in {**results["by_set"], "all": results["overall"]}.items():
        for method, m in summary.items():
            per_pass = f"{m['tokens_per_pass']:.2f}" if "tokens_per_pass" in m else "-"  # peers: not counted
            lines.append(f"| {set_name} ({m['prompts']}) | {method} | {m['tokens_per_s']:.1f} | {m['speedup']:.2f}x "
                         f"| {m['median_speedup']:.2f}x | {m['min_speedup']:.2f}x | {per_pass} "
                         f"| {m['mean_accepted_length']:.2f} | {m['matches_baseline']:.0%} |")
    return "\n".join(lines + ([f"\n{line}"] if (line := warm_up_line(results)) else []))


def plot_acceptance(results: dict, path: Path) -> None:
    """Acceptance by depth (share of drafts whose token at depth d was accepted) per drafting method,
    and the mean verification time per target pass, per prompt set."""
    summaries = {**results["by_set"], "all": results["overall"]}
    methods = [m for m in results["methods"] if m != BASELINE and "acceptance_by_depth" in results["overall"].get(m, {})]
    if not methods:
        return
    with figure(path, figsize=(4.2 * len(summaries), 3.8), ncols=len(summaries), sharey=True,
                squeeze=False) as (_, axes):
        for ax, (set_name, summary) in zip(axes[0], summaries.items()):
            for m in methods:
                by_depth = summary[m]["acceptance_by_depth"]
                ax.plot(range(1, len(by_depth) + 1), by_depth, marker="o", markersize=3,
                        label=f"{m}: {summary[m]['tokens_per_pass']:.2f} tok/pass, "
                        f"{summary[m]['verify_ms_per_pass']:.0f} ms/pass")
            ax.set_title(f"{set_name} ({summary[methods[0]]['prompts']} prompts)")
            ax.set_xlabel("draft depth")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("acceptance rate at depth")


def tree_table(results: dict) -> str:
    """Chain against tree per prompt set as a markdown table (methods that verify drafts only)."""
    lines = ["| prompts | method | tokens / pass | mean accepted length | pooled | draft tokens / pass "
             "| verify ms / pass | tokens/s | output = plain |", "|---|---|---|---|---|---|---|---|---|"]
    for set_name, summary in {**results["by_set"], "all": results["overall"]}.items():
        for method, m in summary.items():
            if method == BASELINE or "pooled_accepted_length" not in m:
                continue
            lines.append(f"| {set_name} ({m['prompts']}) | {method} | {m['tokens_per_pass']:.2f} "
                         f"| {m['mean_accepted_length']:.2f} "
                         f"| {m['pooled_accepted_length']:.2f} | {m['nodes_per_draft']:.1f} "
                         f"| {m['verify_ms_per_pass']:.1f} | {m['tokens_per_s']:.1f} | {m['matches_baseline']:.0%} |")
    return "\n".join(lines)
