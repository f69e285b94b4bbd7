"""`build_app`: the Serve application of `ray_config.yaml` — an OpenAIIngress in front of one V4Server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ServeConfig

if TYPE_CHECKING:   # Ray is imported on use: `v4ray serve` reads the placement before it starts (and so imports) Ray
    from ray.serve import Application

def server_bundles(cfg: ServeConfig) -> list[dict[str, float]]:
    """The V4Server replica's placement group. Bundle 0 holds the replica, and the engine when it runs in one process
    (then with gpus_per_router GPUs); a distributed replica adds one bundle per router, then one per expert shard,
    each with its gpus_per_router / gpus_per_shard GPUs (the ReplicaConfig's bundles, in the same order)."""
    from v4ray.cluster.placement import layout_bundles, rank_resources

    if not cfg.num_expert_shards:
        return [rank_resources(cfg.gpus_per_router)]
    return [rank_resources()] + layout_bundles(cfg.num_routers, cfg.num_expert_shards,
                                               rank_resources(cfg.gpus_per_router), rank_resources(cfg.gpus_per_shard))


def server_placement(cfg: ServeConfig,
                     nodes: list[dict[str, float]] | None = None) -> tuple[list[dict[str, float]], str]:
    """Bundles and strategy of the V4Server replica's placement group: PACK when one node of `nodes` holds all of
    it, else SPREAD (`choose_strategy`). `nodes`: default the connected cluster's, when Ray is connected."""
    from v4ray.cluster.placement import choose_strategy, cluster_nodes

    bundles = server_bundles(cfg)
    if nodes is None:
        import sys

        ray = sys.modules.get("ray")   # never imported here: `v4ray serve` sizes its Ray from the bundles first
        nodes = cluster_nodes() if ray is not None and ray.is_initialized() else []
    return bundles, choose_strategy(bundles, nodes)


def server_actor_options(cfg: ServeConfig) -> dict:
    """The V4Server actor's resources, inside bundle 0: a CPU, and in one process the engine's GPUs (Ray then sets
    its CUDA_VISIBLE_DEVICES; the GPUs of a distributed replica are its ranks')."""
    from v4ray.cluster.placement import actor_options

    return {k: v for k, v in actor_options(server_bundles(cfg)[0]).items() if v is not None}


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
    scaling = ({"autoscaling_config": cfg.autoscaling_config} if cfg.autoscaling_config is not None
               else {"num_replicas": cfg.num_replicas})
    if cfg.replicated() and cfg.prefix_affinity_tokens:
        from ray.serve.config import RequestRouterConfig

        from v4ray.serve.routing import PrefixAffinityRouter

        scaling["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"affinity_tokens": cfg.prefix_affinity_tokens})
    server = serve.deployment(V4Server).options(
        name="V4Server", **scaling, max_ongoing_requests=limit, placement_group_bundles=bundles,
        placement_group_strategy=strategy, ray_actor_options=server_actor_options(cfg),
        # a dead engine fails 3 checks in ~6 s; Serve then replaces the replica with no operator
        health_check_period_s=2, health_check_timeout_s=10, graceful_shutdown_timeout_s=5).bind(cfg.model_dump())
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", num_replicas=1, max_ongoing_requests=4 * limit * cfg.max_replicas() + 64,
        ray_actor_options={"num_cpus": 0, **({"resources": cfg.ingress_resources} if cfg.ingress_resources else {})})
    return ingress.bind(server, cfg.model_dump())
