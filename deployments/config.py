"""The Serve application's configuration: what ``deployments.app:build_app`` accepts.

The same model validates ``specserve serve --config FILE``, the args a RayService's
``serveConfigV2`` passes to the builder, and (through the JSON schema the Helm chart
ships) the chart's values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from actors.config import ReplicaConfig, RouterConfig
from cluster.config import TopologyConfig, check_draft_placement
from specserve.config import DrafterConfig, ModelConfig, StrictModel, check_engine_fits, load_yaml, validated


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling of one deployment (the ingress, or the model replicas)."""

    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest ingress replicas.")
    max_replicas: int = Field(2, ge=1, le=1000, description="Most ingress replicas.")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class ServeConfig(StrictModel):
    """HTTP endpoint and Serve deployment options."""

    model_name: str = Field(
        "smollm2-135m-instruct", description="Name clients pass as 'model' and /v1/models lists."
    )
    host: str = Field("127.0.0.1", description="HTTP bind address for `specserve serve`.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port for `specserve serve`.")
    replica_autoscaling: AutoscalingConfig = Field(
        default_factory=lambda: AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=32),
        description="Autoscaling of model replicas: each SpecServer replica answers HTTP and owns its own draft "
        "workers and target groups (the topology), so scaling it adds whole copies of the topology.",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context limit (prompt + max_tokens); None: the model's own."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body in bytes, checked before it is read whole or "
        "parsed; beyond it 413 JSON. The default holds a context of about a million tokens of text.",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest pause while a request body arrives before its declared end; "
        "beyond it 400 JSON (a client that stalls or lied about Content-Length is not waited for).",
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    speculative: bool = Field(
        True, description="Default of the per-request 'speculative' extension: false makes requests that do not "
        "say otherwise decode plainly.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of accepted API keys (one per line or comma-separated), read once when the ingress "
        "starts; None: $SPECSERVE_API_KEYS_FILE if set. Keys in $SPECSERVE_API_KEYS are accepted too. No key "
        "anywhere: authentication is off (fine on 127.0.0.1 only). See docs/api.md.",
    )
    cache_per_api_key: bool | None = Field(
        None,
        description="Keep drafters' cross-request caches (the suffix drafter's) per API key: one client's text "
        "then never speeds up another's requests, which would be a timing side channel; each key warms its own "
        "cache, capped as the shared one is (drafter.suffix_cache_*). None: on when API keys are configured. "
        "Without keys there is one shared cache per model replica.",
    )


#: Fields of the separate ingress deployment, gone since the model replica answers HTTP itself.
_REMOVED_SERVE_FIELDS = {
    "autoscaling": "serve.replica_autoscaling (the HTTP routes live on the model replicas)",
    "max_ongoing_requests": "router.max_running_requests and router.max_waiting_requests (admission is per model "
    "replica)",
}


def _refuse_removed_serve_fields(data: Any) -> Any:
    """A config naming a removed field gets an error that says what replaced it."""
    serve = data.get("serve") if isinstance(data, dict) else None
    for name, instead in _REMOVED_SERVE_FIELDS.items():
        if isinstance(serve, dict) and name in serve:
            raise ValueError(f"serve.{name} was removed: use {instead}")
    return data


class AppConfig(StrictModel):
    """Everything ``build_app`` needs: model, drafter, topology, router and serving options."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The target model.")
    drafter: DrafterConfig = Field(default_factory=DrafterConfig, description="The drafter.")
    topology: TopologyConfig = Field(default_factory=TopologyConfig, description="Where actors run.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Router behaviour.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="HTTP and Serve options.")

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> AppConfig:
        """Validate builder args (a dict; ``{'config': PATH}`` loads a YAML file)."""
        args = dict(args or {})
        if "config" in args:
            path = Path(args.pop("config"))
            args = {**load_yaml(path), **args}
        return validated(cls, args)  # type: ignore[return-value]

    _removed = model_validator(mode="before")(_refuse_removed_serve_fields)

    @model_validator(mode="after")
    def _engine_fits(self) -> AppConfig:
        check_engine_fits(self.model, self.drafter)  # raises SpecServeError naming the field
        check_draft_placement(self.drafter, self.topology, self.model.engine)
        return self

    def replica(self) -> ReplicaConfig:
        """What each model replica (SpecServer) needs from this config."""
        return ReplicaConfig(model=self.model, drafter=self.drafter, topology=self.topology, router=self.router,
                             model_name=self.serve.model_name, max_model_len=self.serve.max_model_len)

