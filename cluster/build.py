"""`build_engine(config)`: the single-process engine or a distributed replica's, from one EngineConfig — called by
the offline `LLM`, the Serve deployment and `v4ray score`. It alone derives the prefix-cache key."""

from __future__ import annotations

from pathlib import Path

import torch

from v4ray.engine.build import build_engine_core, checkpoint_dir, dtype_name, resolve_dtype
from v4ray.engine.config import EngineConfig
from v4ray.model.config import V4Config
from v4ray.model.kv_format import PREFIX_UNIT


def prefix_cache_spec(config: EngineConfig, path: Path, dtype: torch.dtype) -> dict:
    """PrefixCacheClient arguments: the root key covers the checkpoint's identity (every weight byte, config,
    tokenizer), the dtype and the cache layout, so no other model or layout can hit these entries."""
    from v4ray.actors.kv_cache_service import root_key
    from v4ray.model.identity import model_identity

    layout = f"kv={'fp32' if dtype == torch.float32 else 'bf16'}|unit={PREFIX_UNIT}"
    identity = model_identity(path, dtype=dtype_name(dtype), layout=layout)
    return {"root": root_key(identity, layout), "budget_bytes": config.prefix_cache_bytes,
            "name": config.kv_cache_service}


def _replica_cpus(config: EngineConfig, replica_options: dict | None) -> float:
    """CPUs the replica's placement group reserves (0 in one process): a local Ray started for it gets as many."""
    if not config.num_expert_shards:
        return 0
    from .placement import bundle_totals, layout_bundles
    from .replica import ReplicaConfig

    c = ReplicaConfig(engine=config, **(replica_options or {}))
    return bundle_totals(layout_bundles(c.num_routers, c.num_expert_shards, c.router_resources,
                                        c.shard_resources)).get("CPU", 0)


def build_engine(config: EngineConfig, address: str | None = None, replica_options: dict | None = None):
    """An EngineCore (num_expert_shards == 0) or a started replica's ReplicaEngine. A local Ray on 127.0.0.1 is
    started when one is needed and none runs (`address` joins another cluster). `replica_options`: further
    ReplicaConfig fields (resources, placement strategy, timeouts, redundant experts)."""
    path = checkpoint_dir(config)
    cfg = V4Config.from_file(path)
    dtype = resolve_dtype(config.dtype, cfg)
    prefix = None
    if config.enable_prefix_caching or config.num_expert_shards:
        from .local_ray import ensure_ray

        ensure_ray(address, num_cpus=_replica_cpus(config, replica_options))
    if config.enable_prefix_caching:
        prefix = prefix_cache_spec(config, path, dtype)
    if config.num_expert_shards == 0:
        from v4ray.actors.kv_cache_service import PrefixCacheClient

        return build_engine_core(config, prefix_cache=PrefixCacheClient(**prefix) if prefix else None)
    from .replica import Replica, ReplicaConfig, ReplicaEngine

    fields = {**config.engine_fields(), "model": str(path), "dtype": dtype_name(dtype)}
    replica = Replica(ReplicaConfig(engine=EngineConfig(**fields), prefix_cache=prefix,
                                    **(replica_options or {}))).start()
    return ReplicaEngine(replica)
