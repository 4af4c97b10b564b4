"""Dashboards and Prometheus rules generated from specserve.metrics."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from specserve import dashboards as d
from specserve import metrics as m

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "helm" / "specserve" / "files"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    d.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["dashboards", *argv])


def test_generation_is_deterministic(tmp_path):
    first = d.rendered_files()
    assert first == d.rendered_files()
    d.generate(tmp_path)
    assert {p.relative_to(tmp_path).as_posix(): p.read_text() for p in tmp_path.rglob("*.*")} == first


def test_committed_files_are_fresh():
    assert d.check(FILES) == []
    assert d.run(_args("check", "--out-dir", str(FILES))) == 0


def test_check_fails_on_a_stale_or_stray_file(tmp_path):
    d.generate(tmp_path)
    (tmp_path / d.RULES_FILE).write_text("groups: []\n")
    (tmp_path / d.DASHBOARD_SUBDIR / "hand-made.json").write_text("{}")
    errors = d.check(tmp_path)
    assert any("stale" in e for e in errors) and any("hand-made.json" in e for e in errors)
    assert d.run(_args("check", "--out-dir", str(tmp_path))) == 1


def test_check_catches_a_panel_querying_an_unknown_metric(monkeypatch):
    real = d.dashboards

    def with_typo():
        boards = list(real())
        bad = d.Panel("typo", (("rate(ray_specserve_generation_token_total[5m])", ""),))
        boards[0] = d.Dashboard(boards[0].uid, boards[0].title, (*boards[0].panels, bad))
        return tuple(boards)

    monkeypatch.setattr(d, "dashboards", with_typo)
    errors = d.check(FILES)
    assert any("ray_specserve_generation_token_total" in e for e in errors)


def test_check_catches_a_rule_querying_an_unknown_metric():
    rules = d.prometheus_rules()
    rules["groups"][0]["rules"].append({"record": "x:y", "expr": "sum(ray_serve_made_up_total)"})
    errors = d.check_definitions([], rules)
    assert errors == ["unknown metric 'ray_serve_made_up_total' in: sum(ray_serve_made_up_total)"]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (model, le) (rate(a_bucket{model=~"x|y", le="+Inf"}[5m]))', {"a_bucket"}),
        ("a / on (model) group_left b offset 5m", {"a", "b"}),
        ('histogram_quantile(0.95, c{job="by"}) > 2.0', {"c"}),
        ("rec:name:rate5m < 0.1 and d > 1", {"rec:name:rate5m", "d"}),
    ],
    ids=["labels-and-durations", "vector-matching", "strings-and-numbers", "recording-rule-names"],
)
def test_metric_names_are_read_from_promql(expr, names):
    assert d.metric_names(expr) == names


def test_every_declared_metric_is_shown_somewhere():
    used = set().union(*(d.metric_names(q) for q in d.all_queries()))
    for spec in m.ALL:
        assert used & set(spec.series()), f"{spec.name} is on no panel or rule"


def test_all_queries_have_no_grafana_variables_left():
    queries = d.all_queries()
    assert not [q for q in queries if "$" in q or "label_values" in q]


def test_dashboards_have_the_panels_operators_need():
    titles = {p["title"] for b in (json.loads(t) for k, t in d.rendered_files().items() if k.endswith(".json"))
              for p in b["panels"]}
    for wanted in ("Acceptance rate", "Mean accepted length", "Acceptance by block position", "Tokens per second",
                   "Time to first token", "Inter-token latency", "Draft vs verify latency (p50, p95)",
                   "Running and waiting sequences", "Healthy Serve replicas", "Errors per second"):
        assert wanted in titles


def test_alerts_have_runbooks_that_exist():
    alerts = [r for g in d.prometheus_rules()["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {"SpecServeAcceptanceCollapsed", "SpecServeTTFTHigh",
                                             "SpecServeReplicasUnhealthy", "SpecServeDraftWorkersDown"}
    for a in alerts:
        assert (ROOT / a["annotations"]["runbook"]).is_file(), a["alert"]


def test_promtool_accepts_the_rules(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    rules = tmp_path / "rules.yaml"
    rules.write_text(d.rendered_files()[d.RULES_FILE])
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # And promtool really looks: a broken expression must fail.
    rules.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "a:b", "expr": "sum(("}]}]}))
    bad = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in Grafana: records each request and answers like /api/dashboards/db does."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - the http.server naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        reply = json.dumps({"status": "success", "uid": body["dashboard"]["uid"], "version": 1}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def grafana():
    pytest.importorskip("grafana_client")
    _Recorder.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _Recorder.requests
    server.shutdown()
    server.server_close()


def test_push_uploads_every_dashboard_with_the_token(grafana, monkeypatch):
    url, requests = grafana
    monkeypatch.setenv("TEST_GRAFANA_TOKEN", "glsa_test")
    assert d.run(_args("push", "--url", url, "--token-env", "TEST_GRAFANA_TOKEN", "--folder-uid", "ops")) == 0
    assert [r["path"] for r in requests] == ["/api/dashboards/db"] * len(d.dashboards())
    assert all(r["auth"] == "Bearer glsa_test" for r in requests)
    assert [r["body"]["dashboard"]["uid"] for r in requests] == [b.uid for b in d.dashboards()]
    assert all(r["body"]["overwrite"] is True and r["body"]["folderUid"] == "ops" for r in requests)
    assert requests[0]["body"]["dashboard"] == d.dashboard_json(d.dashboards()[0])


def test_push_refuses_to_run_without_the_token(grafana, monkeypatch):
    url, requests = grafana
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    assert d.run(_args("push", "--url", url, "--token-env", "NO_SUCH_TOKEN_VAR")) == 2
    assert requests == []
