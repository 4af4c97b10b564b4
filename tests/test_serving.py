"""The OpenAI-compatible endpoint through real Ray Serve and real HTTP on 127.0.0.1: the official
client (streaming included), bad input, back-pressure, cancellation, a bounded load test, a dead
draft worker, the real SmolLM2 end to end, and a real Prometheus scraping the metrics."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import httpx
import pytest
from serve_helpers import deploy as deploy_at
from serve_helpers import free_port, local_serve, wait_idle

from cluster.local import LOOPBACK, use_loopback

pytestmark = pytest.mark.ray

use_loopback()
# Ray pushes metrics to its exporter every 10 s by default; the Prometheus test wants them sooner.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")


HTTP_PORT = free_port()
METRICS_PORT = free_port()
BASE = f"http://{LOOPBACK}:{HTTP_PORT}"


@pytest.fixture(scope="module")
def ray_serve():
    """One local Ray + Serve for the module, HTTP on 127.0.0.1."""
    with local_serve(HTTP_PORT, num_cpus=8, metrics_export_port=METRICS_PORT) as serve:
        yield serve


def deploy(serve, name: str, prefix: str, config: dict) -> str:
    return deploy_at(serve, BASE, name, prefix, config)


def tiny_config(tiny_dir, **serve_opts) -> dict:
    return {
        "model": {"model": str(tiny_dir), "dtype": "fp32"},
        "drafter": {"kind": "ngram", "num_speculative_tokens": 4},
        # On a draft worker (not in the router, where 'auto' puts n-gram): the module kills that worker.
        "topology": {"draft_placement": "workers"},
        "serve": {"model_name": "tiny", **serve_opts},
    }


@pytest.fixture(scope="module")
def tiny_app(ray_serve, tiny_dir):
    """The app on the tiny model, under the application name the dashboards query."""
    from deployments.app import APP_NAME

    return deploy(ray_serve, APP_NAME, "/", tiny_config(tiny_dir, max_model_len=256, body_timeout_s=2))


@pytest.fixture(scope="module")
def client(tiny_app):
    from openai import OpenAI

    return OpenAI(base_url=tiny_app + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def prometheus(tiny_app, tmp_path_factory):
    """A real Prometheus scraping Ray's metrics endpoint every second, on 127.0.0.1."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus binary missing: `make setup` installs Debian's prometheus")
        pytest.skip("prometheus binary missing (apt-get install prometheus)")
    from specserve.dashboards import DEFAULT_OUT_DIR, RULES_FILE

    d = tmp_path_factory.mktemp("prom")
    port = free_port()
    rules = os.path.abspath(os.path.join(DEFAULT_OUT_DIR, RULES_FILE))
    (d / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [rules],
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"{LOOPBACK}:{METRICS_PORT}"]}]}],
    }))
    proc = subprocess.Popen(
        [binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
         f"--web.listen-address={LOOPBACK}:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(d / "prometheus.log", "w"))
    url = f"http://{LOOPBACK}:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/-/ready", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


def reference_text(tiny_target, prompt: str, max_tokens: int) -> str:
    from specserve.config import DrafterConfig, SamplingParams
    from specserve.drafters import make_drafter
    from specserve.engine import SpecEngine

    cfg = DrafterConfig(kind="none", num_speculative_tokens=0)
    engine = SpecEngine(tiny_target, make_drafter(cfg, tiny_target), cfg)
    return engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)).text


def test_models_and_health_endpoints(tiny_app, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(tiny_app + "/health").json() == {"status": "ok"}


def test_greedy_completion_over_http_equals_plain_greedy(client, tiny_target):
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].text == reference_text(tiny_target, prompt, 30)
    assert resp.usage.completion_tokens == 30
    stats = resp.model_extra["spec_decode"]
    assert stats["num_drafts"] >= 1 and stats["mean_accepted_length"] >= 1.0


def test_a_request_can_turn_speculation_off_and_gets_the_same_greedy_output(client, tiny_app, tiny_target):
    prompt = "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4,"
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True, "speculative": False})
    assert resp.choices[0].text == reference_text(tiny_target, prompt, 20)
    assert resp.model_extra["spec_decode"]["num_drafts"] == 0
    bad = httpx.post(tiny_app + "/v1/completions",
                     json={"model": "tiny", "prompt": "hi", "speculative": "sometimes"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"


def test_streaming_chat_with_the_official_client(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello"}], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    again = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello"}], max_tokens=12, temperature=0)
    assert again.choices[0].message.content == text


def test_seeded_sampling_is_reproducible_over_http(client):
    kwargs = dict(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0.9, seed=42)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 400}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
], ids=["invalid-json", "unknown-model", "missing-messages", "empty-messages", "max-tokens-zero",
        "max-tokens-beyond-context", "negative-temperature", "top-p-zero", "n-above-1", "prompt-too-long",
        "empty-prompt"])
def test_bad_requests_get_an_openai_style_error_naming_the_field(tiny_app, path, body, status, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(tiny_app + path, content=data, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param
    if param:
        assert param in err["message"]


def test_client_disconnect_cancels_the_sequence(tiny_app):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", tiny_app + "/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert "text_completion" in first
    # The response was closed after one event; the router must drop the sequence well before 200 tokens.
    status = wait_idle(tiny_app, timeout_s=20)
    assert status["running"] == 0
    assert status["held"] == {"router": 0, "router_drafter": 0, "draft_workers": [0], "target_groups": [0]}


def test_bounded_load_of_concurrent_streams_all_complete_without_leaks(tiny_app):
    n_clients, n_requests = 32, 64

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str | None, bool]:
        body = {"model": "tiny", "prompt": f"Request {i}: count with me 1 2 3", "max_tokens": 16, "stream": True,
                "temperature": 0.7, "seed": i}
        finish, done = None, False
        async with client.stream("POST", tiny_app + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data:"):
                    event = json.loads(line[5:])
                    assert "error" not in event, event
                    finish = event["choices"][0]["finish_reason"] or finish
        return finish, done

    async def main():
        sem = asyncio.Semaphore(n_clients)
        async with httpx.AsyncClient(timeout=120) as client:
            async def limited(i):
                async with sem:
                    return await one(client, i)
            return await asyncio.wait_for(asyncio.gather(*[limited(i) for i in range(n_requests)]), 300)

    results = asyncio.run(main())
    assert len(results) == n_requests
    assert all(done and finish in ("stop", "length") for finish, done in results)
    assert wait_idle(tiny_app)["held"] == {"router": 0, "router_drafter": 0, "draft_workers": [0], "target_groups": [0]}


def test_saturated_router_answers_503(ray_serve, tiny_dir):
    base = deploy(ray_serve, "small", "/small", {
        **tiny_config(tiny_dir), "router": {"max_running_requests": 1, "max_waiting_requests": 1}})
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 150, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[c.post(base + "/v1/completions", json=body) for _ in range(4)])

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.json()["error"]["type"] == "server_overloaded"
    assert "saturated" in rejected.json()["error"]["message"]
    ray_serve.delete("small")


def test_a_killed_draft_worker_does_not_break_in_flight_streams(tiny_app, tiny_target):
    from ray import serve

    from deployments.app import APP_NAME

    router = serve.get_deployment_handle("SpecServer", app_name=APP_NAME)
    pid = router.placement.remote().result()["draft_workers"][0]["pid"]
    prompt = "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4,"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "stream": True, "temperature": 0,
            "ignore_eos": True}
    text = ""
    with httpx.stream("POST", tiny_app + "/v1/completions", json=body, timeout=120) as resp:
        for i, line in enumerate(resp.iter_lines()):
            if i == 0:
                os.kill(pid, 9)
            if line.startswith("data:") and line != "data: [DONE]":
                text += json.loads(line[5:])["choices"][0]["text"]
    assert text == reference_text(tiny_target, prompt, 40)
    # Ray restarts the worker and later requests draft again.
    for _ in range(100):
        info = router.placement.remote().result()["draft_workers"][0]
        if info["pid"] != pid:
            break
        time.sleep(0.2)
    assert info["pid"] != pid


def test_prometheus_scrapes_every_dashboard_query_and_recording_rule(prometheus, client, ray_serve, tiny_dir):
    from specserve.dashboards import _panel_exprs, dashboard_json, dashboards, prometheus_rules

    # The tiny model drafting for itself: every block is accepted, so pipelined blocks are used.
    self_draft = tiny_config(tiny_dir, max_model_len=256)
    self_draft["drafter"] = {"kind": "draft_model", "path": str(tiny_dir), "num_speculative_tokens": 3}
    base = deploy(ray_serve, "selfdraft", "/selfdraft", self_draft)
    httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "a b c", "max_tokens": 24,
                                                "temperature": 0, "ignore_eos": True}, timeout=120).raise_for_status()

    exprs = [e.replace("$__rate_interval", "5m").replace("$model", ".*")
             for e in _panel_exprs([dashboard_json(d) for d in dashboards()])]
    exprs += [r["expr"] for g in prometheus_rules()["groups"] for r in g["rules"] if "record" in r]
    # A 4xx so the error panels have data too.
    httpx.post(client.base_url.join("completions").__str__(), json={"model": "tiny", "prompt": "hi", "n": 3})
    empty: list[str] = []
    deadline = time.monotonic() + 90
    while True:
        client.completions.create(model="tiny", prompt="a b a b a b", max_tokens=8, temperature=0)
        empty = [e for e in exprs if not _query(prometheus, e)]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not empty, f"queries without data: {empty}"


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"
    data = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert data["status"] == "success", data
    return data["data"]["result"]


@pytest.mark.real_model
def test_real_smollm2_greedy_over_http_equals_engine_plain_greedy(ray_serve, real_target):
    from openai import OpenAI

    from specserve.config import DrafterConfig, SamplingParams
    from specserve.drafters import make_drafter
    from specserve.engine import SpecEngine

    base = deploy(ray_serve, "real", "/real", {
        "model": {"dtype": "fp32"}, "drafter": {"kind": "ngram", "num_speculative_tokens": 6},
        "serve": {"model_name": "smollm2"}})
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "Rewrite with clearer names: def f(a, b):\n    c = a + b\n    return c"}]
    resp = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=48, temperature=0)
    cfg = DrafterConfig(kind="none", num_speculative_tokens=0)
    engine = SpecEngine(real_target, make_drafter(cfg, real_target), cfg)
    expected = engine.generate(messages, SamplingParams(max_tokens=48), chat=True).text
    assert resp.choices[0].message.content == expected
    assert resp.model_extra["spec_decode"]["num_drafts"] > 0
    ray_serve.delete("real")


def _raw_post(path: str, body: bytes, headers: dict[str, str], send_bytes: int | None = None) -> tuple[int, dict]:
    """POST over a raw socket (to send what HTTP clients refuse to: lying lengths, cut-off bodies);
    the status and the JSON body of the answer.

    The body is sent from a thread while the answer is read, as a real client does. Only ``send_bytes`` of
    it are sent when given, and the client waits for the answer.
    """
    import socket
    import threading

    head = [f"POST {path} HTTP/1.1", f"Host: {LOOPBACK}:{HTTP_PORT}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((LOOPBACK, HTTP_PORT), timeout=60) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())

        def send_body():
            try:
                s.sendall(body[:send_bytes])
            except OSError:  # the server answered and closed first
                pass

        data = b""
        threading.Thread(target=send_body, daemon=True).start()
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    if b"chunked" in rest.partition(b"\r\n\r\n")[0].lower():  # de-chunk
        out, buf = b"", payload
        while buf:
            size, _, buf = buf.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, buf = out + buf[:n], buf[n + 2 :]
        payload = out
    return int(status_line.split()[1]), json.loads(payload) if payload else {}


def _still_a_request(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("model") == "tiny"


def test_malformed_oversized_and_cut_off_bodies_get_4xx_json_and_the_server_keeps_serving(tiny_app):
    import random

    rng = random.Random(0)
    good = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 4}).encode()
    limit = 4 * 1024 * 1024  # serve.max_body_bytes' default
    cases: list[tuple[str, bytes, dict, int | None]] = [
        ("50 MB body", b'{"model": "tiny", "prompt": "' + b"a" * 50_000_000 + b'"}', {}, None),
        ("just over the limit", b" " * (limit + 1), {}, None),
        ("declared length beyond what is read", b"{}", {"Content-Length": str(2**40)}, None),
        # No declared length: the limit is met while the chunks arrive.
        ("chunked, over the limit",
         b"".join(b"%x\r\n%s\r\n" % (65536, b" " * 65536) for _ in range(70)) + b"0\r\n\r\n",
         {"Transfer-Encoding": "chunked"}, None),
        # Half the declared bytes, then the client waits: answered after serve.body_timeout_s (2 s here).
        ("cut off", good, {"Content-Length": str(len(good))}, len(good) // 2),
        ("form content type", good, {"Content-Type": "application/x-www-form-urlencoded"}, None),
        ("text content type", good, {"Content-Type": "text/plain"}, None),
        ("not utf-8", b"\xff\xfe\x00{", {}, None),
        ("empty", b"", {}, None),
    ]
    for i in range(300):  # random mutations of a valid body: truncations, flipped bytes, wrong types
        mutation = rng.choice(["truncate", "flip", "insert", "type"])
        body = bytearray(good)
        if mutation == "truncate":
            body = body[: rng.randrange(len(body))]
        elif mutation == "flip":
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(len(body))] = rng.randrange(256)
        elif mutation == "insert":
            pos = rng.randrange(len(body))
            body[pos:pos] = rng.choice([b"{", b"]", b'"', b"\\u12", b",,", b"null", b"-1e999"])
        else:
            body = bytearray(json.dumps(rng.choice([[], "x", 1, None, {"model": 1}, {"prompt": {"a": 1}}])).encode())
        cases.append((f"mutation {i} ({mutation})", bytes(body), {}, None))
    statuses = {}
    for name, body, headers, send in cases:
        if body == good and name.startswith("mutation"):
            continue  # a mutation that changed nothing
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
        if "Transfer-Encoding" in headers:
            del headers["Content-Length"]
        status, answer = _raw_post("/v1/completions", body, headers, send)
        if status == 200 and send is None and _still_a_request(body):
            continue  # a mutation that left a valid request (a flipped letter in the prompt)
        assert 400 <= status < 500, (name, status, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}, (name, answer)
        statuses[status] = statuses.get(status, 0) + 1
    assert statuses.get(413, 0) >= 4 and statuses.get(415, 0) == 2 and statuses.get(400, 0) > 200, statuses
    r = httpx.post(tiny_app + "/v1/completions", content=good, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
