"""Connecting to Ray: an embedded local instance on 127.0.0.1, or a given cluster address."""

from __future__ import annotations

import math
import os

NAMESPACE = "v4ray"


def _local_num_cpus(needed_cpus: float = 0) -> int | None:
    """Logical CPUs of an embedded Ray: None (Ray counts the cores it may use), or what the layout's bundles ask
    for when that is more. Ray's CPUs are a scheduling count, not a reservation of cores: on a 2-core laptop a
    2-router, 3-shard replica still runs (its ranks share the cores), where a Ray sized by cores could never place it."""
    from ray._private.utils import get_num_cpus   # Ray's own count (it follows cgroup quotas)

    return math.ceil(needed_cpus) if needed_cpus > get_num_cpus() else None


def ensure_ray(address: str | None = None, num_cpus: float = 0) -> None:
    """Join `address` ("auto" or host:port) or start a local Ray bound to loopback, unless already connected.
    `num_cpus`: the CPUs the caller's layout will reserve; a local Ray gets at least these (`_local_num_cpus`).

    Ray reads its loopback switch when it is first imported, so it is set here, before the import."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local cluster on 127.0.0.1 only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    else:
        # "local": always a new instance, never silently joining another cluster found on this machine
        ray.init(address="local", num_cpus=_local_num_cpus(num_cpus), namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=False)
