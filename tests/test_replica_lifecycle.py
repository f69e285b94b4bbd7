"""A distributed replica's lifecycle on the 3-node simulated Ray cluster (2 CPUs per node): bad layouts fail
before anything is placed, a failed start leaves no actors or placement group behind, a dropped LLM releases
its actors, and the rendezvous store listens on the node's address, never on every interface."""

from __future__ import annotations

import gc
import shutil
import time

import psutil
import pytest

from v4ray.engine.config import EngineConfig
from v4ray.cluster.replica import Replica, ReplicaConfig, ReplicaError
from v4ray.model.tiny import expert_files

RELEASE_WITHIN_S = 10.0   # Ray's resource view and actor states settle within a second or two
WILDCARD = ("0.0.0.0", "::", "::ffff:0.0.0.0")


def _cpus() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


def _live_pgs() -> set[str]:
    from ray.util import placement_group_table

    return {pg_id for pg_id, t in placement_group_table().items() if t["state"] != "REMOVED"}


def _live_ranks() -> set[str]:
    """Router and ExpertShard actors not yet DEAD, from the GCS actor table. (ray.util.state needs the
    dashboard, which a machine running several Rays may not give every cluster: its port is taken.)"""
    from ray._private.state import actors

    return {actor_id for actor_id, a in actors().items()
            if a["ActorClassName"] in ("Router", "ExpertShard") and a["State"] != "DEAD"}


def _cluster_state() -> tuple[float, set[str], set[str]]:
    return _cpus(), _live_pgs(), _live_ranks()


def _wait_for(state: tuple, what: str) -> float:
    """Seconds until the cluster is back to `state` (CPUs, placement groups, rank actors); fails after
    RELEASE_WITHIN_S naming what is still held."""
    t0 = time.time()
    while True:
        now = _cluster_state()
        if now == state:
            return time.time() - t0
        if time.time() - t0 > RELEASE_WITHIN_S:
            pytest.fail(f"{what}: after {RELEASE_WITHIN_S}s the cluster still holds {state[0] - now[0]} CPUs, "
                        f"placement groups {sorted(now[1] - state[1])}, actors {sorted(now[2] - state[2])}")
        time.sleep(0.2)


def _without_experts(ckpt, tmp_path):
    """A copy of the checkpoint whose files holding only routed experts are deleted: an expert shard that
    loads from it fails in start(), after every rank was placed and joined the group."""
    d = tmp_path / "no-experts"
    shutil.copytree(ckpt, d)
    for fname, ids in expert_files(d).items():
        if -1 not in ids:
            (d / fname).unlink()
    return d


@pytest.mark.parametrize("kwargs,message", [
    ({"num_routers": 2, "num_expert_shards": 3, "block_size": 100}, "block_size 100 must be a multiple of 128"),
    ({"num_expert_shards": 2, "kv_cache_bytes": 1 << 10}, "kv_cache_bytes=1024 cannot hold the fixed state"),
    ({"num_expert_shards": 9}, r"num_expert_shards must be in \[1, 8\]"),
    ({"num_expert_shards": 2, "replica_options": {"shard_resources": {"CPU": -1}}}, "shard_resources must map"),
])
def test_bad_layout_rejected_before_placement(ray_session, tiny_ckpt, kwargs, message):
    from v4ray import LLM

    before = _cluster_state()
    t0 = time.time()
    with pytest.raises(ValueError, match=message):
        LLM(model=tiny_ckpt("v4-tiny"), dtype="float32", **kwargs)
    assert time.time() - t0 < 2.0, "validation should not wait for actors"
    assert _cluster_state() == before, "a rejected layout placed something"


def test_failed_start_tears_down_and_a_retry_starts(ray_session, tiny_ckpt, tmp_path):
    """The issue's layout (2 routers + 3 shards = 5 of the 6 CPUs): one shard fails to load, the start
    fails, and everything it placed is released — so the same layout starts again at once."""
    from v4ray import LLM
    from v4ray.model.loader import CheckpointError

    ckpt = tiny_ckpt("v4-tiny")
    before = _cluster_state()
    with pytest.raises(CheckpointError, match="which is missing"):
        LLM(model=ckpt, dtype="float32", num_routers=2, num_expert_shards=3,
            replica_options={"shard_model_dirs": [str(ckpt), str(ckpt), str(_without_experts(ckpt, tmp_path))]})
    released_s = _wait_for(before, "after a failed start")
    # Had the first attempt leaked, this placement group could not be placed (5 + 5 > 6 CPUs).
    t0 = time.time()
    with LLM(model=ckpt, dtype="float32", num_routers=2, num_expert_shards=3,
             replica_options={"start_timeout_s": 60}) as llm:
        assert len(llm.replica.actor_info()) == 5
    retry_s = time.time() - t0
    _wait_for(before, "after shutdown()")
    print(f"released in {released_s:.1f}s; retry started and shut down in {retry_s:.1f}s")


def test_placement_timeout_removes_the_placement_group(ray_session, tiny_ckpt):
    before = _cluster_state()
    rep = Replica(ReplicaConfig(EngineConfig(model=str(tiny_ckpt("v4-tiny")), num_expert_shards=1), start_timeout_s=1,
                                shard_resources={"CPU": 1, "expert_slot": 2}))   # no node has 2 expert slots
    with pytest.raises(ReplicaError, match=r"can never be placed.*missing \{expert_slot: 1\}"):   # before any wait
        rep.start()
    _wait_for(before, "after a placement timeout")


def test_dropped_llm_releases_its_actors(ray_session, tiny_ckpt):
    from v4ray import LLM

    before = _cluster_state()
    llm = LLM(model=tiny_ckpt("v4-tiny"), dtype="float32", num_expert_shards=2)
    assert len(_live_ranks() - before[2]) == 3 and len(_live_pgs() - before[1]) == 1
    del llm
    gc.collect()
    _wait_for(before, "after `del llm`")


def test_rendezvous_store_listens_on_the_node_address(ray_session, tiny_ckpt):
    """Rank 0's TCPStore (torch's tcp:// rendezvous would bind it to every interface) listens on the node's
    Ray address; no rank process listens on a wildcard address (the store, gloo and Ray's own servers)."""
    import ray

    rep = Replica(ReplicaConfig(EngineConfig(model=str(tiny_ckpt("v4-tiny")), num_routers=1,
                                             num_expert_shards=1))).start()
    try:
        listening = {i["role"]: [c.laddr for c in psutil.Process(i["pid"]).net_connections("inet")
                                 if c.status == psutil.CONN_LISTEN] for i in rep.actor_info()}
    finally:
        rep.shutdown()
    port = int(rep.rendezvous_address.rsplit(":", 1)[1])
    store = [a for a in listening["router"] if a.port == port]
    assert [a.ip for a in store] == [ray.util.get_node_ip_address()], f"store on port {port}: {store}"
    for role, addrs in listening.items():
        wild = [a for a in addrs if a.ip in WILDCARD]
        assert not wild, f"{role} listens on every interface: {wild}"
