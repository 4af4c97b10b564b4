"""Grafana dashboards and Prometheus rules for specserve, generated from code.

Every query names metrics declared in :mod:`specserve.metrics` or a Ray series
on the explicit allow-list :data:`RAY_SERIES`, so ``check`` fails as soon as a
panel or rule drifts from what the server exports. The Helm chart embeds the
generated files (``helm/specserve/files/``); ``generate`` writes them and
``check`` verifies they are fresh. ``push`` uploads the dashboards to a Grafana
server through ``grafana-client`` (imported only then).

Ray-free on purpose: this runs in CI and on laptops without a Ray install.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from specserve import metrics as m

#: Where ``generate`` and ``check`` read and write by default (relative to the repo root).
DEFAULT_OUT_DIR = Path("helm/specserve/files")
DASHBOARD_SUBDIR = "dashboards"
RULES_FILE = "prometheus-rules.yaml"

#: Ray's own series that panels and rules may use. Anything else must be declared in
#: specserve.metrics, so a typo or a renamed Ray metric fails ``check`` instead of
#: drawing an empty panel in production.
RAY_SERIES: frozenset[str] = frozenset(
    {
        "ray_serve_num_http_requests_total",
        "ray_serve_num_http_error_requests_total",
        "ray_serve_deployment_replica_healthy",
        "ray_serve_deployment_processing_latency_ms_bucket",
        "ray_serve_replica_processing_queries",
        "ray_serve_num_ongoing_http_requests",
    }
)

#: The Serve application name the RayService's serveConfigV2 declares.
APP_NAME = "specserve"

# Grafana template variables, and the values all_queries() substitutes so the same
# expressions run against a plain Prometheus (no Grafana to expand them).
_GRAFANA_VARS = {"$__rate_interval": "5m", "$model": ".*"}
_MODEL = 'model=~"$model"'
_RATE = "$__rate_interval"

# Thresholds of the alerts; the runbooks in docs/runbooks/ explain each.
ACCEPTANCE_COLLAPSED_BELOW = 0.15
TTFT_P95_HIGH_SECONDS = 2.0
DRAFT_FAILURES_PER_SECOND = 0.1


@dataclass(frozen=True)
class Panel:
    """One time-series panel: a title, PromQL targets as (expr, legend) pairs, and a unit."""

    title: str
    targets: tuple[tuple[str, str], ...]
    unit: str = "short"
    description: str = ""


@dataclass(frozen=True)
class Dashboard:
    """A dashboard: uid (stable across pushes), title and panels laid out two per row."""

    uid: str
    title: str
    panels: tuple[Panel, ...]


def _rate(series: str, by: str = "model", selector: str = _MODEL) -> str:
    return f"sum by ({by}) (rate({series}{{{selector}}}[{_RATE}]))"


def _quantiles(hist: m.MetricSpec) -> tuple[tuple[str, str], ...]:
    bucket = hist.series()[0]
    return tuple(
        (f"histogram_quantile({q}, sum by (model, le) (rate({bucket}{{{_MODEL}}}[{_RATE}])))", f"p{int(q * 100)} {{{{model}}}}")
        for q in (0.5, 0.95, 0.99)
    )


_ACCEPTED = m.NUM_ACCEPTED_TOKENS.exported()
_DRAFT_TOKENS = m.NUM_DRAFT_TOKENS.exported()
_DRAFTS = m.NUM_DRAFTS.exported()
_PER_POS = m.NUM_ACCEPTED_PER_POS.exported()

ACCEPTANCE_RATE = f"{_rate(_ACCEPTED)} / {_rate(_DRAFT_TOKENS)}"
MEAN_ACCEPTED_LENGTH = f"1 + {_rate(_ACCEPTED)} / {_rate(_DRAFTS)}"
ACCEPTANCE_BY_POSITION = f"{_rate(_PER_POS, by='model, position')} / on (model) group_left {_rate(_DRAFTS)}"


def dashboards() -> tuple[Dashboard, ...]:
    """The dashboards the chart ships: serving overview and speculation detail."""
    overview = Dashboard(
        uid="specserve-overview",
        title="specserve / Overview",
        panels=(
            Panel("Acceptance rate", ((ACCEPTANCE_RATE, "{{model}}"),), "percentunit",
                  "Accepted draft tokens / proposed draft tokens."),
            Panel("Mean accepted length", ((MEAN_ACCEPTED_LENGTH, "{{model}}"),), "short",
                  "Tokens emitted per target pass: 1 + accepted per block."),
            Panel("Tokens per second", (
                (_rate(m.GENERATION_TOKENS.exported()), "generated {{model}}"),
                (_rate(m.PROMPT_TOKENS.exported()), "prompt {{model}}"),
            ), "short"),
            Panel("Time to first token", _quantiles(m.TTFT), "s"),
            Panel("Inter-token latency", _quantiles(m.ITL), "s"),
            Panel("Running and waiting sequences", (
                (f"sum by (model) ({m.NUM_REQUESTS_RUNNING.exported()}{{{_MODEL}}})", "running {{model}}"),
                (f"sum by (model) ({m.NUM_REQUESTS_WAITING.exported()}{{{_MODEL}}})", "waiting {{model}}"),
            ), "short"),
            Panel("Healthy Serve replicas", (
                (f'sum by (deployment) (ray_serve_deployment_replica_healthy{{application="{APP_NAME}"}})',
                 "{{deployment}}"),
            ), "short"),
            Panel("Errors per second", (
                (_rate(m.REQUEST_ERRORS.exported(), by="model, status"), "{{status}} {{model}}"),
                (f'sum by (error_code) (rate(ray_serve_num_http_error_requests_total{{application="{APP_NAME}"}}[{_RATE}]))',
                 "HTTP {{error_code}}"),
            ), "reqps"),
        ),
    )
    speculation = Dashboard(
        uid="specserve-speculation",
        title="specserve / Speculation",
        panels=(
            Panel("Acceptance by block position", ((ACCEPTANCE_BY_POSITION, "pos {{position}} {{model}}"),),
                  "percentunit", "Share of blocks whose draft token at this position was accepted."),
            Panel("Draft vs verify latency (p50, p95)", (
                *((e, f"draft {legend}") for e, legend in _quantiles(m.DRAFT_LATENCY)[:2]),
                *((e, f"verify {legend}") for e, legend in _quantiles(m.VERIFY_LATENCY)[:2]),
            ), "s"),
            Panel("Sequences per verification pass", (
                (f"sum by (model) (rate(ray_{m.VERIFY_BATCH_SIZE.name}_sum{{{_MODEL}}}[{_RATE}])) / "
                 f"sum by (model) (rate(ray_{m.VERIFY_BATCH_SIZE.name}_count{{{_MODEL}}}[{_RATE}]))",
                 "mean {{model}}"),
                (f"sum by (model) ({m.NUM_REQUESTS_RUNNING.exported()}{{{_MODEL}}})", "running {{model}}"),
            ), "short", "Batch occupancy of engine hf's target groups: a mean well below the running sequences "
                        "(per group) means their steps are split over several passes (late drafts, slow clients)."),
            Panel("Drafts and draft tokens per second", (
                (_rate(_DRAFTS), "blocks {{model}}"),
                (_rate(_DRAFT_TOKENS), "draft tokens {{model}}"),
                (_rate(_ACCEPTED), "accepted tokens {{model}}"),
                (_rate(m.NUM_PIPELINED_DRAFTS.exported()), "pipelined blocks {{model}}"),
            ), "short", "Pipelined blocks were drafted while the previous block was verified (costly drafters only)."),
            Panel("Draft worker failures per second", (
                (_rate(m.DRAFT_WORKER_RESTARTS.exported()), "{{model}}"),
            ), "short", "Failed draft calls; the router falls back to plain decoding meanwhile."),
            Panel("End-to-end request latency", _quantiles(m.E2E_LATENCY), "s"),
            Panel("Finished requests per second", (
                (_rate(m.REQUEST_SUCCESS.exported(), by="model, finished_reason"), "{{finished_reason}}"),
            ), "reqps"),
        ),
    )
    return (overview, speculation)


def dashboard_json(d: Dashboard) -> dict[str, Any]:
    """Grafana dashboard model of ``d`` (what the HTTP API and file provisioning take)."""
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels = []
    for i, p in enumerate(d.panels):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": p.title,
                "description": p.description,
                "datasource": ds,
                # Two panels per row, 8 rows high: readable on a laptop screen.
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {"refId": chr(ord("A") + j), "datasource": ds, "expr": expr, "legendFormat": legend}
                    for j, (expr, legend) in enumerate(p.targets)
                ],
            }
        )
    return {
        "uid": d.uid,
        "title": d.title,
        "tags": ["specserve", "ray", "speculative-decoding"],
        "editable": True,
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
                {
                    "name": "model",
                    "type": "query",
                    "datasource": ds,
                    "query": f"label_values({m.GENERATION_TOKENS.exported()}, model)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


def _alert(name: str, expr: str, for_: str, severity: str, summary: str, runbook: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "runbook": f"docs/runbooks/{runbook}.md"},
    }


def prometheus_rules() -> dict[str, Any]:
    """Recording rules and alerts, in the ``groups:`` layout promtool and PrometheusRule share."""
    fixed = {"$__rate_interval": "5m", f"{{{_MODEL}}}": ""}

    def expand(expr: str) -> str:
        for k, v in fixed.items():
            expr = expr.replace(k, v)
        return expr

    draft_tokens_rate = f"sum by (model) (rate({_DRAFT_TOKENS}[5m]))"
    ttft_bucket = m.TTFT.series()[0]
    recording = [
        {"record": "specserve:acceptance_rate:rate5m", "expr": expand(ACCEPTANCE_RATE)},
        {"record": "specserve:mean_accepted_length:rate5m", "expr": expand(MEAN_ACCEPTED_LENGTH)},
        {"record": "specserve:acceptance_by_position:rate5m", "expr": expand(ACCEPTANCE_BY_POSITION)},
        {"record": "specserve:generation_tokens:rate5m", "expr": expand(_rate(m.GENERATION_TOKENS.exported()))},
        {
            "record": "specserve:time_to_first_token_seconds:p95_5m",
            "expr": f"histogram_quantile(0.95, sum by (model, le) (rate({ttft_bucket}[5m])))",
        },
    ]
    alerts = [
        _alert(
            "SpecServeAcceptanceCollapsed",
            # The volume guard keeps an idle server (no drafts, 0/0) from firing.
            f"specserve:acceptance_rate:rate5m < {ACCEPTANCE_COLLAPSED_BELOW} and {draft_tokens_rate} > 1",
            "10m", "warning",
            "Draft acceptance of {{ $labels.model }} is {{ $value | humanizePercentage }}: drafting costs more than it saves.",
            "acceptance-collapsed",
        ),
        _alert(
            "SpecServeTTFTHigh",
            f"specserve:time_to_first_token_seconds:p95_5m > {TTFT_P95_HIGH_SECONDS}",
            "10m", "warning",
            "p95 time to first token of {{ $labels.model }} is {{ $value | humanizeDuration }}.",
            "ttft-high",
        ),
        _alert(
            "SpecServeReplicasUnhealthy",
            f'min by (deployment) (ray_serve_deployment_replica_healthy{{application="{APP_NAME}"}}) < 1',
            "5m", "critical",
            "Serve deployment {{ $labels.deployment }} has unhealthy replicas.",
            "replicas-unhealthy",
        ),
        _alert(
            "SpecServeDraftWorkersDown",
            f"sum by (model) (rate({m.DRAFT_WORKER_RESTARTS.exported()}[5m])) > {DRAFT_FAILURES_PER_SECOND}",
            "5m", "warning",
            "Draft worker calls for {{ $labels.model }} are failing; requests decode without speculation.",
            "draft-workers-down",
        ),
    ]
    return {
        "groups": [
            {"name": "specserve.recording", "interval": "30s", "rules": recording},
            {"name": "specserve.alerts", "rules": alerts},
        ]
    }


def _rule_exprs(rules: dict[str, Any]) -> list[str]:
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def _panel_exprs(boards: Iterable[dict[str, Any]]) -> list[str]:
    exprs = [t["expr"] for b in boards for p in b["panels"] for t in p["targets"]]
    # label_values(METRIC, LABEL) is Grafana-only; the metric inside is what Prometheus answers.
    exprs += [
        v["query"].removeprefix("label_values(").split(",")[0]
        for b in boards for v in b["templating"]["list"] if v["type"] == "query"
    ]
    return exprs


def all_queries() -> list[str]:
    """Every panel, variable and rule expression, with Grafana variables expanded for plain Prometheus."""
    out = []
    for expr in _panel_exprs(dashboard_json(d) for d in dashboards()) + _rule_exprs(prometheus_rules()):
        for k, v in _GRAFANA_VARS.items():
            expr = expr.replace(k, v)
        out.append(expr)
    return out


# PromQL words that look like metric names but are not.
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
                       "and", "or", "unless", "inf", "nan"})
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?!\w)\s*(\()?")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and durations excluded)."""
    expr = _STRINGS.sub('""', expr)
    expr = _BRACES.sub(" ", expr)
    expr = _LABEL_LISTS.sub(" ", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def check_queries(exprs: Iterable[str], recorded: Iterable[str] = ()) -> list[str]:
    """Errors for expressions that name a metric neither declared, allow-listed nor recorded."""
    known = m.all_series() | RAY_SERIES | set(recorded)
    errors = []
    for expr in exprs:
        for name in sorted(metric_names(expr) - known):
            errors.append(f"unknown metric {name!r} in: {expr}")
    return errors


def check_definitions(boards: Sequence[dict[str, Any]], rules: dict[str, Any]) -> list[str]:
    """Errors for every panel or rule of these objects that queries an unknown metric."""
    recorded = [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]
    return check_queries(_panel_exprs(boards) + _rule_exprs(rules), recorded)


def rendered_files() -> dict[str, str]:
    """The generated files, relative path -> text; deterministic byte for byte."""
    files = {
        f"{DASHBOARD_SUBDIR}/{d.uid}.json": json.dumps(dashboard_json(d), indent=2, sort_keys=True) + "\n"
        for d in dashboards()
    }
    header = "# Generated by `python -m specserve.dashboards generate`; do not edit.\n"
    files[RULES_FILE] = header + yaml.safe_dump(prometheus_rules(), sort_keys=False, width=200)
    return files


def generate(out_dir: Path) -> list[Path]:
    """Write the dashboards and rules under ``out_dir``; return the paths written."""
    written = []
    for rel, text in rendered_files().items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def check(out_dir: Path) -> list[str]:
    """Errors: unknown metrics in the generated definitions, and files under ``out_dir`` that are stale."""
    errors = check_definitions([dashboard_json(d) for d in dashboards()], prometheus_rules())
    expected = rendered_files()
    for rel, text in expected.items():
        path = out_dir / rel
        if not path.exists():
            errors.append(f"{path} is missing: run `python -m specserve.dashboards generate`")
        elif path.read_text() != text:
            errors.append(f"{path} is stale: run `python -m specserve.dashboards generate`")
    stray = {p.relative_to(out_dir).as_posix() for p in (out_dir / DASHBOARD_SUBDIR).glob("*.json")} - set(expected)
    errors += [f"{out_dir / rel} is not generated from code: delete it" for rel in sorted(stray)]
    return errors


def push(url: str, token: str, folder_uid: str | None = None) -> list[str]:
    """Upload every dashboard to the Grafana at ``url`` (overwriting by uid); return the uids pushed."""
    from grafana_client import GrafanaApi  # optional dependency (extra 'ops'): imported only to push

    api = GrafanaApi.from_url(url, credential=token)
    pushed = []
    for d in dashboards():
        body: dict[str, Any] = {"dashboard": dashboard_json(d), "overwrite": True,
                                "message": "pushed by specserve dashboards push"}
        if folder_uid:
            body["folderUid"] = folder_uid
        api.dashboard.update_dashboard(body)
        pushed.append(d.uid)
    return pushed


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``dashboards`` subcommand (actions: generate, check, push) on a CLI's subparsers."""
    p = subparsers.add_parser("dashboards", help="Generate, check or push Grafana dashboards and Prometheus rules.")
    actions = p.add_subparsers(dest="dashboards_action", required=True)
    for name, help_ in (("generate", "Write dashboards and rules into the chart."),
                        ("check", "Fail on unknown metrics or stale generated files.")):
        a = actions.add_parser(name, help=help_)
        a.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                       help=f"Directory of the generated files (default: {DEFAULT_OUT_DIR}).")
    a = actions.add_parser("push", help="Upload the dashboards to a Grafana server.")
    a.add_argument("--url", required=True, help="Grafana base URL, e.g. https://grafana.example.com.")
    a.add_argument("--token-env", default="GRAFANA_TOKEN",
                   help="Environment variable holding a Grafana service account token (default: GRAFANA_TOKEN).")
    a.add_argument("--folder-uid", default=None, help="Grafana folder uid to put the dashboards in.")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``dashboards`` action; return the process exit code."""
    if args.dashboards_action == "generate":
        for path in generate(args.out_dir):
            print(f"wrote {path}")
        return 0
    if args.dashboards_action == "check":
        errors = check(args.out_dir)
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        if not errors:
            print(f"ok: {len(all_queries())} queries use known metrics; generated files are fresh")
        return 1 if errors else 0
    token = os.environ.get(args.token_env)
    if not token:
        # The token never goes on the command line, where shell history and ps would show it.
        print(f"error: environment variable {args.token_env} is not set", file=sys.stderr)
        return 2
    for uid in push(args.url, token, args.folder_uid):
        print(f"pushed {uid}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m specserve.dashboards``."""
    parser = argparse.ArgumentParser(prog="python -m specserve.dashboards")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    # Accept both `python -m specserve.dashboards generate` and `... dashboards generate`.
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "dashboards":
        argv = ["dashboards", *argv]
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
