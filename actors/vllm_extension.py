"""What vLLM mixes into its worker for specserve (``worker_extension_cls``), called by ``collective_rpc``.

vLLM builds our proposer (``actors.vllm_proposer.VllmLocalProposer`` or ``VllmRemoteProposer``) inside its model
runner and gives it token ids only. The engine's host attaches the proposer to that runner
through this declared hook right after the engine starts (and refuses to serve if it cannot),
so the proposer reads each running request's ``sampling_params.extra_args`` (the per-request
``speculative`` switch); the host reads the proposer's counters the same way.
"""

from __future__ import annotations


class ProposerExtension:
    """Methods added to vLLM's worker class; each runs in every worker process."""

    def _specserve_proposer(self):
        from actors.vllm_proposer import VllmProposer

        runner = getattr(self, "model_runner", None)
        proposer = getattr(runner, "drafter", None)
        return (runner, proposer) if isinstance(proposer, VllmProposer) else (runner, None)

    def specserve_attach(self) -> bool:
        """Give the proposer its model runner; False when this worker runs no specserve proposer."""
        runner, proposer = self._specserve_proposer()
        if proposer is None:
            return False
        proposer.runner = runner
        return True

    def specserve_suffix_take(self) -> list:
        """The outputs this worker's requests finished since the last call, as (tenant, tokens) ([] where this
        worker's suffix drafter does not share its cache)."""
        _, proposer = self._specserve_proposer()
        return proposer.take_shared() if hasattr(proposer, "take_shared") else []

    def specserve_suffix_learn(self, outputs: list) -> int:
        """Add other replicas' finished outputs, (tenant, tokens), to this worker's suffix cache."""
        _, proposer = self._specserve_proposer()
        return proposer.learn_shared(outputs) if hasattr(proposer, "learn_shared") else 0

    def specserve_stats(self) -> dict:
        """The proposer's counters ({} where this worker runs none)."""
        _, proposer = self._specserve_proposer()
        return proposer.stats() if proposer is not None and proposer.active else {}
