"""Prompt sources: the truncated ShareGPT file, the held-out split, JSON-lines files."""

from __future__ import annotations

import json

import pytest

from specserve.data import iter_sharegpt, load_prompts, sharegpt_conversations
from specserve.errors import SpecServeError


def test_truncated_json_array_yields_every_complete_item(tmp_path):
    items = [{"id": i, "conversations": [{"from": "human", "value": "x" * (i * 50)}]} for i in range(40)]
    text = json.dumps(items)
    cut = text[: text.index('{"id": 37') + 20]  # stop in the middle of item 37
    path = tmp_path / "cut.json"
    path.write_text(cut)
    got = list(iter_sharegpt(path, chunk_chars=97))  # tiny chunks exercise the refill path
    assert [g["id"] for g in got] == list(range(37))


def test_complete_json_array_is_read_to_the_end(tmp_path):
    path = tmp_path / "full.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert list(iter_sharegpt(path)) == [{"a": 1}, {"a": 2}]


def test_sharegpt_wheel_parses_about_17_6k_conversations_and_splits_disjointly():
    count = sum(1 for _ in iter_sharegpt())
    assert 17_000 <= count <= 18_000
    held = {i for i, _ in sharegpt_conversations("held_out")}
    train = {i for i, _ in sharegpt_conversations("train")}
    assert held and train and not held & train
    assert all(i % 10 == 0 for i in held)


def test_sharegpt_prompts_source(tmp_path):
    prompts = load_prompts("sharegpt:5")
    assert len(prompts) == 5 and all(p["prompt"].strip() for p in prompts)
    with pytest.raises(SpecServeError):
        load_prompts("sharegpt:zero")


def test_jsonl_prompt_file_errors_name_the_line(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": "x"}\n')
    assert [p["id"] for p in load_prompts(str(good))] == ["p-1", "x"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "no prompt"}\n')
    with pytest.raises(SpecServeError, match="bad.jsonl:2"):
        load_prompts(str(bad))
    with pytest.raises(SpecServeError, match="not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))
