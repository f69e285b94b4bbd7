"""`build_app`: the Serve application of `ray_config.yaml` — an OpenAIIngress in front of one V4Server."""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from .config import ServeConfig


def build_app(args: dict | None = None) -> Application:
    """Validate the args once (pydantic, errors name the field), make sure the model exists (a tiny preset's
    checkpoint is created when missing), and assemble the deployments. The V4Server reserves its replica's
    placement group: one bundle for itself, plus one per router and expert shard when distributed."""
    from v4ray.serve.deployments import OpenAIIngress, V4Server

    cfg = ServeConfig(**(args or {}))
    cfg.resolve_model()
    bundles = [{"CPU": 1}]
    if cfg.num_expert_shards:
        bundles += [{"CPU": 1}] * (cfg.num_routers + cfg.num_expert_shards)
    limit = cfg.max_num_seqs * cfg.num_routers + cfg.max_queue_len + 16
    server = serve.deployment(V4Server).options(
        name="V4Server", num_replicas=1, max_ongoing_requests=limit, placement_group_bundles=bundles,
        placement_group_strategy="PACK" if not cfg.num_expert_shards else "SPREAD",
        # a dead engine fails 3 checks in ~6 s; Serve then replaces the replica with no operator
        health_check_period_s=2, health_check_timeout_s=10, graceful_shutdown_timeout_s=5).bind(cfg.model_dump())
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", num_replicas=1, max_ongoing_requests=4 * limit + 64,
        ray_actor_options={"num_cpus": 0})
    return ingress.bind(server, cfg.model_dump())
