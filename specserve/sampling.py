"""Turning logits into distributions, and verifying a draft block against the target.

Vocabulary (as in the speculative decoding literature and vLLM):

* **draft tokens**: the k tokens a drafter proposes, ``d_1..d_k``.
* **accepted tokens**: the longest prefix of the draft that verification keeps.
* **recovered token**: at the first rejected position, a token resampled from the residual
  distribution ``norm(max(0, p - q))``; with greedy decoding, the target's argmax.
* **bonus token**: when all k draft tokens are accepted, one more token sampled from the
  target's distribution after ``d_k`` (free: the verification pass computed it).

Every verification step therefore commits ``num_accepted + 1`` tokens. With ``q`` the
draft's distribution and ``p`` the target's, accepting ``d_i`` with probability
``min(1, p(d_i) / q(d_i))`` and resampling from the residual on rejection yields tokens
distributed exactly as ``p`` (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023,
arXiv 2302.01318). Temperature, top-k and top-p are applied identically to both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specserve.config import SamplingParams
from specserve.tree import ROOT, DraftTree


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p to ``logits`` [n, vocab] and return probabilities [n, vocab] (fp32).

    Must not be called with temperature 0 (greedy uses the argmax of the raw logits).
    """
    logits = logits.float() / params.temperature  # [n, vocab]
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # [n, vocab]
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded when the request has a seed, else from entropy."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from ``probs`` [vocab]."""
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator).item())


@dataclass
class Verdict:
    """What verification of one block decided."""

    tokens: list[int]  # accepted draft tokens, then the recovered or bonus token
    num_accepted: int  # how many draft tokens were accepted (0..k)


def verify_block(
    target_logits: torch.Tensor,
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> Verdict:
    """Accept a prefix of ``draft_tokens`` and add one target token.

    target_logits: [k + 1, vocab]: row i is the target's next-token logits after draft token i
        (row 0 after the last committed token).
    draft_tokens: the k draft tokens.
    draft_probs: [k, vocab] the drafter's distribution q for each draft token, or None when the
        drafter proposes deterministically (n-gram lookup, greedy drafts): q is then one-hot.
    """
    k = len(draft_tokens)
    assert target_logits.shape[0] == k + 1, (target_logits.shape, k)
    if params.greedy:
        target_argmax = target_logits.argmax(dim=-1).tolist()  # [k + 1]
        n = 0
        while n < k and draft_tokens[n] == target_argmax[n]:
            n += 1
        return Verdict(draft_tokens[:n] + [target_argmax[n]], n)

    assert generator is not None, "sampling needs a generator"
    p = logits_to_probs(target_logits, params).cpu()  # [k + 1, vocab]
    if k == 0:
        return Verdict([sample(p[0], generator)], 0)
    idx = torch.tensor(draft_tokens, dtype=torch.long)  # [k]
    p_draft = p[:-1].gather(1, idx[:, None]).squeeze(1).double()  # [k]: p(d_i)
    if draft_probs is None:
        q_draft = torch.ones(k, dtype=torch.float64)  # one-hot q: q(d_i) = 1
    else:
        draft_probs = draft_probs.float().cpu()
        q_draft = draft_probs.gather(1, idx[:, None]).squeeze(1).double()  # [k]: q(d_i)
    # float64 uniforms: with fp32, u can round to exactly 1.0 and tiny acceptance ratios lose precision.
    u = torch.rand(k, dtype=torch.float64, generator=generator)  # [k]
    # A drafter cannot have sampled a token it gave zero probability; guard the division anyway.
    ratio = torch.where(q_draft > 0, p_draft / q_draft.clamp_min(1e-300), (p_draft > 0).double())
    accepted = u < ratio.clamp(max=1.0)  # [k]
    n = int(accepted.long().cumprod(0).sum().item())
    if n == k:
        return Verdict(list(draft_tokens) + [sample(p[k], generator)], k)
    if draft_probs is None:
        q_row = torch.zeros_like(p[n])
        q_row[draft_tokens[n]] = 1.0
    else:
        q_row = draft_probs[n]
    residual = (p[n] - q_row).clamp_min(0.0)  # [vocab]: norm(max(0, p - q))
    if residual.sum() <= 0:
        # p == q up to rounding: rejection had probability ~0; p itself is the right distribution.
        residual = p[n]
    return Verdict(list(draft_tokens[:n]) + [sample(residual, generator)], n)


@dataclass
class TreeVerdict(Verdict):
    """What verification of one draft tree decided: ``tokens`` and ``num_accepted`` as for a block,
    plus the accepted path as node indices of the tree (``num_accepted`` of them)."""

    path: list[int] = field(default_factory=list)


def verify_tree(
    target_logits: torch.Tensor,
    tree: DraftTree,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> TreeVerdict:
    """Accept one root-to-node path of ``tree`` and add one target token.

    target_logits: [n + 1, vocab]: row 0 is the target's next-token logits after the root (the
        newest committed token), row i + 1 after the path ending in node i.

    Greedy: from the root, follow the child whose token is the target's argmax as long as one
    exists; the argmax after the last accepted node is the recovered (or, at a leaf, bonus) token.

    Sampling (multi-branch rejection sampling; SpecInfer arXiv 2305.09781, recursive rejection
    sampling arXiv 2402.14160): at an accepted node with target distribution p the residual r starts
    as p, and the children are tried in turn. A child x drawn from the proposal q_i is accepted with
    probability min(1, r(x) / q_i(x)); on rejection r becomes norm(max(0, r - q_i)). Conditioned on
    any history, each try returns exactly r, so the committed token is distributed as p. If every
    child is rejected, the recovered token is drawn from the last residual; at a leaf the bonus
    token from p.

    * Deterministic tree (``tree.q`` None: top-k choices, n-gram matches, pruning): q_i is one-hot
      at the child, so x is accepted with probability r(x) and rejection zeroes r(x). Children are
      tried most probable first; any order is exact.
    * Sampled tree: siblings are successive draws without replacement from ``q`` of their parent,
      tried in node order; q_i is that q with the earlier siblings removed and renormalised.
    """
    n = len(tree)
    assert target_logits.shape[0] == n + 1, (target_logits.shape, n)
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(i)

    if params.greedy:
        target_argmax = target_logits.argmax(dim=-1).tolist()  # [n + 1]
        path, node = [], ROOT
        while True:
            want = target_argmax[node + 1]
            nxt = next((c for c in children.get(node, []) if tree.tokens[c] == want), None)
            if nxt is None:
                return TreeVerdict([tree.tokens[i] for i in path] + [want], len(path), path)
            path.append(nxt)
            node = nxt

    assert generator is not None, "sampling needs a generator"
    p = logits_to_probs(target_logits, params).cpu()  # [n + 1, vocab]
    q_all = tree.q.float().cpu() if tree.q is not None else None  # [n + 1, vocab]
    path, node = [], ROOT
    while True:
        kids = children.get(node, [])
        if not kids:  # a leaf (or an empty tree): the bonus token
            return TreeVerdict([tree.tokens[i] for i in path] + [sample(p[node + 1], generator)], len(path), path)
        if q_all is None:
            kids = sorted(kids, key=lambda c: -tree.node_probs[c])
        residual = p[node + 1].double()  # [vocab]: r, starts as p
        q = q_all[node + 1].double().clone() if q_all is not None else None  # [vocab]: q_i
        accepted = None
        for c in kids:
            x = tree.tokens[c]
            # float64 uniforms, as in verify_block: u must stay below 1 and tiny ratios keep precision.
            u = float(torch.rand(1, dtype=torch.float64, generator=generator))
            if q is None:
                if u < float(residual[x]):
                    accepted = c
                    break
                residual[x] = 0.0
            else:
                q_sum = q.sum()
                q_i = q / q_sum if q_sum > 0 else q  # [vocab]: q without the earlier siblings
                # A draw with q_i(x) = 0 cannot happen; guard the division anyway.
                ratio = float(residual[x] / q_i[x]) if q_i[x] > 0 else float(residual[x] > 0)
                if u < min(1.0, ratio):
                    accepted = c
                    break
                residual = (residual - q_i).clamp_min(0.0)
                q[x] = 0.0
            total = residual.sum()
            if total <= 0:
                # r was (up to rounding) all on rejected children: that had probability ~0; p is right.
                residual = p[node + 1].double()
            else:
                residual = residual / total
        if accepted is None:
            tokens = [tree.tokens[i] for i in path] + [sample(residual, generator)]
            return TreeVerdict(tokens, len(path), path)
        path.append(accepted)
        node = accepted
