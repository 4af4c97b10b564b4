"""Prompt sources: the truncated ShareGPT file, the held-out and train splits, JSON-lines files."""

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


def _normalized(text: str) -> str:
    return " ".join(text.split())


def test_sharegpt_train_prompts_are_train_first_turns_and_never_a_held_out_prompt():
    train = load_prompts("sharegpt-train:100000")  # every usable one
    held = load_prompts("sharegpt:100000")
    assert len(train) > 7000 and len(held) > 800
    assert all(int(p["id"].rsplit("-", 1)[1]) % 10 != 0 and p["set"] == "sharegpt-train" for p in train)
    assert not {_normalized(p["prompt"]) for p in train} & {_normalized(p["prompt"]) for p in held}
    # ShareGPT repeats conversations under other indices: by index alone the splits would share prompts.
    repeated = {_normalized(turns[0]["content"]) for _, turns in sharegpt_conversations("train")}
    assert repeated & {_normalized(p["prompt"]) for p in held}
    assert load_prompts("sharegpt-train:5") == train[:5]


@pytest.mark.parametrize("source", ["sharegpt-train:0", "sharegpt-train:x", "sharegpt-train:", "nothing-here.jsonl"])
def test_prompt_source_errors_name_the_flag_they_came_from(source):
    with pytest.raises(SpecServeError) as e:
        load_prompts(source, "--warm-prompts")
    assert e.value.param == "--warm-prompts" and e.value.message.startswith("--warm-prompts ")


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
