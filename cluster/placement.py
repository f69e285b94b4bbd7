"""Can a placement group ever be placed? Decided before waiting on it, so that a layout the cluster can never hold
fails in seconds, naming the bundles and the missing resources, instead of after the start timeout.

`placement_problem` is a plain function over node resource dicts (testable without Ray); `cluster_nodes` reads
them from Ray: the alive nodes plus those an autoscaler reports it may add. The checks are necessary conditions
only: a group that passes may still wait for resources that running actors hold, which `wait_placed` reports
when it is still pending after a few seconds.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

log = logging.getLogger(__name__)

RANK_RESOURCES = {"CPU": 1}     # every rank's bundle (router, expert shard, the V4Server) before its GPUs
PENDING_REPORT_AFTER_S = 10.0   # a placeable group on an idle cluster is placed well within this
_EPS = 1e-6                     # Ray keeps resources in units of 1e-4
_MAX_NODES_PER_GROUP = 1024     # an autoscaler node group without a limit: more nodes than any layout needs


def rank_resources(gpus: float = 0) -> dict[str, float]:
    """One rank's bundle: a CPU, plus `gpus` GPUs when > 0 (EngineConfig.gpus_per_router or gpus_per_shard)."""
    return {**RANK_RESOURCES, "GPU": gpus} if gpus > 0 else dict(RANK_RESOURCES)


def actor_options(resources: dict[str, float]) -> dict:
    """Ray actor options that take a bundle's resources: num_gpus makes Ray set CUDA_VISIBLE_DEVICES to the GPUs
    it assigns (an actor that asks for none sees none, even in a bundle that holds some)."""
    res = dict(resources)
    return {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0), "resources": res or None}


def rank_device_type(device: str, gpus: float) -> str:
    """Where a rank that reserves `gpus` GPUs runs with EngineConfig.device `device`: "cuda" or "cpu". Decided
    without the rank's process (auto is cuda exactly when Ray gives the rank a GPU)."""
    if device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    return device.partition(":")[0]


def device_problem(config, in_actor: bool) -> str | None:
    """Why `config`'s device and GPU reservations contradict each other, naming the fields; None when they agree.
    `in_actor`: the single-process engine runs in a Ray actor (the Serve V4Server); a distributed replica's ranks
    always do. A GPU reserved but unused, or a GPU asked for where Ray hides every GPU, is refused here, before
    anything is placed."""
    distributed = config.num_expert_shards > 0
    device = config.device
    ranks = [("gpus_per_router", config.gpus_per_router, "router" if distributed else "engine")]
    if distributed:
        ranks.append(("gpus_per_shard", config.gpus_per_shard, "expert shard"))
    for field, gpus, role in ranks:
        if device == "cpu" and gpus > 0:
            return (f"{field}={gpus:g} reserves GPUs for each {role} but device='cpu' leaves them unused: set device "
                    f"to auto or cuda, or {field} to 0")
        if device.startswith("cuda") and gpus == 0 and (distributed or in_actor):
            return (f"device={device!r} but {field}=0: Ray hides every GPU from an actor that reserves none (the "
                    f"{role}'s CUDA_VISIBLE_DEVICES is empty); set {field} >= 1, or device to auto or cpu")
        index = device.partition(":")[2]
        if index and gpus > 0 and int(index) >= math.ceil(gpus):
            return (f"device={device!r} but {field}={gpus:g}: each {role} sees {math.ceil(gpus)} GPU(s), numbered "
                    f"from 0 (Ray's CUDA_VISIBLE_DEVICES); use device cuda or auto")
    if distributed and (config.gpus_per_router > 0) != (config.gpus_per_shard > 0):
        return (f"gpus_per_router={config.gpus_per_router:g} and gpus_per_shard={config.gpus_per_shard:g}: routers "
                f"and expert shards share one process group, so both reserve GPUs (NCCL) or neither does (gloo)")
    return None


def choose_strategy(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> str:
    """PACK when one node can hold every bundle at once (the ranks' all-to-all stays inside the node: NVLink,
    shared memory), SPREAD over nodes otherwise. One bundle is always PACK; without known nodes, several SPREAD."""
    if len(bundles) <= 1:
        return "PACK"
    total = bundle_totals(bundles)
    return "PACK" if any(_fits(total, n) for n in nodes) else "SPREAD"


def bundle_totals(bundles: list[dict[str, float]]) -> dict[str, float]:
    """The sum of each resource over the bundles."""
    total: Counter = Counter()
    for b in bundles:
        total.update({k: v for k, v in b.items() if v > 0})
    return dict(total)


def layout_bundles(num_routers: int, num_expert_shards: int, router_resources: dict[str, float],
                   shard_resources: dict[str, float]) -> list[dict[str, float]]:
    """One bundle per router, then one per expert shard: a replica's placement group."""
    return [dict(router_resources) for _ in range(num_routers)] + \
           [dict(shard_resources) for _ in range(num_expert_shards)]


def _fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + _EPS >= v for k, v in need.items() if v > 0)


def _missing(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    return {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + _EPS}


def _fmt(res: dict[str, float]) -> str:
    def num(v: float) -> str:
        return str(int(v)) if abs(v - round(v)) < _EPS else f"{v:g}"

    return "{" + ", ".join(f"{k}: {num(v)}" for k, v in sorted(res.items())) + "}"


def _fmt_bundles(bundles: list[dict[str, float]]) -> str:
    """`[{CPU: 1} x 2, {CPU: 1, expert_slot: 1} x 3]`: runs of equal bundles counted."""
    runs: list[list] = []
    for b in bundles:
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return "[" + ", ".join(_fmt(b) + (f" x {n}" if n > 1 else "") for b, n in runs) + "]"


def _describe_nodes(nodes: list[dict[str, float]], keys: set[str]) -> str:
    """`3 nodes: 3 x {CPU: 2, expert_slot: 1}`, showing only the resources the bundles ask for."""
    shapes = Counter(tuple(sorted((k, n.get(k, 0.0)) for k in keys)) for n in nodes)
    parts = [f"{count} x {_fmt(dict(shape))}" for shape, count in shapes.most_common()]
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: " + ", ".join(parts)


def _distinct_nodes(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> int:
    """The most bundles that can sit on distinct nodes (a maximum bipartite matching, augmenting paths)."""
    holder: dict[int, int] = {}   # node -> bundle

    def place(b: int, seen: set[int]) -> bool:
        for n, node in enumerate(nodes):
            if n not in seen and _fits(bundles[b], node):
                seen.add(n)
                if n not in holder or place(holder[n], seen):
                    holder[n] = b
                    return True
        return False

    return sum(place(b, set()) for b in range(len(bundles)))


def placement_problem(bundles: list[dict[str, float]], strategy: str,
                      nodes: list[dict[str, float]]) -> str | None:
    """Why `bundles` can never be placed with `strategy` on `nodes` (the resources of each node that exists or
    may be added), naming the bundles and what is missing; None when they may fit.

    Every bundle must fit on one node; STRICT_PACK puts them all on one node; STRICT_SPREAD needs a distinct node
    for each; PACK and SPREAD need, in all, the resources they sum to on nodes where a bundle fits, and room for
    each bundle shape as often as it occurs."""
    keys = {k for b in bundles for k, v in b.items() if v > 0}
    what = f"placement group of {len(bundles)} bundles {_fmt_bundles(bundles)} ({strategy})"
    if not nodes:
        return f"{what} can never be placed: the cluster has no nodes"
    where = _describe_nodes(nodes, keys)
    largest = {k: max(n.get(k, 0.0) for n in nodes) for k in keys}
    for i, b in enumerate(bundles):
        if not any(_fits(b, n) for n in nodes):
            short = _missing(b, largest)
            why = (f"missing {_fmt(short)} (the most any node has: {_fmt({k: largest[k] for k in short})})" if short
                   else "no single node has all of it at once")
            absent = [k for k in sorted(short) if largest[k] <= 0]
            if absent:
                why += "; the cluster has " + ", ".join(f"0 {k}" for k in absent) + \
                    (" (no node offers it: a GPU node group, or `ray start --num-gpus`)" if "GPU" in absent else "")
            return f"{what} can never be placed on {where}: bundle {i} {_fmt(b)} fits on no node; {why}"
    if strategy == "STRICT_PACK":
        total = bundle_totals(bundles)
        if not any(_fits(total, n) for n in nodes):
            short = _missing(total, largest)
            why = f"missing {_fmt(short)} on the largest node" if short else "no single node has all of it at once"
            return f"{what} can never be placed on {where}: STRICT_PACK needs {_fmt(total)} on one node; {why}"
        return None
    if strategy == "STRICT_SPREAD":
        placed = _distinct_nodes(bundles, nodes)
        if placed < len(bundles):
            return (f"{what} can never be placed on {where}: STRICT_SPREAD needs a distinct node for each of the "
                    f"{len(bundles)} bundles, and at most {placed} of them fit on distinct nodes; missing "
                    f"{len(bundles) - placed} node(s) that can hold a bundle")
        return None
    usable = [n for n in nodes if any(_fits(b, n) for b in bundles)]
    total = bundle_totals(bundles)
    have = {k: sum(n.get(k, 0.0) for n in usable) for k in keys}
    short = _missing(total, have)
    if short:
        return (f"{what} can never be placed on {where}: the bundles need {_fmt(total)} in all, the nodes that can "
                f"hold a bundle have {_fmt(have)}; missing {_fmt(short)}")
    shapes = Counter(tuple(sorted((k, v) for k, v in b.items() if v > 0)) for b in bundles)
    for shape, count in shapes.items():
        b = dict(shape)
        room = sum(int(min(n.get(k, 0.0) / v + _EPS for k, v in b.items())) for n in usable)
        if room < count:
            return (f"{what} can never be placed on {where}: the nodes have room for {room} of the {count} bundles "
                    f"{_fmt(b)} (each on one node); missing room for {count - room}, i.e. "
                    f"{_fmt({k: v * (count - room) for k, v in b.items()})}")
    return None


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of every alive node, plus the nodes an autoscaler reports it may add (each node group's
    max_count, an upper bound). Needs a connected Ray."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()   # None without an autoscaler
    except Exception:  # noqa: BLE001 - an older GCS, or no such key: only the nodes that exist count
        config = None
    for group in (config.node_group_configs if config is not None else []):
        count = group.max_count if group.max_count >= 0 else _MAX_NODES_PER_GROUP
        nodes += [dict(group.resources) for _ in range(min(count, _MAX_NODES_PER_GROUP))]
    return nodes


def cluster_problem(bundles: list[dict[str, float]], strategy: str) -> str | None:
    """`placement_problem` on the connected cluster."""
    return placement_problem(bundles, strategy, cluster_nodes())


def pending_report(bundles: list[dict[str, float]], exclude_pg_id: str | None = None) -> str:
    """What the cluster is waiting for: the pending placement groups (other than `exclude_pg_id`) and the
    resources available now, of those `bundles` ask for."""
    import ray
    from ray.util import placement_group_table

    pending = [t for pg_id, t in placement_group_table().items()
               if t["state"] in ("PENDING", "RESCHEDULING") and pg_id != exclude_pg_id]
    available = ray.available_resources()   # leaves out what is used up
    now = {k: available.get(k, 0.0) for k in sorted({k for b in bundles for k, v in b.items() if v > 0})}
    groups = "; ".join(f"{len(t['bundles'])} bundles {_fmt_bundles(list(t['bundles'].values()))} "
                       f"({t['strategy']})" for t in pending)
    waiting = f"{len(pending)} placement group(s) waiting: {groups}" if pending else \
        f"no {'other ' if exclude_pg_id else ''}placement group is waiting"
    return f"{waiting}; available now {_fmt(now)} (the rest is held by running actors or tasks)"


def wait_placed(pg, bundles: list[dict[str, float]], timeout_s: float,
                report_after_s: float = PENDING_REPORT_AFTER_S) -> None:
    """`ray.get(pg.ready(), timeout=timeout_s)` (raising GetTimeoutError like it), logging a warning once when
    the group is still pending after `report_after_s`: the group could fit the cluster, so something holds
    the resources it needs."""
    import ray

    ready = pg.ready()
    if timeout_s <= report_after_s:
        ray.get(ready, timeout=timeout_s)
        return
    try:
        ray.get(ready, timeout=report_after_s)
        return
    except ray.exceptions.GetTimeoutError:
        log.warning("placement group of %d bundles %s is still pending after %.0fs (waiting up to %.0fs): %s",
                    len(bundles), _fmt_bundles(bundles), report_after_s, timeout_s,
                    pending_report(bundles, exclude_pg_id=pg.id.hex()))
    ray.get(ready, timeout=timeout_s - report_after_s)
