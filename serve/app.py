"""`build_app`: the Serve application of `ray_config.yaml` — an OpenAIIngress in front of one V4Server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ServeConfig

if TYPE_CHECKING:   # Ray is imported on use: `v4ray serve` reads the placement before it starts (and so imports) Ray
    from ray.serve import Application

def server_placement(cfg: ServeConfig) -> tuple[list[dict[str, float]], str]:
    """The V4Server replica's placement group: bundles and strategy. Bundle 0 holds the replica (and the engine
    when it runs in one process); a distributed replica adds one bundle per router, then one per expert shard."""
    from v4ray.cluster.placement import RANK_RESOURCES, layout_bundles

    if not cfg.num_expert_shards:
        return [dict(RANK_RESOURCES)], "PACK"
    return [dict(RANK_RESOURCES)] + layout_bundles(cfg.num_routers, cfg.num_expert_shards, RANK_RESOURCES,
                                                   RANK_RESOURCES), "SPREAD"


def build_app(args: dict | None = None) -> Application:
    """Validate the args once (pydantic, errors name the field), make sure the model exists (a tiny preset's
    checkpoint is created when missing), and assemble the deployments. The V4Server reserves its replica's
    placement group: one bundle for itself, plus one per router and expert shard when distributed."""
    from ray import serve

    from v4ray.serve.deployments import OpenAIIngress, V4Server

    cfg = ServeConfig(**(args or {}))
    cfg.resolve_model()
    bundles, strategy = server_placement(cfg)
    limit = cfg.max_num_seqs * cfg.num_routers + cfg.max_queue_len + 16
    server = serve.deployment(V4Server).options(
        name="V4Server", num_replicas=1, max_ongoing_requests=limit, placement_group_bundles=bundles,
        placement_group_strategy=strategy,
        # a dead engine fails 3 checks in ~6 s; Serve then replaces the replica with no operator
        health_check_period_s=2, health_check_timeout_s=10, graceful_shutdown_timeout_s=5).bind(cfg.model_dump())
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", num_replicas=1, max_ongoing_requests=4 * limit + 64,
        ray_actor_options={"num_cpus": 0})
    return ingress.bind(server, cfg.model_dump())
