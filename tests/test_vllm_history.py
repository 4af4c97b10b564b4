"""Drafter state keyed by token history (no vLLM, no Ray), the load-aware k cap, and engine config checks."""

from __future__ import annotations

import pytest

from actors.vllm_proposer import k_cap
from specserve.config import DrafterConfig, ModelConfig, SamplingParams, check_engine_fits
from specserve.drafters.draft_model import DraftModelDrafter
from specserve.drafters.history import HistoryDrafter, common_prefix
from specserve.drafters.ngram import NgramDrafter
from specserve.errors import SpecServeError
from specserve.models import load_model


class CountingDrafter(NgramDrafter):
    """An n-gram drafter that records which state each call used (to see reuse)."""

    def __init__(self):
        super().__init__(1, 4)
        self.started: list[str] = []
        self.calls: list[tuple[str, int]] = []
        self.finished: list[str] = []
        self.states: dict[str, bool] = {}

    def start(self, seq_id, prompt_ids, params, target_hidden=None):
        self.started.append(seq_id)
        self.states[seq_id] = True

    def propose(self, seq_id, token_ids, k):
        self.calls.append((seq_id, len(token_ids)))
        return super().propose(seq_id, token_ids, k)

    def finish(self, seq_id):
        self.finished.append(seq_id)
        self.states.pop(seq_id, None)


def test_common_prefix_of_arrays():
    import numpy as np

    assert common_prefix(np.array([1, 2, 3]), np.array([1, 2, 4, 5])) == 2
    assert common_prefix(np.array([1, 2]), np.array([1, 2, 3])) == 2
    assert common_prefix(np.array([], dtype=np.int64), np.array([1])) == 0


def test_a_history_that_extends_a_cached_one_reuses_its_state():
    d = CountingDrafter()
    h = HistoryDrafter(d)
    a, b = [1, 2, 3, 1, 2], [7, 8, 9, 7, 8]
    h.propose_batch([a, b], 3)
    # Next step: each history grew by accepted drafts plus one token; the batch order changed.
    h.propose_batch([b + [9, 7], a + [3]], 3)
    assert len(d.started) == 2
    assert [s for s, _ in d.calls[2:]] == [d.calls[1][0], d.calls[0][0]]
    assert h.reused == 2


def test_rejected_tail_and_shorter_history_after_preemption_reuse_the_state():
    d = CountingDrafter()
    h = HistoryDrafter(d)
    base = list(range(100, 140))
    h.propose_batch([base + [1, 2, 3, 4]], 2)  # e.g. a pipelined guess that went past what was committed
    h.propose_batch([base + [1, 9]], 2)  # branches off within the slack: the same request
    h.propose_batch([base[:30]], 2)  # shorter than before (recomputed after preemption)
    assert len(d.started) == 1 and h.reused == 2


def test_identical_histories_in_one_batch_get_separate_states():
    d = CountingDrafter()
    h = HistoryDrafter(d)
    h.propose_batch([[5, 6, 7], [5, 6, 7]], 2)
    assert len(d.started) == 2 and len(h) == 2


def test_states_no_history_claims_are_evicted_and_the_count_is_bounded():
    d = CountingDrafter()
    h = HistoryDrafter(d, max_states=3, max_idle_calls=2)
    for i in range(5):
        h.propose_batch([[1000 + i, 1, 2, 3]], 2)
    assert len(h) <= 3
    for _ in range(4):
        h.propose_batch([], 2)
    assert len(h) == 0 and set(d.finished) == set(d.started)


def test_an_empty_history_or_zero_k_gets_no_draft():
    h = HistoryDrafter(CountingDrafter())
    assert h.propose_batch([[], [1, 2, 1]], [3, 0]) == [[], []]


def test_history_keyed_draft_model_drafts_what_the_per_sequence_drafter_drafts(tiny_dir, tiny_draft_dir):
    """A draft model reached by history (rollbacks included) proposes exactly what it proposes by id."""
    draft = load_model(ModelConfig(model=str(tiny_draft_dir), dtype="fp32"))
    by_history = HistoryDrafter(DraftModelDrafter(draft))
    by_id = DraftModelDrafter(draft)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7, 6]]
    for i, p in enumerate(prompts):
        by_id.start(str(i), p, SamplingParams())
    histories = [list(p) for p in prompts]
    for step in range(4):
        got = by_history.propose_batch(histories, 3)
        for i, hist in enumerate(histories):
            by_id.commit(str(i), hist)
            assert got[i] == by_id.propose(str(i), hist, 3).token_ids, (step, i)
        # Accept a different number of draft tokens per sequence, then a "bonus" token.
        histories = [hist + got[i][: (step + i) % 3] + [40 + step] for i, hist in enumerate(histories)]
    assert by_history.reused == 2 * 3


@pytest.mark.parametrize("batch, expected", [(1, 6), (2, 6), (3, 4), (8, 4), (9, 3), (500, 3)])
def test_an_optional_k_schedule_caps_by_batch_size(batch, expected):
    schedule = [[1, 2, 6], [3, 8, 4], [9, 4096, 3]]
    assert k_cap(schedule, batch, 6) == expected
    assert k_cap(schedule, batch, 2) == 2  # a cap, never more than the drafter's k
    # The default has no table: adaptive k prices draft tokens from the measured cost at every batch size.
    assert ModelConfig().vllm.k_per_batch_size is None and k_cap([], batch, 5) == 5


@pytest.mark.parametrize("model, drafter, param", [
    ({"engine": "vllm"}, {"kind": "block"}, "drafter.kind"),
    ({"engine": "vllm"}, {"kind": "ngram", "tree": {"max_nodes": 8}}, "drafter.tree.max_nodes"),
    ({"engine": "hf"}, {"vllm_placement": "vllm_builtin", "vllm_builtin_method": "ngram"}, "drafter.vllm_placement"),
    ({"engine": "hf"}, {"vllm_placement": "vllm_worker"}, "drafter.vllm_placement"),
    ({"engine": "vllm"}, {"kind": "draft_model", "path": "/m", "vllm_placement": "vllm_worker"},
     "drafter.vllm_placement"),
])
def test_a_drafter_the_engine_cannot_run_is_refused_naming_the_field(model, drafter, param):
    with pytest.raises(SpecServeError) as e:
        check_engine_fits(ModelConfig(**model), DrafterConfig(**drafter))
    assert e.value.param == param and param in e.value.message


@pytest.mark.parametrize("data, field", [
    ({"vllm": {"k_per_batch_size": [(2, 4, 3)]}}, "k_per_batch_size"),
    ({"vllm": {"k_per_batch_size": [(1, 4, 3), (3, 8, 2)]}}, "k_per_batch_size"),
    ({"engine": "tgi"}, "engine"),
])
def test_bad_vllm_model_settings_name_the_field(data, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        ModelConfig(**data)
    assert field in str(e.value)


def test_unknown_vllm_builtin_method_and_missing_path_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="vllm_builtin_method"):
        DrafterConfig(vllm_placement="vllm_builtin", vllm_builtin_method="medusa2")
    with pytest.raises(ValidationError, match="vllm_placement"):
        DrafterConfig(vllm_placement="remote")
    with pytest.raises(ValidationError, match="path"):
        DrafterConfig(vllm_placement="vllm_builtin", vllm_builtin_method="eagle3")
    # vLLM's own method and its placement go together.
    with pytest.raises(ValidationError, match="needs vllm_builtin_method"):
        DrafterConfig(vllm_placement="vllm_builtin")
    with pytest.raises(ValidationError, match="set vllm_placement 'vllm_builtin'"):
        DrafterConfig(vllm_builtin_method="ngram")


@pytest.mark.parametrize("old, new", [
    ("remote", {"vllm_placement": "draft_workers"}),
    ("local", {"vllm_placement": "vllm_worker"}),
    ("ngram", {"vllm_placement": "vllm_builtin", "vllm_builtin_method": "ngram"}),
    ("dflash", {"vllm_placement": "vllm_builtin", "vllm_builtin_method": "dflash"}),
])
def test_the_removed_vllm_method_is_refused_with_its_translation(old, new):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        DrafterConfig.model_validate({"vllm_method": old, "path": "/m"})
    message = str(e.value)
    assert e.value.errors()[0]["loc"] == ("vllm_method",)  # errors name drafter.vllm_method
    assert "vllm_placement" in message and "vllm_builtin_method" in message
    assert f"Replace 'vllm_method: {old}' with '{', '.join(f'{k}: {v}' for k, v in new.items())}'" in message
    DrafterConfig.model_validate({**new, "path": "/m"})  # the translation is valid


@pytest.mark.parametrize("given, engine, placement", [
    ({}, "vllm", "vllm_worker"),
    ({"model": {"engine": "hf"}}, "hf", None),
    ({"drafter": {"kind": "block"}}, None, None),
    ({"drafter": {"kind": "none"}}, "vllm", "draft_workers"),
])
def test_serve_defaults_pick_engine_vllm_only_where_the_config_is_silent_and_it_fits(given, engine, placement):
    from specserve.config import apply_serve_defaults

    out = apply_serve_defaults(given)
    assert out.get("model", {}).get("engine") == engine
    if placement:
        assert DrafterConfig.model_validate(out.get("drafter", {})).vllm_placement == placement
