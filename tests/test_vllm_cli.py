"""Engine choice on the command line and in config files: bad input gets one line naming the field, exit 2;
``generate --engine vllm --json`` prints one JSON document and sends vLLM's and Ray's logs to stderr."""

from __future__ import annotations

import pytest
from cli_helpers import one_json_document, run_cli, run_cli_here


@pytest.mark.parametrize("args, named", [
    (["generate", "--engine", "vllm", "--drafter", "block", "hi"], "drafter.kind"),
    (["generate", "--engine", "tgi", "hi"], "--engine"),
    (["bench", "--engine", "vllm", "--prompts", "prompts/code.jsonl", "--out", "/tmp/never"], "--engine"),
])
def test_bad_engine_input_is_one_line_naming_it(args, named):
    out = run_cli_here(*args)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith(("error", "usage", "specserve"))]
    assert named in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert lines, out.stderr


@pytest.mark.parametrize("yaml_text, named", [
    ("model: {engine: hf}\ndrafter: {vllm_placement: vllm_worker}\n", "drafter.vllm_placement"),
    ("model: {engine: vllm}\ndrafter: {kind: block}\n", "drafter.kind"),
    ("model: {engine: vllm}\ndrafter: {vllm_placement: vllm_builtin, vllm_builtin_method: medusa2}\n",
     "vllm_builtin_method"),
    ("model: {engine: vllm}\ndrafter: {vllm_method: local}\n", "'vllm_placement: vllm_worker'"),  # the old key
    ("model: {engine: vllm, vllm: {k_per_batch_size: [[2, 8, 3]]}}\n", "k_per_batch_size"),
    ("model: {engine: hf}\ndrafter: {kind: draft_model, path: /m}\ntopology: {draft_placement: router}\n",
     "topology.draft_placement"),
    ("model: {engine: hf}\ntopology: {draft_placement: everywhere}\n", "draft_placement"),
    ("model: {engine: hf}\ndrafter: {tree: {max_nodes: -1}}\n", "--tree-nodes"),  # the CLI names its flag
])
def test_serve_refuses_a_bad_engine_config_before_starting_anything(tmp_path, yaml_text, named):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    out = run_cli_here("serve", "--config", str(cfg), "--port", "18999")
    assert out.returncode == 2, out.stderr
    assert named in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_bench_serve_measures_as_default_what_serve_runs():
    import argparse

    from deployments.bench import add_parser
    from deployments.bench_targets import build_targets
    from specserve.config import apply_serve_defaults

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["bench-serve"].parse_args(["--prompts", "sharegpt:1", "--out", "unused", "--only-default",
                                                  "--no-ray-serve-llm-peers"])
    default, *peers = build_targets(args)
    assert default.label == "default (make serve)"
    served = apply_serve_defaults({"model": {"model": "default", "dtype": "auto"}})
    assert default.app_args["model"]["engine"] == served["model"].get("engine", "hf")
    assert default.app_args.get("drafter") == served.get("drafter")
    assert [p.label for p in peers] == ["`vllm serve` plain", "`vllm serve` ngram k=4"]


def test_bench_serve_drafter_specs_map_to_the_drafter_placement_fields():
    from deployments.bench_targets import drafter_from_spec
    from specserve.config import DrafterConfig
    from specserve.errors import SpecServeError

    def fields(spec):
        d = DrafterConfig.model_validate(drafter_from_spec(spec, 4, True))
        return d.kind, d.vllm_placement, d.vllm_builtin_method, d.path

    assert fields("ngram") == ("ngram", "draft_workers", None, None)
    assert fields("vllm:local") == ("ngram", "vllm_worker", None, None)
    assert fields("vllm:local:suffix") == ("suffix", "vllm_worker", None, None)
    assert fields("vllm:suffix")[1:3] == ("vllm_builtin", "suffix")
    assert fields("vllm:dflash:/m")[1:] == ("vllm_builtin", "dflash", "/m")
    for bad in ("vllm:local:draft_model", "vllm:medusa2"):
        with pytest.raises(SpecServeError, match="--drafter"):
            drafter_from_spec(bad, 4, True)


def test_bench_serve_rounds_report_the_median_round_per_concurrency():
    from deployments.bench import median_rows

    rounds = [[{"concurrency": 1, "tokens_per_s": 10.0}, {"concurrency": 4, "tokens_per_s": 30.0}],
              [{"concurrency": 1, "tokens_per_s": 14.0}, {"concurrency": 4, "tokens_per_s": 20.0}],
              [{"concurrency": 1, "tokens_per_s": 12.0}, {"concurrency": 4, "tokens_per_s": 25.0}]]
    rows = median_rows(rounds)
    assert [r["tokens_per_s"] for r in rows] == [12.0, 25.0]
    assert rows[1]["rounds_tokens_per_s"] == [30.0, 20.0, 25.0]


@pytest.mark.parametrize("args, named", [
    (["--drafter", "ngram@everywhere"], "--drafter"),
    (["--rounds", "0"], "--rounds"),
])
def test_bench_serve_refuses_bad_options_in_one_line(args, named):
    out = run_cli_here("bench-serve", "--no-vllm-peers", "--prompts", "prompts/code.jsonl", "--out", "/tmp/never", *args)
    assert out.returncode == 2, out.stderr
    assert named in out.stderr and "Traceback" not in out.stderr, out.stderr


# One vLLM start (slow): remote n-gram drafting also starts a local Ray and a draft worker, so the logs of
# vLLM's engine core child, of Ray and of this process are all in play. -v raises them to INFO.
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.real_model
def test_generate_json_on_engine_vllm_prints_one_document_and_every_log_on_stderr(default_dir):
    pytest.importorskip("vllm")
    out = run_cli("-v", "generate", "--engine", "vllm", "--model", str(default_dir), "--dtype", "fp32",
                  "--drafter", "ngram", "--max-tokens", "8", "--ignore-eos", "--json", "The days of the week are",
                  timeout=850)
    assert out.returncode == 0, out.stderr[-5000:]
    data = one_json_document(out.stdout)
    assert data["engine"] == "vllm" and len(data["token_ids"]) == 8
    assert "INFO specserve.cli: generate: engine vllm" in out.stderr  # ours
    assert "Started a local Ray instance" in out.stderr  # Ray's driver log at INFO
    assert "(EngineCore pid=" in out.stderr and "Initializing a V1 LLM engine" in out.stderr  # vLLM's child
