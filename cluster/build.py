"""`build_engine(config)`: the single-process engine or a distributed replica's, from one EngineConfig — called by
the offline `LLM`, the Serve deployment and `v4ray score`. It alone derives the prefix-cache key."""

from __future__ import annotations

from pathlib import Path

import torch

from v4ray.engine.build import build_engine_core, checkpoint_dir, dtype_name, resolve_device, resolve_dtype
from v4ray.engine.config import EngineConfig
from v4ray.model.config import V4Config
from v4ray.model.kv_format import PREFIX_UNIT

from .placement import bundle_totals, device_problem, rank_device_type


PREFIX_CALL_TIMEOUT_S = 5.0  # a KVCacheService call at most (lookups and stores move MBs: well under a second)


def prefix_cache_spec(config: EngineConfig, path: Path, dtype: torch.dtype) -> dict:
    """PrefixCacheClient arguments: the root key covers the checkpoint's identity (every weight byte, config,
    tokenizer), the dtype and the cache layout, so no other model or layout can hit these entries."""
    from v4ray.actors.kv_cache_service import root_key
    from v4ray.model.identity import model_identity

    stored = config.kv_cache_dtype if config.kv_cache_dtype != "auto" else "fp32" if dtype == torch.float32 else "bf16"
    layout = f"kv={stored}|unit={PREFIX_UNIT}"
    identity = model_identity(path, dtype=dtype_name(dtype), layout=layout)
    # The service is called inside a replica's step (lookups while scheduling, stores after the forward) while its
    # expert shards already wait in the step's collective: a call must end well within the collective's timeout,
    # or a slow or unreachable service fails the whole replica instead of costing cache hits.
    return {"root": root_key(identity, layout), "budget_bytes": config.prefix_cache_bytes,
            "name": config.kv_cache_service, "timeout_s": min(PREFIX_CALL_TIMEOUT_S, config.collective_timeout_s / 4),
            "resources": dict(config.kv_cache_service_resources)}


def engine_device(config: EngineConfig) -> torch.device:
    """Where `config`'s engine runs: this process's device for the single-process engine; for a distributed
    replica, its ranks' (cuda exactly when they reserve GPUs, with device auto), decided without them."""
    if config.num_expert_shards == 0:
        return resolve_device(config.device)
    return torch.device(rank_device_type(config.device, config.gpus_per_router))


def build_engine(config: EngineConfig, address: str | None = None, replica_options: dict | None = None):
    """An EngineCore (num_expert_shards == 0) or a started replica's ReplicaEngine. A local Ray on 127.0.0.1 is
    started when one is needed and none runs, with at least the CPUs the replica reserves (`address` joins
    another cluster). `replica_options`: further ReplicaConfig fields (resources, placement strategy, timeouts,
    redundant experts)."""
    from .local_ray import ensure_ray

    problem = device_problem(config, in_actor=False)   # the Serve deployment checked its own (in an actor)
    if problem:
        raise ValueError(problem)
    path = checkpoint_dir(config)
    dtype = resolve_dtype(config.dtype, V4Config.from_file(path), engine_device(config))
    if config.num_expert_shards == 0:
        from v4ray.actors.kv_cache_service import PrefixCacheClient

        client = None
        if config.enable_prefix_caching:
            ensure_ray(address)
            client = PrefixCacheClient(**prefix_cache_spec(config, path, dtype))
        return build_engine_core(config, prefix_cache=client)
    from .replica import Replica, ReplicaConfig, ReplicaEngine

    engine = EngineConfig(**{**config.engine_fields(), "model": str(path), "dtype": dtype_name(dtype)})
    c = ReplicaConfig(engine=engine, **(replica_options or {}))
    ensure_ray(address, num_cpus=bundle_totals(c.bundles()).get("CPU", 0))
    if config.enable_prefix_caching:
        c.prefix_cache = prefix_cache_spec(config, path, dtype)
    return ReplicaEngine(Replica(c).start())
