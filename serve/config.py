"""The one deployment schema: the `args` of the Serve application in `ray_config.yaml`, the Helm chart's
`serveConfigV2`, and `v4ray serve`. Validated once, at the edge."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ConfigDict, Field, model_validator

from v4ray.engine.config import EngineConfig, check_custom_resources

ENV_API_KEY = "V4RAY_API_KEY"
ENV_CACHE_DIR = "V4RAY_CACHE_DIR"


class ServeConfig(EngineConfig):
    """Arguments of `v4ray.serve.app:build_app`: the engine's (EngineConfig, defaults there) plus serving."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("v4-tiny", description="Checkpoint directory, or a tiny preset name (v4-tiny, ...) whose "
                                              "checkpoint is created under model_cache_dir on first use.")
    served_model_name: str | None = Field(None, description="Model id clients send; default: the model's name.")
    model_cache_dir: str | None = Field(None, description=f"Where preset checkpoints are created (default "
                                                          f"${ENV_CACHE_DIR} or ~/.cache/v4ray).")
    max_queue_len: int = Field(64, ge=0, description="Requests that may wait beyond the running ones; more get "
                                                     "429 with Retry-After.")
    max_n: int = Field(8, ge=1, description="Largest `n` a request may ask for.")
    request_timeout_s: float = Field(600.0, gt=0, description="Per-request deadline; past it the request is "
                                                              "aborted with 408.")
    max_body_bytes: int = Field(1 << 20, gt=0, description="Largest request body; larger ones get 413.")
    api_key_file: str | None = Field(None, description=f"File holding the API key for /v1 routes (or set "
                                                       f"${ENV_API_KEY}); never put the key itself here.")
    max_output_entries: int = Field(1 << 18, ge=1, description="Cap on n x (logprobs + 1) x max_tokens of one "
                                                               "request (what it makes the server produce and send); "
                                                               "larger requests get 400.")
    num_replicas: int = Field(1, ge=1, description="Model replicas (V4Server), each a whole engine: one process, or "
                                                   "its routers and expert shards. They share the KVCacheService.")
    autoscaling_config: dict | None = Field(None, description="Ray Serve autoscaling of the model replicas "
                                                              "(min_replicas, max_replicas, target_ongoing_requests, "
                                                              "...); replaces num_replicas.")
    prefix_affinity_tokens: int = Field(512, ge=0, description="With several replicas, send requests whose prompts "
                                                               "share their first tokens (up to this many, in whole "
                                                               "128-token units) to the same replica while it is not "
                                                               "overloaded; 0: Serve's default routing.")
    ingress_resources: dict[str, float] = Field({}, description="Ray resources the OpenAIIngress replica needs "
                                                               "(it reserves no CPU), e.g. a custom resource only the "
                                                               "head node declares, to keep it beside a HeadOnly "
                                                               "proxy: a host that dies cuts the open connections of "
                                                               "an ingress on it.")
    enable_docs: bool = Field(False, description="Serve /docs and /openapi.json (off: they describe the API to "
                                                 "anyone who can reach the port).")

    @model_validator(mode="after")
    def _scaling(self):
        from v4ray.model.kv_format import PREFIX_UNIT

        if 0 < self.prefix_affinity_tokens < PREFIX_UNIT:
            raise ValueError(f"prefix_affinity_tokens must be 0 (off) or at least {PREFIX_UNIT} (one cached prefix "
                             f"unit), got {self.prefix_affinity_tokens}")
        check_custom_resources("ingress_resources", self.ingress_resources, "the ingress")
        if self.autoscaling_config is not None and self.num_replicas != 1:
            raise ValueError("set either num_replicas or autoscaling_config (its min_replicas / max_replicas), not both")
        return self

    def max_replicas(self) -> int:
        """The most model replicas that may run (an embedded Ray is sized for them)."""
        a = self.autoscaling_config
        return self.num_replicas if a is None else max(1, int(a.get("max_replicas", 1)))

    def replicated(self) -> bool:
        return self.max_replicas() > 1

    @model_validator(mode="after")
    def _devices(self):
        """The engine runs in Ray actors (the V4Server, or routers and shards): a GPU it reserves must be used, and
        a GPU it uses must be reserved."""
        from v4ray.cluster.placement import device_problem

        problem = device_problem(self, in_actor=True)
        if problem:
            raise ValueError(problem)
        return self

    def engine_config(self) -> EngineConfig:
        """The engine part, with the model resolved to its checkpoint directory."""
        return EngineConfig(**{**self.engine_fields(), "model": str(self.resolve_model())})

    def cache_dir(self) -> Path:
        return Path(self.model_cache_dir or os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "v4ray")

    def resolve_model(self, create: bool = True) -> Path:
        """The checkpoint directory; a tiny preset's is created if missing."""
        from v4ray.model.config import preset_names

        p = Path(self.model)
        if p.exists():
            return p
        if self.model in preset_names() and self.model.startswith("v4-tiny"):
            d = self.cache_dir() / "models" / self.model
            if not (d / "config.json").exists():
                if not create:
                    raise FileNotFoundError(f"{d} does not exist yet")
                from v4ray.model.tiny import make_tiny

                make_tiny(d, preset=self.model, dtype="bf16" if self.dtype == "bfloat16" else "fp32")
            return d
        raise ValueError(f"model: {self.model!r} is neither a checkpoint directory nor a tiny preset")

    def api_key(self) -> str | None:
        if self.api_key_file:
            key = Path(self.api_key_file).read_text().strip()
            if not key:
                raise ValueError(f"api_key_file {self.api_key_file} is empty")
            return key
        return os.environ.get(ENV_API_KEY) or None
