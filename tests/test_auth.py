"""API keys: the key sources and the check on their own, then through real Ray Serve and real HTTP on
127.0.0.1 with the official client (no key, wrong key, right key, streaming), /health open for probes,
Ray's metrics endpoint unaffected (and counting 401s), and no key in any log of the Ray session."""

from __future__ import annotations

import json
import os
import secrets
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import deploy as deploy_at
from serve_helpers import free_port, local_serve

from cluster.local import LOOPBACK, use_loopback
from deployments.auth import KEYS_ENV, KEYS_FILE_ENV, APIKeyAuth, InvalidAPIKey, parse_keys
from specserve.errors import SpecServeError

use_loopback()
# Ray pushes metrics to its exporter every 10 s by default; the metrics test wants them sooner.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")

# Random keys, so that finding one in a log can only mean it was logged.
ENV_KEYS = [f"sk-env-{secrets.token_hex(12)}", f"sk-env2-{secrets.token_hex(12)}"]
FILE_KEY = f"sk-file-{secrets.token_hex(12)}"
WRONG_KEY = f"sk-wrong-{secrets.token_hex(12)}"


HTTP_PORT = free_port()
METRICS_PORT = free_port()
BASE = f"http://{LOOPBACK}:{HTTP_PORT}"


# ------------------------------------------------------------------------------ without Ray


def test_keys_parse_from_commas_lines_and_comments():
    assert parse_keys(" a, b\n# a comment, not a key\n\nc ,\n") == ["a", "b", "c"]
    assert parse_keys("") == []


def test_keys_from_the_environment_and_the_file_are_both_accepted(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# rotated 2026-11\nfile-key\n")
    auth = APIKeyAuth.load(None, environ={KEYS_ENV: "env-a,env-b", KEYS_FILE_ENV: str(path)})
    for key in ("env-a", "env-b", "file-key"):
        auth.check(f"Bearer {key}")
    auth.check("bearer  file-key ")  # the scheme is case-insensitive, as in RFC 7235
    with pytest.raises(InvalidAPIKey):
        auth.check("Bearer env-c")


def test_the_config_field_wins_over_the_file_variable(tmp_path):
    (tmp_path / "a").write_text("key-a")
    (tmp_path / "b").write_text("key-b")
    auth = APIKeyAuth.load(tmp_path / "a", environ={KEYS_FILE_ENV: str(tmp_path / "b")})
    auth.check("Bearer key-a")
    with pytest.raises(InvalidAPIKey):
        auth.check("Bearer key-b")


def test_no_key_anywhere_turns_authentication_off():
    auth = APIKeyAuth.load(None, environ={})
    assert not auth.enabled
    auth.check(None)
    auth.check("Bearer anything")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token k", "k"],
                         ids=["absent", "empty", "scheme-only", "scheme-and-space", "basic-auth", "other-scheme",
                              "bare-key"])
def test_a_missing_or_malformed_header_is_a_401_naming_the_bearer_header(header):
    rejected = []
    auth = APIKeyAuth(["k"], on_reject=lambda: rejected.append(1))
    with pytest.raises(InvalidAPIKey) as e:
        auth.check(header)
    info = e.value.info()
    assert (info.status, info.type, info.code) == (401, "invalid_request_error", "invalid_api_key")
    assert "Authorization" in info.message and "Bearer" in info.message
    assert rejected == [1]


def test_a_wrong_key_is_not_echoed_in_the_error():
    with pytest.raises(InvalidAPIKey) as e:
        APIKeyAuth(["right"]).check(f"Bearer {WRONG_KEY}")
    assert WRONG_KEY not in e.value.message and "Incorrect API key" in e.value.message


@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n"], ids=["missing", "empty", "comments-only"])
def test_a_named_key_file_that_is_missing_or_empty_refuses_to_start(tmp_path, content):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpecServeError) as e:
        APIKeyAuth.load(path, environ={KEYS_ENV: "k"})
    assert e.value.param == "serve.api_keys_file" and str(path) in e.value.message


# ------------------------------------------------------------------------------ the Helm chart


def _auth_wiring(objs: list[dict]) -> dict[str, tuple]:
    """Per pod template: (key file env values, key mounts, key volumes)."""
    from chart_tools import by_kind, pod_templates

    (rs,) = by_kind(objs, "RayService")
    out = {}
    for name, template in pod_templates(rs).items():
        spec = template["spec"]
        (c,) = spec["containers"]
        out[name] = ([e["value"] for e in c["env"] if e["name"] == KEYS_FILE_ENV],
                     [m for m in c["volumeMounts"] if m["name"] == "api-keys"],
                     [v for v in spec["volumes"] if v["name"] == "api-keys"])
    return out


def test_chart_mounts_the_api_key_secret_into_every_pod_and_points_the_server_at_it():
    from chart_tools import render

    wiring = _auth_wiring(render(sets=("auth.existingSecret=my-keys", "auth.secretKey=keys.txt")))
    assert set(wiring) == {"head", "draft", "target"}
    for env, mounts, volumes in wiring.values():
        (path,) = env
        (mount,) = mounts
        (volume,) = volumes
        assert mount["readOnly"] is True and path.startswith(mount["mountPath"] + "/")
        # The Secret's key lands at the file name the env var names; a missing Secret blocks the pod.
        assert volume["secret"] == {"secretName": "my-keys", "items": [{"key": "keys.txt",
                                                                         "path": path.rsplit("/", 1)[1]}]}


def test_chart_without_a_secret_has_no_key_wiring_and_openshift_turns_it_on():
    from chart_tools import CHART, render

    assert all(w == ([], [], []) for w in _auth_wiring(render()).values())
    openshift = _auth_wiring(render(CHART / "values-openshift.yaml"))
    assert all(env and mounts and volumes for env, mounts, volumes in openshift.values())


# ------------------------------------------------------------------------------ through Serve


@pytest.fixture(scope="module")
def ray_serve():
    """One local Ray + Serve for the module whose workers see ``SPECSERVE_API_KEYS`` (as a pod's would)."""
    with local_serve(HTTP_PORT, env={KEYS_ENV: ",".join(ENV_KEYS)}, num_cpus=8,
                     metrics_export_port=METRICS_PORT) as serve:
        yield serve


def deploy(serve, name: str, prefix: str, config: dict) -> str:
    return deploy_at(serve, BASE, name, prefix, config)


def tiny_config(tiny_dir, **serve_opts) -> dict:
    return {"model": {"model": str(tiny_dir), "dtype": "fp32"},
            # The suffix drafter: its cross-request cache is kept per API key once keys are configured.
            "drafter": {"kind": "suffix", "num_speculative_tokens": 8, "adaptive_k": False},
            "serve": {"model_name": "tiny", "max_model_len": 256, **serve_opts}}


@pytest.fixture(scope="module")
def app(ray_serve, tiny_dir, tmp_path_factory):
    """Keys from the environment plus a key file named in the config (as the chart mounts a Secret).

    One app for the module: each app costs over a minute of start-up on a 2-core machine."""
    path = tmp_path_factory.mktemp("secret") / "api-keys"
    path.write_text(f"# specserve API keys\n{FILE_KEY}\n")
    return deploy(ray_serve, "auth", "/auth", tiny_config(tiny_dir, api_keys_file=str(path)))


def client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def completion(c: openai.OpenAI):
    return c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)


@pytest.mark.ray
@pytest.mark.parametrize("key", [WRONG_KEY, ENV_KEYS[0][:-1], ENV_KEYS[0] + "x", FILE_KEY.upper()],
                         ids=["wrong", "prefix-of-a-key", "key-plus-a-char", "key-in-another-case"])
def test_the_official_client_without_a_valid_key_gets_401_openai_json(app, key):
    c = client(app, key)
    for call in (lambda: completion(c), lambda: c.models.list(),
                 lambda: c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, stream=True)):
        with pytest.raises(openai.AuthenticationError) as e:
            call()
        assert e.value.status_code == 401
        assert e.value.code == "invalid_api_key" and e.value.type == "invalid_request_error"


@pytest.mark.ray
def test_no_authorization_header_gets_401_json_with_the_bearer_challenge(app):
    for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("GET", "/v1/router/status")):
        resp = httpx.request(method, app + path, json={"model": "tiny", "prompt": "hi"}, timeout=30)
        assert resp.status_code == 401, (path, resp.text)
        assert resp.headers["www-authenticate"] == "Bearer"
        assert resp.json() == {"error": {"message": resp.json()["error"]["message"], "type": "invalid_request_error",
                                         "param": None, "code": "invalid_api_key"}}
        assert "Authorization: Bearer" in resp.json()["error"]["message"]


@pytest.mark.ray
def test_every_configured_key_works_and_bad_input_is_still_checked_after_auth(app):
    for key in ENV_KEYS:
        resp = completion(client(app, key))
        assert resp.usage.completion_tokens == 8 and resp.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:  # authenticated but invalid: the usual 400
        client(app, ENV_KEYS[0]).completions.create(model="tiny", prompt="hi", n=3)
    assert e.value.param == "n"


@pytest.mark.ray
def test_a_streaming_chat_with_the_right_key_streams_to_the_end(app):
    c = client(app, ENV_KEYS[1])
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hello"}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].usage.completion_tokens >= 1
    again = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hello"}],
                                      max_tokens=12, temperature=0)
    assert again.choices[0].message.content == text


@pytest.mark.ray
def test_the_drafters_cross_request_cache_is_kept_per_api_key(app):
    # Greedy and a fixed k: a request drafts the same whenever its key's cache holds the same text.
    prompt = "Tenant isolation check: repeat after me, one two three four"

    def spec_decode(key: str) -> dict:
        resp = client(app, key).completions.create(model="tiny", prompt=prompt, max_tokens=48, temperature=0,
                                                   extra_body={"ignore_eos": True})
        return resp.model_extra["spec_decode"]

    first = spec_decode(FILE_KEY)
    again = spec_decode(FILE_KEY)  # its own answer is now in this key's cache
    other = spec_decode(ENV_KEYS[1])  # another key: none of it
    assert again["num_accepted_tokens"] > first["num_accepted_tokens"] + 8, (first, again)
    assert other["num_accepted_tokens"] < again["num_accepted_tokens"] - 8, (other, again)


@pytest.mark.ray
def test_health_answers_probes_without_a_key(app):
    resp = httpx.get(app + "/health", timeout=30)
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


@pytest.mark.ray
def test_a_key_file_named_in_the_config_adds_its_keys(app):
    assert completion(client(app, FILE_KEY)).usage.completion_tokens == 8
    assert completion(client(app, ENV_KEYS[0])).usage.completion_tokens == 8
    with pytest.raises(openai.AuthenticationError):
        completion(client(app, WRONG_KEY))


@pytest.mark.ray
def test_the_metrics_endpoint_scrapes_without_a_key_and_counts_401s(app):
    from specserve.metrics import REQUEST_ERRORS

    with pytest.raises(openai.AuthenticationError):
        completion(client(app, WRONG_KEY))
    series = f'{REQUEST_ERRORS.exported()}{{'
    deadline = time.monotonic() + 60
    while True:
        text = urllib.request.urlopen(f"http://{LOOPBACK}:{METRICS_PORT}/metrics", timeout=10).read().decode()
        lines = [line for line in text.splitlines() if line.startswith(series) and 'status="401"' in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert lines and float(lines[0].rsplit(" ", 1)[1]) >= 1


@pytest.mark.ray
def test_no_key_appears_in_any_log_of_the_ray_session(app):
    import ray

    # Requests with every kind of key first, so that anything logging headers or bodies had its chance.
    for key in (*ENV_KEYS, FILE_KEY, WRONG_KEY):
        try:
            completion(client(app, key))
        except openai.AuthenticationError:
            pass
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # this session's, not session_latest
    files = [p for p in logs.rglob("*") if p.is_file()]
    texts = {p: p.read_bytes().decode(errors="replace") for p in files}
    # The scan reads where the ingress logs: its access log lines and our start-up line are there.
    assert any("/v1/completions" in t for t in texts.values())
    assert any("API keys required" in t for t in texts.values())
    leaks = {p.name: k for p, t in texts.items() for k in (*ENV_KEYS, FILE_KEY, WRONG_KEY) if k in t}
    assert not leaks, json.dumps(leaks)
