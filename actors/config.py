"""What one model replica needs: model, drafter, topology and router settings (Ray-free, pydantic).

``deployments.config.AppConfig`` composes these with the HTTP options; the actors take
:class:`ReplicaConfig` and never look above themselves.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from cluster.config import TopologyConfig, check_draft_placement, drafts_in_router
from specserve.config import DrafterConfig, ModelConfig, StrictModel


class RouterConfig(StrictModel):
    """The router that moves blocks between draft workers and verifier groups."""

    pipelining: bool = Field(
        True,
        description="Draft the next block while the current one is verified, assuming full acceptance "
        "(discarded on a rejection). Applies to drafters with a cost (draft models); free n-gram lookup "
        "and drafters that need the target's hidden states are never pipelined.",
    )
    batching: bool = Field(True, description="Verify blocks of several sequences in one target pass.")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Most sequences in one verification pass.")
    batch_wait_fraction: float = Field(
        0.25, ge=0.0, le=2.0,
        description="A verification pass waits for the sequences of its group that are still drafting (an actor "
        "hop, a slow client) up to this fraction of the group's recent pass time, so that one step of every "
        "sequence runs as one batched pass instead of several; 0 never waits.",
    )
    max_running_requests: int = Field(
        64, ge=1, le=100000, description="Sequences decoded at once; more wait in the queue."
    )
    max_waiting_requests: int = Field(
        256, ge=0, le=1000000, description="Queued requests beyond which new ones get HTTP 503."
    )


class ReplicaConfig(StrictModel):
    """One model replica: its target groups, draft workers and router."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The target model.")
    drafter: DrafterConfig = Field(default_factory=DrafterConfig, description="The drafter.")
    topology: TopologyConfig = Field(default_factory=TopologyConfig, description="Where actors run.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Router behaviour.")
    model_name: str = Field("smollm2-135m-instruct", description="Served model name (metrics are tagged with it).")
    max_model_len: int | None = Field(
        None, ge=16, description="Context limit (prompt + max_tokens); None: the model's own."
    )

    @model_validator(mode="after")
    def _check_placement(self) -> ReplicaConfig:
        check_draft_placement(self.drafter, self.topology, self.model.engine)
        return self

    @property
    def drafts_in_router(self) -> bool:
        """True when this replica drafts inside its router process instead of on draft workers."""
        return drafts_in_router(self.drafter, self.topology)
