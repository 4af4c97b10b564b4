"""The command line: JSON output contract, and one clear line (no traceback) for every bad input."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_cli, run_cli_here


def test_generate_json_prints_the_contract_fields(tiny_dir):
    out = run_cli("generate", "--model", str(tiny_dir), "--dtype", "fp32", "--drafter", "ngram", "--k", "3",
                  "--max-tokens", "12", "--ignore-eos", "--json", "a b c a b c a b")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"text", "token_ids", "stats", "tokens_per_s"}
    assert len(data["token_ids"]) == 12
    assert set(data["stats"]) >= {"num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_position",
                                  "mean_accepted_length", "draft_time_s", "verify_time_s"}


def test_generate_greedy_equals_across_drafters_from_the_cli(tiny_dir):
    outs = []
    for drafter in ("none", "ngram", f"draft_model:{tiny_dir}"):
        out = run_cli_here("generate", "--model", str(tiny_dir), "--dtype", "fp32", "--drafter", drafter,
                      "--max-tokens", "16", "--ignore-eos", "--json", "one two three one two three one")
        assert out.returncode == 0, out.stderr
        outs.append(json.loads(out.stdout)["token_ids"])
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("args,flag", [
    (["--k", "-1"], "--k"),
    (["--k", "100000"], "--k"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--drafter", "magic"], "--drafter"),
    (["--drafter", "draft_model"], "--drafter"),
    (["--drafter", "draft_model:/no/such/dir"], "--drafter"),
    (["--model", "/no/such/model"], "--model"),
    (["--max-tokens", "0"], "--max-tokens"),
], ids=["k-negative", "k-absurd", "temperature-negative", "top-p-zero", "top-p-above-1", "unknown-drafter",
        "draft-model-without-path", "missing-draft-model", "missing-model", "max-tokens-zero"])
def test_bad_input_gives_one_clear_line_naming_the_flag(tiny_dir, args, flag):
    base = ["generate", "--dtype", "fp32"] + ([] if "--model" in args else ["--model", str(tiny_dir)])
    out = run_cli_here(*base, *args, "hello")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {flag}"), out.stderr
    assert "Traceback" not in out.stderr


def test_the_installed_command_refuses_bad_input_in_one_line_without_a_traceback(tiny_dir):
    out = run_cli("generate", "--model", "/no/such/model", "hello")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --model"), out.stderr
    assert "Traceback" not in out.stderr


def test_empty_prompt_is_refused(tiny_dir):
    out = run_cli_here("generate", "--model", str(tiny_dir), "   ")
    assert out.returncode == 2 and "prompt" in out.stderr and "Traceback" not in out.stderr


def test_prompt_longer_than_the_context_is_refused(tiny_dir):
    out = run_cli_here("generate", "--model", str(tiny_dir), "--dtype", "fp32", "word " * 3000)
    assert out.returncode == 2 and "context" in out.stderr and "Traceback" not in out.stderr


def test_draft_model_with_another_tokenizer_is_refused(tiny_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from specserve.models import make_tiny_model

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    other_dir = make_tiny_model(tmp_path / "other", other)
    out = run_cli_here("generate", "--model", str(tiny_dir), "--dtype", "fp32", "--drafter", f"draft_model:{other_dir}",
                  "hello")
    assert out.returncode == 2
    assert "tokenizer" in out.stderr and out.stderr.startswith("error: --drafter")
