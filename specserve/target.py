"""The target side: per-sequence KV caches, one forward pass per block, acceptance, rollback.

Cache invariant: a sequence's cache holds every committed token except the newest one.
A step feeds ``[newest] + draft`` (k + 1 tokens), gets k + 1 next-token distributions,
accepts n draft tokens plus one recovered/bonus token, and crops the cache back to the
committed prefix (prior + newest + n accepted), dropping the k - n rejected entries.
Plain decoding is the same step with k = 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from specserve.config import SamplingParams
from specserve.models import LoadedModel
from specserve.sampling import TreeVerdict, Verdict, make_generator, verify_block, verify_tree
from specserve.tree import DraftTree, flatten


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
    """Verifies blocks for many sequences against one target model.

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

    def verify(self, reqs: list[StepRequest | TreeStepRequest]) -> list[StepResult]:
        """Verify any mix of chains and trees of distinct sequences in one forward pass.

        The one entry point for callers: it picks the cheapest pass that fits the batch (one
        sequence, chains only with a 2D mask, or chains and trees with per-row 4D masks).
        """
        has_tree = any(isinstance(r, TreeStepRequest) for r in reqs)
        if len(reqs) == 1:
            return [self.step_tree(reqs[0]) if has_tree else self.step(reqs[0])]  # type: ignore[arg-type]
        return self.step_mixed(reqs) if has_tree else self.step_batch(reqs)  # type: ignore[arg-type]

    @torch.inference_mode()
    def step(self, req: StepRequest) -> StepResult:
        """Verify one sequence's block in one forward pass."""
        t0 = time.perf_counter()
        state = self.states[req.seq_id]
        inputs = [req.last_id] + list(req.draft_tokens)
        out = self._forward(state, inputs)
        logits = out.logits[0]  # [k + 1, vocab]
        return self._accept(state, req, logits, out, 0, time.perf_counter() - t0)

    @torch.inference_mode()
    def step_batch(self, reqs: list[StepRequest]) -> list[StepResult]:
        """Verify several sequences' blocks (ragged lengths) in one batched forward pass.

        Caches of different lengths are left-padded to a common length and inputs right-padded;
        the attention mask hides the padding and explicit position ids keep RoPE exact.
        """
        if len(reqs) == 1:
            return [self.step(reqs[0])]
        t0 = time.perf_counter()
        states = [self.states[r.seq_id] for r in reqs]
        inputs = [[r.last_id] + list(r.draft_tokens) for r in reqs]
        lens = [s.num_cached for s in states]
        max_len, max_in = max(lens), max(len(x) for x in inputs)
        device = self.target.device
        pad_id = 0
        input_ids = torch.tensor([x + [pad_id] * (max_in - len(x)) for x in inputs], device=device)  # [B, m]
        mask = torch.zeros(len(reqs), max_len + max_in, dtype=torch.long, device=device)  # [B, L + m]
        for i, (n_cached, x) in enumerate(zip(lens, inputs)):
            mask[i, max_len - n_cached : max_len + len(x)] = 1
        positions = torch.stack([torch.arange(n, n + max_in, device=device) for n in lens])  # [B, m]
        cache = _stack_caches([s.cache for s in states], lens, max_len)
        out = self._model(
            max_in,
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=bool(self.hidden_layers),
        )
        elapsed = time.perf_counter() - t0
        results = []
        for i, (req, state, x) in enumerate(zip(reqs, states, inputs)):
            # Row i's cache is its real prefix plus its real inputs, without the padding.
            state.cache = _row_cache(out.past_key_values, i, max_len - lens[i], max_len + len(x))
            state.num_cached = lens[i] + len(x)
            logits = out.logits[i, : len(x)]  # [k_i + 1, vocab]
            results.append(self._accept(state, req, logits, out, i, elapsed / len(reqs), fed=len(x)))
        return results

    @torch.inference_mode()
    def step_tree(self, req: TreeStepRequest) -> StepResult:
        """Verify one sequence's draft tree in one forward pass; the cache keeps only the accepted path.

        The rows of the accepted path are moved in place to follow the newest token and the rest
        is cropped: this copies ``num_accepted`` entries per layer, where re-feeding the path would
        cost a second forward pass. The result's verdict is a :class:`TreeVerdict`.
        """
        t0 = time.perf_counter()
        state = self.states[req.seq_id]
        base = state.num_cached
        ids, mask, positions = flatten(req.tree, req.last_id, base, self.target.dtype)
        device = self.target.device
        out = self._model(
            len(ids),
            input_ids=torch.tensor([ids], device=device),  # [1, n + 1]
            attention_mask=mask.to(device),  # [1, 1, n + 1, base + n + 1]
            position_ids=positions.to(device),  # [1, n + 1]
            past_key_values=state.cache,
            use_cache=True,
            output_hidden_states=bool(self.hidden_layers),
        )
        logits = out.logits[0]  # [n + 1, vocab]
        verdict: TreeVerdict = verify_tree(logits, req.tree, state.params, state.generator)
        kept = [0] + [node + 1 for node in verdict.path]  # input indices: the root, then the accepted path
        _keep_slots(state.cache, base, kept)
        state.num_cached = base + len(kept)
        hidden = None
        if self.hidden_layers:
            rows = torch.tensor(kept, device=device)
            hidden = torch.cat([out.hidden_states[j + 1][0, rows] for j in self.hidden_layers], dim=-1)
        return StepResult(verdict, hidden, time.perf_counter() - t0)

    @torch.inference_mode()
    def step_mixed(self, reqs: list[StepRequest | TreeStepRequest]) -> list[StepResult]:
        """Verify chains and trees of several sequences in one batched forward pass.

        Each row gets its own 4D additive mask: its real cache entries (caches are left-padded to a
        common length), then its inputs as a tree (a chain is a tree of single children); padding
        inputs see only themselves. Positions are each row's cache length + depth. Chains are then
        accepted with ``verify_block`` exactly as :meth:`step` does, trees as :meth:`step_tree` does.
        """
        t0 = time.perf_counter()
        states = [self.states[r.seq_id] for r in reqs]
        trees = [r.tree if isinstance(r, TreeStepRequest) else DraftTree.chain(list(r.draft_tokens)) for r in reqs]
        lens = [s.num_cached for s in states]
        max_len, max_in = max(lens), max(len(t) + 1 for t in trees)
        batch, device, dtype = len(reqs), self.target.device, self.target.dtype
        input_ids = torch.zeros(batch, max_in, dtype=torch.long)  # [B, m]
        positions = torch.zeros(batch, max_in, dtype=torch.long)  # [B, m]
        visible = torch.zeros(batch, max_in, max_len + max_in, dtype=torch.bool)  # [B, m, L + m]
        for i, (req, tree, n_cached) in enumerate(zip(reqs, trees, lens)):
            ids, row_mask, row_pos = flatten(tree, req.last_id, n_cached, dtype)
            m = len(ids)
            input_ids[i, :m] = torch.tensor(ids)
            positions[i, :m] = row_pos[0]
            positions[i, m:] = n_cached
            visible[i, :m, max_len - n_cached : max_len] = True
            visible[i, :m, max_len : max_len + m] = row_mask[0, 0, :, n_cached:] == 0
            visible[i, torch.arange(m, max_in), max_len + torch.arange(m, max_in)] = True
        mask = torch.zeros(batch, 1, max_in, max_len + max_in, dtype=dtype)  # [B, 1, m, L + m]
        mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
        out = self._model(
            max_in,
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            past_key_values=_stack_caches([s.cache for s in states], lens, max_len),
            use_cache=True,
            output_hidden_states=bool(self.hidden_layers),
        )
        elapsed = (time.perf_counter() - t0) / batch
        results = []
        for i, (req, state, tree, n_cached) in enumerate(zip(reqs, states, trees, lens)):
            m = len(tree) + 1
            state.cache = _row_cache(out.past_key_values, i, max_len - n_cached, max_len + m)
            state.num_cached = n_cached + m
            logits = out.logits[i, :m]  # [m, vocab]
            if not isinstance(req, TreeStepRequest):
                results.append(self._accept(state, req, logits, out, i, elapsed, fed=m))
                continue
            verdict = verify_tree(logits, tree, state.params, state.generator)
            kept = [0] + [node + 1 for node in verdict.path]
            _keep_slots(state.cache, n_cached, kept)
            state.num_cached = n_cached + len(kept)
            hidden = None
            if self.hidden_layers:
                rows = torch.tensor(kept, device=device)
                hidden = torch.cat([out.hidden_states[j + 1][i, rows] for j in self.hidden_layers], dim=-1)
            results.append(StepResult(verdict, hidden, elapsed))
        return results

    def _forward(self, state: TargetState, inputs: list[int], logits: bool = True):
        """One sequence's pass over ``inputs``; ``logits=False`` (a prefill) computes only the last row's."""
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

    def _accept(self, state: TargetState, req: StepRequest, logits: torch.Tensor, out, row: int,
                elapsed: float, fed: int | None = None) -> StepResult:
        verdict = verify_block(logits, req.draft_tokens, req.draft_probs, state.params, state.generator)
        fed = fed if fed is not None else len(req.draft_tokens) + 1
        drop = fed - (verdict.num_accepted + 1)  # rejected draft entries to remove from the cache
        if drop:
            state.cache.crop(-drop)
            state.num_cached -= drop
        hidden = self._features(out, row, verdict.num_accepted + 1) if self.hidden_layers else None
        return StepResult(verdict, hidden, elapsed)

    def _features(self, out, row: int, n: int) -> torch.Tensor | None:
        if not self.hidden_layers:
            return None
        # hidden_states[0] is the embedding output; layer j's output is hidden_states[j + 1].
        return torch.cat([out.hidden_states[j + 1][row, :n] for j in self.hidden_layers], dim=-1)


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
