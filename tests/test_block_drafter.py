"""The block drafter: exact greedy output, lossless sampling, checkpoints, clear config errors."""

from __future__ import annotations

import pytest
import torch
from distribution import (
    assert_drafts_accepted_and_rejected,
    chi_square_p_value,
    sample_outcomes,
    shifted,
    two_token_distribution,
)
from tiny_models import make_tiny_model

from specserve.config import DrafterConfig, ModelConfig, SamplingParams
from specserve.drafters import make_drafter
from specserve.drafters.block import (
    BlockDrafter,
    BlockDrafterConfig,
    build_model,
    default_checkpoint,
    drafter_config,
    save_checkpoint,
)
from specserve.engine import SpecEngine
from specserve.errors import SpecServeError
from specserve.models import load_model

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "Hello",
    "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4,",
]
TINY = BlockDrafterConfig(block_size=4, num_layers=2, target_layers=(0, 1))


def block_engine(target, drafter: BlockDrafter, k: int, adaptive: bool = False) -> SpecEngine:
    cfg = DrafterConfig(kind="block", num_speculative_tokens=k, adaptive_k=adaptive)
    return SpecEngine(target, drafter, cfg)


def plain(target, prompt, params) -> list[int]:
    cfg = DrafterConfig(kind="none", num_speculative_tokens=0)
    return SpecEngine(target, make_drafter(cfg, target), cfg).generate(prompt, params).token_ids


@pytest.fixture(scope="module")
def random_drafter(tiny_target) -> BlockDrafter:
    torch.manual_seed(0)
    return BlockDrafter(build_model(TINY, tiny_target).eval())


@pytest.mark.parametrize("k,adaptive", [(1, False), (4, False), (8, False), (4, True)])
def test_greedy_output_with_block_drafter_equals_plain_greedy(tiny_target, random_drafter, k, adaptive):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    engine = block_engine(tiny_target, random_drafter, k, adaptive)
    drafted = 0
    for prompt in PROMPTS:
        result = engine.generate(prompt, params)
        assert result.token_ids == plain(tiny_target, prompt, params), (k, prompt)
        drafted += result.stats.num_draft_tokens
    assert drafted > 0
    assert not random_drafter.states, "finished sequences must free their drafter state"


def test_block_drafter_accepting_everything_keeps_its_context_in_step(tiny_target, random_drafter, monkeypatch):
    """Force whole blocks to be accepted (draft = the target's own greedy tokens) and check bookkeeping."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    reference = plain(tiny_target, PROMPTS[0], params)
    prompt_ids = tiny_target.tokenizer.encode(PROMPTS[0])
    original = BlockDrafter.propose

    def oracle(self, seq_id, token_ids, k):
        block = original(self, seq_id, token_ids, k)  # runs the real pass (and its length check)
        done = len(token_ids) - len(prompt_ids)
        block.token_ids = reference[done:done + len(block.token_ids)]
        return block

    monkeypatch.setattr(BlockDrafter, "propose", oracle)
    result = block_engine(tiny_target, random_drafter, 4).generate(prompt_ids, params)
    assert result.token_ids == reference
    assert result.stats.mean_accepted_length == 5.0


def steer_towards_target(monkeypatch, drafter: BlockDrafter, target) -> None:
    """Make ``drafter`` draft from the target's own next-token logits, halved, 3rd and 4th likeliest swapped.

    A random drafter never proposes the tiny target's likely tokens, so every draft token would be
    rejected and a distribution test would never run the acceptance branch. The steered q overlaps the
    target's p without equalling it: drafts are accepted and rejected. q depends only on the committed
    tokens (the same at every block position), so it is a valid proposal; the network's own pass still
    runs, with its bookkeeping check, and the drafter's sampling code is unchanged.
    """
    original = drafter._block_logits

    def steered(state, seq_id, token_ids, k):
        logits = original(state, seq_id, token_ids, k)  # [k, draft vocab]
        wanted = target.model(torch.tensor([token_ids])).logits[0, -1]  # [vocab]
        if drafter.model.draft_vocab is not None:
            wanted = wanted[drafter.model.draft_vocab]  # [draft vocab]
        wanted = wanted / 2
        third, fourth = torch.topk(wanted, 4).indices[2:].tolist()
        wanted[[third, fourth]] = wanted[[fourth, third]]
        return wanted.to(logits.dtype).expand_as(logits).clone()

    monkeypatch.setattr(drafter, "_block_logits", steered)


def test_sampling_with_block_drafter_preserves_the_target_distribution(tiny_target, random_drafter, monkeypatch):
    prompt_ids = tiny_target.tokenizer.encode(PROMPTS[2])
    params = SamplingParams(max_tokens=2, temperature=2.0, top_k=3, ignore_eos=True)
    expected = two_token_distribution(tiny_target, prompt_ids, params)
    assert len(expected) == 9
    n = 1500
    steer_towards_target(monkeypatch, random_drafter, tiny_target)
    engine = block_engine(tiny_target, random_drafter, 4)
    counts, stats = sample_outcomes(engine, prompt_ids, params, n)
    assert engine.drafter.states == {}
    assert_drafts_accepted_and_rejected(stats)
    assert chi_square_p_value(counts, expected, n) > 1e-3
    # The same counts reject a distribution that moves 7% of the mass between the two likeliest
    # outcomes: the experiment is large enough to see a bias of that size.
    assert chi_square_p_value(counts, shifted(expected, 0.07), n) < 1e-3


def block_tree_engine(target, drafter: BlockDrafter, k: int, nodes: int) -> SpecEngine:
    from specserve.config import TreeConfig
    from specserve.drafters.tree import TreeDrafter

    cfg = DrafterConfig(kind="block", num_speculative_tokens=k, adaptive_k=False,
                        tree=TreeConfig(max_nodes=nodes, branching=3, adaptive=False))
    return SpecEngine(target, TreeDrafter(drafter, cfg.tree), cfg)


def test_block_drafter_lattice_trees_keep_greedy_exact(tiny_target, random_drafter):
    """The block's positions are independent distributions: a lattice of their top tokens is a draft tree."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    engine = block_tree_engine(tiny_target, random_drafter, 4, nodes=12)
    for prompt in PROMPTS:
        assert engine.generate(prompt, params).token_ids == plain(tiny_target, prompt, params), prompt
    assert engine.drafter.num_nodes > 0
    assert not random_drafter.states


def test_block_drafter_position_probs_rank_what_propose_drafts(tiny_target, random_drafter):
    ids = tiny_target.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=8)
    hidden = tiny_target_features(tiny_target, random_drafter, ids)
    random_drafter.start("p", ids, params, hidden)
    try:
        probs = random_drafter.position_probs("p", ids, 4)
        block = random_drafter.propose("p", ids, 4)
    finally:
        random_drafter.finish("p")
    assert probs.shape == (4, random_drafter.vocab_size)
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-4)
    assert probs.argmax(-1).tolist() == block.token_ids


def tiny_target_features(target, drafter: BlockDrafter, ids: list[int]) -> torch.Tensor:
    """The target features of all prompt tokens but the newest, as the verifier's prefill returns them."""
    from specserve.target import Verifier

    verifier = Verifier(target, hidden_layers=drafter.target_layers)
    try:
        return verifier.add("f", ids, SamplingParams())
    finally:
        verifier.free("f")


def test_sampling_with_block_drafter_trees_preserves_the_target_distribution(tiny_target, random_drafter,
                                                                             monkeypatch):
    prompt_ids = tiny_target.tokenizer.encode(PROMPTS[2])
    params = SamplingParams(max_tokens=2, temperature=2.0, top_k=3, ignore_eos=True)
    expected = two_token_distribution(tiny_target, prompt_ids, params)
    n = 1500
    steer_towards_target(monkeypatch, random_drafter, tiny_target)
    engine = block_tree_engine(tiny_target, random_drafter, 2, nodes=6)
    nodes_before = engine.drafter.num_nodes
    counts, stats = sample_outcomes(engine, prompt_ids, params, n)
    assert engine.drafter.num_nodes - nodes_before > n, "the trees must branch for the test to mean anything"
    assert_drafts_accepted_and_rejected(stats)
    assert chi_square_p_value(counts, expected, n) > 1e-3
    assert chi_square_p_value(counts, shifted(expected, 0.07), n) < 1e-3


@pytest.fixture(scope="module")
def trimmed_drafter(tiny_target) -> BlockDrafter:
    """A random drafter over a 256-token draft vocabulary holding the tiny target's greedy tokens."""
    torch.manual_seed(1)
    model = build_model(TINY.model_copy(update={"draft_vocab_size": 256}), tiny_target).eval()
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    seen = sorted({t for prompt in PROMPTS for t in plain(tiny_target, prompt, params)})
    rest = [t for t in range(1000, 5000) if t not in seen]
    model.set_draft_vocab(torch.tensor(sorted(seen + rest[: 256 - len(seen)])))
    return BlockDrafter(model)


def test_trimmed_vocabulary_drafts_only_its_tokens_and_greedy_stays_exact(tiny_target, trimmed_drafter):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    engine = block_engine(tiny_target, trimmed_drafter, 4)
    vocab = set(trimmed_drafter.model.draft_vocab.tolist())
    proposed: list[int] = []
    original = trimmed_drafter.propose

    def spy(seq_id, token_ids, k):
        block = original(seq_id, token_ids, k)
        proposed.extend(block.token_ids)
        return block

    trimmed_drafter.propose = spy
    try:
        for prompt in PROMPTS:
            assert engine.generate(prompt, params).token_ids == plain(tiny_target, prompt, params), prompt
    finally:
        del trimmed_drafter.propose
    assert proposed and set(proposed) <= vocab
    assert trimmed_drafter.model.logits_dim == 256


@pytest.mark.timeout(2400)  # 1500 generations: slow when other suites share the 2 cores
def test_sampling_with_trimmed_vocabulary_preserves_the_target_distribution(tiny_target, trimmed_drafter,
                                                                            monkeypatch):
    prompt_ids = tiny_target.tokenizer.encode(PROMPTS[2])
    params = SamplingParams(max_tokens=2, temperature=2.0, top_k=3, ignore_eos=True)
    expected = two_token_distribution(tiny_target, prompt_ids, params)
    block = trimmed_drafter
    block.start("probe", prompt_ids, params.model_copy(update={"seed": 0}))
    q = block.propose("probe", prompt_ids, 2).probs  # [2, vocab]: zero outside the draft vocabulary
    block.finish("probe")
    assert q.shape[1] == tiny_target.model.config.vocab_size
    outside = torch.ones(q.shape[1], dtype=torch.bool)
    outside[block.model.draft_vocab] = False
    assert float(q[:, outside].abs().sum()) == 0.0 and torch.allclose(q.sum(1), torch.ones(2))
    n = 1500
    steer_towards_target(monkeypatch, block, tiny_target)
    engine = block_engine(tiny_target, block, 4)
    counts, stats = sample_outcomes(engine, prompt_ids, params, n)
    assert_drafts_accepted_and_rejected(stats)
    assert chi_square_p_value(counts, expected, n) > 1e-3
    assert chi_square_p_value(counts, shifted(expected, 0.07), n) < 1e-3


def test_trimmed_checkpoint_keeps_its_vocabulary_exactly(tiny_target, trimmed_drafter, tmp_path):
    path = save_checkpoint(tmp_path / "t.pt", trimmed_drafter.model, tiny_target)  # bf16 weights
    loaded = make_drafter(DrafterConfig(kind="block", path=str(path)), tiny_target)
    assert torch.equal(loaded.model.draft_vocab, trimmed_drafter.model.draft_vocab)
    assert loaded.model.draft_vocab.dtype == torch.long


def test_checkpoint_round_trips(tiny_target, random_drafter, tmp_path):
    path = save_checkpoint(tmp_path / "d.pt", random_drafter.model, tiny_target, {"note": "test"},
                           dtype=torch.float32)
    loaded = make_drafter(DrafterConfig(kind="block", path=str(path)), tiny_target)
    assert isinstance(loaded, BlockDrafter)
    assert loaded.model.cfg == random_drafter.model.cfg
    theirs = loaded.model.state_dict()
    for name, value in random_drafter.model.state_dict().items():
        assert torch.equal(value, theirs[name]), name
    assert set(theirs) == {name for name, _ in random_drafter.model.named_parameters()}, "only own weights"
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    a = block_engine(tiny_target, random_drafter, 4).generate(PROMPTS[0], params)
    b = block_engine(tiny_target, loaded, 4).generate(PROMPTS[0], params)
    assert a.stats.num_accepted_tokens == b.stats.num_accepted_tokens


def test_checkpoint_for_another_target_is_refused(tiny_target, random_drafter, tokenizer, tmp_path):
    other_dir = make_tiny_model(tmp_path / "other", tokenizer, seed=7)  # same shapes, other weights
    other = load_model(ModelConfig(model=str(other_dir), dtype="fp32"))
    path = save_checkpoint(tmp_path / "d.pt", random_drafter.model, other)
    with pytest.raises(SpecServeError) as e:
        make_drafter(DrafterConfig(kind="block", path=str(path)), tiny_target)
    assert "another target" in str(e.value) and "embeddings differ" in str(e.value)
    wide = load_model(ModelConfig(model=str(make_tiny_model(tmp_path / "wide", tokenizer, hidden_size=32)),
                                  dtype="fp32"))
    with pytest.raises(SpecServeError) as e:
        make_drafter(DrafterConfig(kind="block", path=str(path)), wide)
    assert "hidden_size 64 vs 32" in str(e.value)


def test_missing_or_foreign_checkpoint_is_a_clear_error(tiny_target, tmp_path):
    with pytest.raises(SpecServeError, match="not found"):
        make_drafter(DrafterConfig(kind="block", path=str(tmp_path / "nope.pt")), tiny_target)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(SpecServeError, match="not a specserve block drafter checkpoint"):
        make_drafter(DrafterConfig(kind="block", path=str(tmp_path / "foreign.pt")), tiny_target)


@pytest.mark.parametrize("data,needle", [
    ({"block_size": 0}, "block_size"),
    ({"num_layers": 0}, "num_layers"),
    ({"target_layers": [1, 1]}, "distinct"),
    ({"heads": 3}, "heads"),
])
def test_bad_drafter_config_is_a_clear_error(data, needle):
    with pytest.raises(SpecServeError) as e:
        drafter_config(data)
    assert needle in str(e.value)


def test_target_layers_beyond_the_target_are_refused(tiny_target):
    with pytest.raises(SpecServeError, match=r"target_layers \[5\] do not exist: the target has 2 layers"):
        build_model(BlockDrafterConfig(target_layers=(0, 5)), tiny_target)


def test_default_checkpoint_is_none_or_an_existing_file():
    path = default_checkpoint()
    assert path is None or path.is_file()
