"""The target side: per-sequence KV caches, one forward pass per verification, acceptance, rollback.

Cache invariant: a sequence's cache holds every committed token except the newest one.
A step feeds ``[newest] + draft`` (k + 1 tokens for a chain, n + 1 for a tree of n nodes), gets
one next-token distribution per input, accepts n draft tokens plus one recovered/bonus token, and
keeps in the cache only the committed prefix (prior + newest + n accepted), dropping the rejected
entries. :meth:`Verifier.verify` does this for any batch of chains and trees in one pass; plain
decoding is the same step with k = 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from specserve.config import SamplingParams
from specserve.models import LoadedModel
from specserve.sampling import Verdict, make_generator, verify_block, verify_tree
from specserve.tree import ROOT, DraftTree, ancestor_matrix


@dataclass
class TargetState:
    """What the target keeps for one sequence."""

    cache: DynamicCache
    params: SamplingParams
    generator: torch.Generator | None
    num_cached: int = 0


@dataclass
class StepRequest:
    """One sequence's block to verify."""

    seq_id: str
    last_id: int
    draft_tokens: list[int]
    draft_probs: torch.Tensor | None = None  # [k, vocab] or None (deterministic draft)


@dataclass
class TreeStepRequest:
    """One sequence's draft tree to verify."""

    seq_id: str
    last_id: int
    tree: DraftTree


@dataclass
class StepResult:
    """Verification outcome of one block, with the target hidden states a drafter may need."""

    verdict: Verdict
    # [num_accepted + 1, len(layers) * hidden]: features of the inputs the cache kept (newest + accepted).
    hidden: torch.Tensor | None = None
    verify_time_s: float = 0.0
    # Draft tokens verified when a batching verifier checked only a prefix of the block (None: all of it).
    num_verified: int | None = None


@dataclass
class Verifier:
    """Verifies blocks and draft trees for many sequences against one target model.

    ``hidden_layers`` lists target layers whose hidden states are returned with each step
    (for drafters conditioned on the target); empty means none are computed.
    """

    target: LoadedModel
    hidden_layers: tuple[int, ...] = ()
    states: dict[str, TargetState] = field(default_factory=dict)

    @torch.inference_mode()
    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams) -> torch.Tensor | None:
        """Prefill all prompt tokens but the last; return their hidden features if requested."""
        cache = DynamicCache(config=self.target.model.config)
        gen = None if params.greedy else make_generator(params.seed)
        state = TargetState(cache, params, gen)
        self.states[seq_id] = state
        prefix = prompt_ids[:-1]
        if not prefix:
            return None
        out = self._forward(state, prefix, logits=False)
        state.num_cached = len(prefix)
        return self._features(out, 0, len(prefix))

    def free(self, seq_id: str) -> None:
        """Forget a sequence (finished, aborted, or its client went away)."""
        self.states.pop(seq_id, None)

    @torch.inference_mode()
    def verify(self, reqs: list[StepRequest | TreeStepRequest]) -> list[StepResult]:
        """Verify chains and draft trees of distinct sequences in one forward pass (the one entry point).

        Every request is a tree below its newest token (a chain is a tree of single children,
        :meth:`DraftTree.chain`): input 0 of a row is the newest token, input ``j + 1`` node ``j``,
        at position ``cache length + depth``. Caches of different lengths are left-padded to a
        common length, inputs right-padded; each row's additive 4D mask shows its inputs its real
        cache entries and their ancestors in the row's tree (padding inputs see only themselves).
        Then every row is accepted here: a chain with ``verify_block``, a tree with ``verify_tree``
        (its verdict a :class:`specserve.sampling.TreeVerdict`), and the cache keeps the newest token
        and the accepted inputs only (for a tree the accepted path is moved in place to follow the
        newest token: ``num_accepted`` entries per layer, where re-feeding it would cost a second pass).

        A batch of one sequence skips the padding: it runs on its own cache (no copy of it, no
        slice of a batched one), and a chain (a tree without branches too) passes no mask or positions
        at all, the plain causal pass that plain decoding (k = 0) is, so greedy outputs stay bit-identical to it in fp32.
        A 4D mask gives logits bit-identical to the 2D padding mask of the same chains (fp32 and
        bf16, SDPA and eager, the tiny and the real model) and is not slower, so chains use it too.
        """
        if not reqs:
            return []
        t0 = time.perf_counter()
        states = [self.states[r.seq_id] for r in reqs]
        trees = [r.tree if isinstance(r, TreeStepRequest) else DraftTree.chain(list(r.draft_tokens)) for r in reqs]
        lens = [s.num_cached for s in states]  # cached entries per row before the pass
        sizes = [len(t) + 1 for t in trees]  # inputs per row: the newest token and the draft
        batch, max_len, max_in = len(reqs), max(lens), max(sizes)
        device, dtype = self.target.device, self.target.dtype
        input_ids = torch.zeros(batch, max_in, dtype=torch.long)  # [B, m]
        for i, (req, tree, m) in enumerate(zip(reqs, trees, sizes)):
            input_ids[i, :m] = torch.tensor([req.last_id] + tree.tokens)
        if batch == 1 and trees[0].is_chain:
            # One chain (a block, or a tree drafter's tree without branches): plain causal attention after the
            # cache, as plain decoding; a 4D mask would cost a tree's pass (~8% more on the CPU) for nothing.
            mask = positions = None
        else:
            positions = torch.zeros(batch, max_in, dtype=torch.long)  # [B, m]
            visible = torch.zeros(batch, max_in, max_len + max_in, dtype=torch.bool)  # [B, m, L + m]
            for i, (tree, n_cached, m) in enumerate(zip(trees, lens, sizes)):
                positions[i] = n_cached
                positions[i, :m] += torch.tensor([0] + tree.depths)
                visible[i, :m, max_len - n_cached : max_len] = True
                visible[i, :m, max_len : max_len + m] = ancestor_matrix([ROOT] + [p + 1 for p in tree.parents])
                visible[i, torch.arange(m, max_in), max_len + torch.arange(m, max_in)] = True
            mask = torch.zeros(batch, 1, max_in, max_len + max_in, dtype=dtype)  # [B, 1, m, L + m]
            mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
            mask, positions = mask.to(device), positions.to(device)
        out = self._model(
            max_in,
            input_ids=input_ids.to(device),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=states[0].cache if batch == 1 else _stack_caches([s.cache for s in states], lens, max_len),
            use_cache=True,
            output_hidden_states=bool(self.hidden_layers),
        )
        pass_s = (time.perf_counter() - t0) / batch  # the shared pass, split evenly
        results = []
        for i, (req, state, tree, n_cached, m) in enumerate(zip(reqs, states, trees, lens, sizes)):
            t1 = time.perf_counter()
            logits = out.logits[i, :m]  # [m, vocab]
            if isinstance(req, TreeStepRequest):
                verdict: Verdict = verify_tree(logits, tree, state.params, state.generator)
                kept = [0] + [node + 1 for node in verdict.path]  # input indices: the root, then the accepted path
            else:
                verdict = verify_block(logits, req.draft_tokens, req.draft_probs, state.params, state.generator)
                kept = list(range(verdict.num_accepted + 1))  # the newest token and the accepted prefix
            if batch > 1:  # row i of the batched cache, without the padding: its entries up to the last kept input
                state.cache = _row_cache(out.past_key_values, i, max_len - n_cached, max_len + kept[-1] + 1)
            _keep_slots(state.cache, n_cached, kept)
            state.num_cached = n_cached + len(kept)
            hidden = self._features(out, i, kept)
            results.append(StepResult(verdict, hidden, pass_s + time.perf_counter() - t1))
        return results

    def _forward(self, state: TargetState, inputs: list[int], logits: bool = True):
        """One sequence's plain causal pass over ``inputs`` (the prefill of :meth:`add`).

        ``logits=False`` computes only the last row's logits (a prefill never uses them).
        """
        ids = torch.tensor([inputs], device=self.target.device)  # [1, m]
        out = self._model(
            len(inputs) if logits else 1,
            input_ids=ids,
            past_key_values=state.cache,
            use_cache=True,
            output_hidden_states=bool(self.hidden_layers),
        )
        state.num_cached += len(inputs)
        return out

    def _model(self, num_logits: int, **kwargs):
        """The target's forward with logits for the last ``num_logits`` input positions of every row.

        On the CPU the LM head's matrix product (rows x vocabulary, the largest in the model) is
        much slower for some row counts than for the next multiple of 4 (MKL on this project's
        AVX2 machines: 3 rows cost 1.6-2x what 4 rows cost; docs/benchmarks.md), so the kept
        positions are padded to a multiple of 4 by repeating the last one, and the logits of the
        repeats are dropped. A prefill asks for one row: its logits are never used.
        """
        batch, seq_len = kwargs["input_ids"].shape
        # Repeats per row that make the head's row count (batch x kept positions) a multiple of 4.
        pad = next(p for p in range(4) if batch * (num_logits + p) % 4 == 0) if num_logits > 1 else 0
        if pad == 0 or self.target.device.type != "cpu":
            return self.target.model(**kwargs, logits_to_keep=num_logits)
        keep = torch.arange(seq_len - num_logits, seq_len + pad, device=self.target.device).clamp_(max=seq_len - 1)
        out = self.target.model(**kwargs, logits_to_keep=keep)
        out.logits = out.logits[:, :num_logits]
        return out

    def _features(self, out, row: int, kept: int | list[int]) -> torch.Tensor | None:
        """[len(kept), len(layers) * hidden] target features of row ``row``'s inputs ``kept`` (an int n: the first n)."""
        if not self.hidden_layers:
            return None
        if isinstance(kept, list) and kept == list(range(len(kept))):
            kept = len(kept)
        rows = slice(0, kept) if isinstance(kept, int) else torch.tensor(kept, device=self.target.device)
        # hidden_states[0] is the embedding output; layer j's output is hidden_states[j + 1].
        return torch.cat([out.hidden_states[j + 1][row, rows] for j in self.hidden_layers], dim=-1)


def _stack_caches(caches: list[DynamicCache], lens: list[int], max_len: int) -> DynamicCache:
    """One batched cache from per-sequence caches, left-padded with zeros to ``max_len``.

    A sequence whose prompt was a single token has an empty (uninitialised) cache: it is all padding.
    """
    filled = next((c for c, n in zip(caches, lens) if n > 0), None)
    if filled is None:
        return DynamicCache()
    layers = []
    for li, template in enumerate(filled.layers):
        ks, vs = [], []
        for c, n in zip(caches, lens):
            if n == 0:
                shape = (1, template.keys.shape[1], max_len, template.keys.shape[3])
                ks.append(template.keys.new_zeros(shape))
                vs.append(template.values.new_zeros(shape))
                continue
            k, v = c.layers[li].keys, c.layers[li].values  # [1, heads, n, dim]
            pad = max_len - n
            if pad:
                k = torch.nn.functional.pad(k, (0, 0, pad, 0))
                v = torch.nn.functional.pad(v, (0, 0, pad, 0))
            ks.append(k)
            vs.append(v)
        layers.append((torch.cat(ks), torch.cat(vs)))
    return DynamicCache(ddp_cache_data=layers)


def _row_cache(cache: DynamicCache, row: int, start: int, end: int) -> DynamicCache:
    """Row ``row`` of a batched cache, positions [start, end), as a batch-1 cache."""
    return DynamicCache(
        ddp_cache_data=[
            (layer.keys[row : row + 1, :, start:end].contiguous(), layer.values[row : row + 1, :, start:end].contiguous())
            for layer in cache.layers
        ]
    )


def _keep_slots(cache: DynamicCache, base: int, kept: list[int]) -> None:
    """Keep cache entries ``base + kept`` (ascending) right after the first ``base`` and drop the rest."""
    if kept != list(range(len(kept))):
        src = torch.tensor(kept, device=cache.layers[0].keys.device) + base  # [len(kept)]
        for layer in cache.layers:  # keys/values: [1, kv_heads, base + n + 1, head_dim]
            layer.keys[:, :, base : base + len(kept)] = layer.keys.index_select(2, src)
            layer.values[:, :, base : base + len(kept)] = layer.values.index_select(2, src)
    drop = cache.get_seq_length() - (base + len(kept))
    if drop:
        cache.crop(-drop)  # transformers 5.x: a negative count of entries to drop
