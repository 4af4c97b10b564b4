"""Verifier.verify, the one verification pass: its choices per batch (one sequence on its own cache, a
lone chain as a plain causal pass, a 4D per-row mask otherwise) and what every row gets back."""

from __future__ import annotations

import pytest
import torch

from specserve.config import SamplingParams
from specserve.target import StepRequest, TreeStepRequest, Verifier
from specserve.tree import ROOT, DraftTree

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "Hello",
    "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4,",
]


def spy(verifier: Verifier) -> list[dict]:
    """Record the keyword arguments of every target forward the verifier runs."""
    calls: list[dict] = []
    model = verifier._model

    def recording(num_logits, **kwargs):
        calls.append(kwargs)
        return model(num_logits, **kwargs)

    verifier._model = recording
    return calls


def small_tree(first: int) -> DraftTree:
    tree = DraftTree()
    tree.add(11, ROOT, 0.6)
    a = tree.add(first, ROOT, 0.4)
    tree.add(12, a, 0.5)
    return tree


def test_one_chain_is_a_plain_causal_pass_on_its_own_cache(tiny_target):
    """No mask, no positions, no copy of the cache: the pass plain decoding (k = 0) is."""
    prompt = tiny_target.tokenizer.encode(PROMPTS[0])
    verifier = Verifier(tiny_target)
    verifier.add("s", prompt, SamplingParams())
    cache = verifier.states["s"].cache
    calls = spy(verifier)
    for draft in ([], [5, 6, 7]):
        verifier.verify([StepRequest("s", prompt[-1], draft)])
    assert all(c["attention_mask"] is None and c["position_ids"] is None for c in calls)
    assert all(c["past_key_values"] is cache for c in calls)
    assert verifier.states["s"].cache is cache


def test_one_tree_runs_on_its_own_cache_with_a_tree_mask(tiny_target):
    prompt = tiny_target.tokenizer.encode(PROMPTS[0])
    verifier = Verifier(tiny_target)
    verifier.add("s", prompt, SamplingParams())
    cache, base = verifier.states["s"].cache, verifier.states["s"].num_cached
    calls = spy(verifier)
    verifier.verify([TreeStepRequest("s", prompt[-1], small_tree(7))])
    (call,) = calls
    assert call["past_key_values"] is cache and verifier.states["s"].cache is cache
    assert call["attention_mask"].shape == (1, 1, 4, base + 4)
    assert call["position_ids"].tolist() == [[base, base + 1, base + 1, base + 2]]


def test_one_tree_without_branches_is_verified_as_its_chain(tiny_target):
    """A tree drafter's tree that did not branch costs what its chain costs (no mask) and gets the same
    verdict, cache and logits path as the chain of its tokens."""
    prompt = tiny_target.tokenizer.encode(PROMPTS[1])
    verifiers = {}
    for name in ("chain", "tree"):
        v = verifiers[name] = Verifier(tiny_target)
        v.add("s", prompt, SamplingParams())
    greedy = verifiers["chain"].verify([StepRequest("s", prompt[-1], [])])[0].verdict.tokens[0]
    verifiers["tree"].verify([StepRequest("s", prompt[-1], [])])
    draft = [greedy, 5, 6]
    assert DraftTree.chain(draft).is_chain and not small_tree(7).is_chain
    calls = spy(verifiers["tree"])
    (chain,) = verifiers["chain"].verify([StepRequest("s", greedy, draft[1:])])
    (tree,) = verifiers["tree"].verify([TreeStepRequest("s", greedy, DraftTree.chain(draft[1:]))])
    (call,) = calls
    assert call["attention_mask"] is None and call["position_ids"] is None
    assert tree.verdict.tokens == chain.verdict.tokens
    assert verifiers["tree"].states["s"].num_cached == verifiers["chain"].states["s"].num_cached
    for a, b in zip(verifiers["tree"].states["s"].cache.layers, verifiers["chain"].states["s"].cache.layers):
        assert torch.equal(a.keys, b.keys)


@pytest.mark.parametrize("with_trees", [False, True])
def test_batch_rows_get_the_verdicts_features_and_caches_of_single_passes(tiny_target, with_trees, attn):
    """Ragged caches (one empty), chains (some empty) and trees in one padded pass: per row the same
    verdict, the features of the kept inputs and a cache of exactly the committed prefix (under each
    attention implementation: ``attn``)."""
    params = SamplingParams(max_tokens=10)
    prompts = [tiny_target.tokenizer.encode(p) for p in PROMPTS]
    prompts[2] = prompts[2][:1]  # a one-token prompt: an empty cache, all padding in the batch
    single, batched = Verifier(tiny_target, hidden_layers=(0, 1)), Verifier(tiny_target, hidden_layers=(0, 1))
    for i, ids in enumerate(prompts):
        single.add(f"s{i}", ids, params)
        batched.add(f"s{i}", ids, params)
    for step in range(3):
        reqs = []
        for i, ids in enumerate(prompts):
            with torch.inference_mode():
                best = tiny_target.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
            if with_trees and (i + step) % 2:
                reqs.append(TreeStepRequest(f"s{i}", ids[-1], small_tree(best)))
            else:
                reqs.append(StepRequest(f"s{i}", ids[-1], [best, 7, 8, 9][: (i + step) % 4]))
        one = [single.verify([r])[0] for r in reqs]
        many = batched.verify(reqs)
        assert [a.verdict for a in one] == [b.verdict for b in many]
        for i, (a, b) in enumerate(zip(one, many)):
            assert b.hidden.shape == (b.verdict.num_accepted + 1, 2 * tiny_target.model.config.hidden_size)
            torch.testing.assert_close(a.hidden, b.hidden, atol=1e-4, rtol=1e-4)
            sa, sb = single.states[f"s{i}"], batched.states[f"s{i}"]
            assert sa.num_cached == sb.num_cached == sb.cache.get_seq_length() == len(prompts[i]) + b.verdict.num_accepted
            for la, lb in zip(sa.cache.layers, sb.cache.layers):
                torch.testing.assert_close(la.keys, lb.keys, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(la.values, lb.values, atol=1e-4, rtol=1e-4)
            prompts[i] = prompts[i] + b.verdict.tokens


def test_an_empty_batch_runs_nothing(tiny_target):
    verifier = Verifier(tiny_target)
    calls = spy(verifier)
    assert verifier.verify([]) == []
    assert not calls
