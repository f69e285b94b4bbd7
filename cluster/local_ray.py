"""Connecting to Ray: an embedded local instance on 127.0.0.1, or a given cluster address."""

from __future__ import annotations

import os

NAMESPACE = "v4ray"


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` ("auto" or host:port) or start a local Ray bound to loopback, unless already connected.

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
        ray.init(address="local", num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=False)
