"""Placement that can never fit fails in seconds, naming the bundles and what is missing; an embedded Ray is sized
for the layout it serves. The decision on synthetic node lists (per strategy), then on the session's simulated
cluster (3 nodes x 2 CPUs, one `expert_slot` each), then `LLM` and `v4ray serve` in processes of their own, each
starting its own local Ray on this machine (2 cores) or joining the running cluster."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import requests

from conftest import free_port

from v4ray.cluster.placement import layout_bundles, placement_problem

FAIL_FAST_S = 15.0              # the bound for a placement that can never fit
CLI_FAIL_FAST_S = 30.0          # the same, plus a fresh interpreter importing torch and joining Ray
SUBPROCESS_TIMEOUT_S = 300.0    # a local Ray, five torch actors and a tiny model on 2 shared cores
RELEASE_WITHIN_S = 10.0

NODES = [{"CPU": 2.0, "expert_slot": 1.0, "memory": 4e9}] * 3   # the session cluster's shape


# ---- the decision, on synthetic nodes ---------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_SPREAD"])
def test_the_default_layouts_fit_the_test_cluster(strategy):
    assert placement_problem(layout_bundles(2, 1, {"CPU": 1}, {"CPU": 1}), strategy, NODES) is None
    assert placement_problem(layout_bundles(1, 2, {"CPU": 1}, {"CPU": 1, "expert_slot": 1}), strategy, NODES) is None
    assert placement_problem(layout_bundles(2, 4, {"CPU": 1}, {"CPU": 1}), "PACK", NODES) is None   # 6 of 6 CPUs


def test_a_bundle_no_node_can_hold_names_the_bundle_and_the_shortfall():
    msg = placement_problem(layout_bundles(1, 2, {"CPU": 1}, {"CPU": 1, "expert_slot": 2}), "SPREAD", NODES)
    assert "3 bundles [{CPU: 1}, {CPU: 1, expert_slot: 2} x 2] (SPREAD)" in msg
    assert "bundle 1 {CPU: 1, expert_slot: 2} fits on no node; missing {expert_slot: 1}" in msg
    assert "3 nodes: 3 x {CPU: 2, expert_slot: 1}" in msg          # memory is not what the bundles ask for
    msg = placement_problem([{"CPU": 1, "GPU": 1}], "PACK", NODES)
    assert "missing {GPU: 1}" in msg
    # each resource exists somewhere, but never together
    msg = placement_problem([{"CPU": 4, "GPU": 1}], "PACK", [{"CPU": 1, "GPU": 2}, {"CPU": 4}])
    assert "fits on no node; no single node has all of it at once" in msg


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD"])
def test_pack_and_spread_need_the_totals(strategy):
    msg = placement_problem(layout_bundles(2, 5, {"CPU": 1}, {"CPU": 1}), strategy, NODES)
    assert f"7 bundles [{{CPU: 1}} x 7] ({strategy})" in msg
    assert "need {CPU: 7} in all" in msg and "missing {CPU: 1}" in msg
    # totals suffice, but a node fits a bundle once at most and only one node fits one at all
    nodes = [{"CPU": 1, "GPU": 2}, {"CPU": 4}, {"CPU": 2, "GPU": 1}, {"CPU": 8, "GPU": 8, "mem": 0}]
    assert placement_problem([{"CPU": 3, "GPU": 1}] * 2, strategy, nodes) is None   # the last node holds both
    msg = placement_problem([{"CPU": 2, "GPU": 1}] * 2, strategy, nodes[:3])
    assert "missing {CPU: 2, GPU: 1}" in msg
    msg = placement_problem([{"CPU": 1.5}] * 3, strategy, [{"CPU": 2}, {"CPU": 2.5}])
    assert "room for 2 of the 3 bundles {CPU: 1.5}" in msg and "missing room for 1, i.e. {CPU: 1.5}" in msg


def test_strict_pack_needs_one_node_for_all():
    assert placement_problem([{"CPU": 1}] * 2, "STRICT_PACK", NODES) is None
    msg = placement_problem([{"CPU": 1}] * 3, "STRICT_PACK", NODES)
    assert "STRICT_PACK needs {CPU: 3} on one node; missing {CPU: 1} on the largest node" in msg


def test_strict_spread_needs_a_distinct_node_for_each():
    assert placement_problem([{"CPU": 1}] * 3, "STRICT_SPREAD", NODES) is None
    msg = placement_problem([{"CPU": 1}] * 4, "STRICT_SPREAD", NODES)
    assert "at most 3 of them fit on distinct nodes; missing 1 node(s)" in msg
    # the GPU bundle needs the one GPU node, so the CPU bundle that took it first must move (an augmenting path)
    assert placement_problem([{"CPU": 1}, {"GPU": 1}], "STRICT_SPREAD", [{"CPU": 1, "GPU": 1}, {"CPU": 1}]) is None
    msg = placement_problem([{"CPU": 1}, {"CPU": 1}, {"GPU": 1}], "STRICT_SPREAD",
                            [{"CPU": 1, "GPU": 1}, {"CPU": 1}, {"CPU": 0.5}])
    assert "at most 2 of them" in msg


def test_no_nodes():
    assert "the cluster has no nodes" in placement_problem([{"CPU": 1}], "PACK", [])


def test_serve_bundles_follow_the_layout():
    from v4ray.serve.app import server_placement
    from v4ray.serve.config import ServeConfig

    assert server_placement(ServeConfig(), NODES) == ([{"CPU": 1}], "PACK")
    bundles, strategy = server_placement(ServeConfig(num_routers=2, num_expert_shards=3), NODES)
    assert bundles == [{"CPU": 1}] * 6 and strategy == "SPREAD"     # 6 CPUs: no 2-CPU node holds them all
    bundles, strategy = server_placement(ServeConfig(num_expert_shards=1), [{"CPU": 8}])
    assert bundles == [{"CPU": 1}] * 3 and strategy == "PACK"


# ---- GPUs: one value per rank (EngineConfig.gpus_per_router / gpus_per_shard) ------------------------------------

GPU_NODE = {"CPU": 64.0, "GPU": 8.0}   # one 8-GPU node


def test_gpus_per_rank_make_the_bundles_and_the_actor_options():
    """ServeConfig with gpus_per_router: 1, gpus_per_shard: 1 renders bundles that request GPUs, and actor options
    that take them (num_gpus: Ray sets CUDA_VISIBLE_DEVICES only for the GPUs an actor asks for)."""
    from v4ray.cluster.placement import actor_options, rank_resources
    from v4ray.serve.app import server_actor_options, server_placement
    from v4ray.serve.config import ServeConfig

    assert rank_resources(0) == {"CPU": 1} and rank_resources(2) == {"CPU": 1, "GPU": 2}
    assert actor_options({"CPU": 1, "GPU": 1, "expert_slot": 1}) == {"num_cpus": 1, "num_gpus": 1,
                                                                     "resources": {"expert_slot": 1}}
    cfg = ServeConfig(num_routers=2, num_expert_shards=3, gpus_per_router=1, gpus_per_shard=1)
    bundles, strategy = server_placement(cfg, [GPU_NODE])
    assert bundles == [{"CPU": 1}] + [{"CPU": 1, "GPU": 1}] * 5 and strategy == "PACK"   # 5 GPUs fit one node
    assert server_actor_options(cfg) == {"num_cpus": 1, "num_gpus": 0}   # the ranks hold the GPUs, not the server
    one = ServeConfig(gpus_per_router=1)   # one process: the V4Server's bundle holds the engine's GPU
    assert server_placement(one, [GPU_NODE]) == ([{"CPU": 1, "GPU": 1}], "PACK")
    assert server_actor_options(one) == {"num_cpus": 1, "num_gpus": 1}
    bundles, strategy = server_placement(ServeConfig(num_routers=8, num_expert_shards=8, gpus_per_router=1,
                                                     gpus_per_shard=1), [GPU_NODE] * 2)
    assert len(bundles) == 17 and strategy == "SPREAD"   # 16 GPUs: two nodes


def test_the_serve_deployment_takes_the_gpu_options(tiny_ckpt):
    """build_app's V4Server deployment, as Serve validates it (bundle 0 must hold the replica actor's resources)."""
    from v4ray.serve.app import build_app

    app = build_app({"model": str(tiny_ckpt("v4-tiny")), "gpus_per_router": 1})   # Ray not started: no nodes known
    server = app._bound_deployment.init_args[0]._bound_deployment
    assert server.ray_actor_options == {"num_cpus": 1, "num_gpus": 1}
    assert server._replica_config.placement_group_bundles == [{"CPU": 1, "GPU": 1}]


def test_pack_when_one_node_holds_the_replica_else_spread():
    from v4ray.cluster.placement import choose_strategy

    eight = [{"CPU": 1, "GPU": 1}] * 8
    assert choose_strategy(eight, [GPU_NODE]) == "PACK"
    assert choose_strategy(eight, [{"CPU": 64, "GPU": 4}] * 4) == "SPREAD"    # 16 GPUs, but no node holds 8
    assert choose_strategy(eight + [{"CPU": 1, "GPU": 1}], [GPU_NODE] * 2) == "SPREAD"
    assert choose_strategy([{"CPU": 1}] * 2, NODES) == "PACK"                 # CPU ranks: the same rule
    assert choose_strategy([{"CPU": 1}] * 3, NODES) == "SPREAD"
    assert choose_strategy([{"CPU": 1, "GPU": 1}], []) == "PACK"             # one bundle: nothing to spread
    assert choose_strategy(eight, []) == "SPREAD"                            # nodes unknown


def test_gpu_bundles_on_a_cluster_without_gpus_say_so():
    from v4ray.cluster.placement import layout_bundles, rank_resources

    msg = placement_problem(layout_bundles(1, 1, rank_resources(1), rank_resources(1)), "PACK", NODES)
    assert "bundle 0 {CPU: 1, GPU: 1} fits on no node; missing {GPU: 1}" in msg
    assert "the cluster has 0 GPU" in msg
    assert "the cluster has 0" not in placement_problem([{"CPU": 4}], "PACK", NODES)   # CPUs exist, just fewer


@pytest.mark.parametrize("fields,message", [
    ({"gpus_per_router": 1, "device": "cpu"}, "gpus_per_router=1 reserves GPUs for each engine but device='cpu'"),
    ({"num_expert_shards": 1, "gpus_per_router": 1, "gpus_per_shard": 1, "device": "cpu"},
     "gpus_per_router=1 reserves GPUs for each router but device='cpu'"),
    ({"device": "cuda"}, "device='cuda' but gpus_per_router=0: Ray hides every GPU"),
    ({"num_expert_shards": 1, "gpus_per_router": 1, "device": "cuda:0"}, "device='cuda:0' but gpus_per_shard=0"),
    ({"num_expert_shards": 1, "gpus_per_router": 1}, "gpus_per_router=1 and gpus_per_shard=0: routers and expert "
                                                     "shards share one process"),
    ({"gpus_per_router": 1, "device": "cuda:1"}, "device='cuda:1' but gpus_per_router=1: each engine sees 1 GPU"),
])
def test_a_gpu_reserved_and_unused_or_used_and_unreserved_is_refused(fields, message):
    from pydantic import ValidationError

    from v4ray.serve.config import ServeConfig

    with pytest.raises(ValidationError, match="Value error") as e:
        ServeConfig(**fields)
    assert message in str(e.value)


def test_the_engine_outside_ray_may_use_a_gpu_it_does_not_reserve():
    """`LLM(device="cuda")` runs in the caller's process, which sees its GPUs: no reservation needed."""
    from v4ray.cluster.placement import device_problem
    from v4ray.engine.config import EngineConfig

    assert device_problem(EngineConfig(model="m", device="cuda"), in_actor=False) is None
    assert device_problem(EngineConfig(model="m", device="cuda"), in_actor=True) is not None
    assert "leaves them unused" in device_problem(EngineConfig(model="m", gpus_per_router=1, device="cpu"), False)
    for ok in ({}, {"gpus_per_router": 1}, {"num_expert_shards": 2, "gpus_per_router": 1, "gpus_per_shard": 1},
               {"num_expert_shards": 2, "gpus_per_router": 1, "gpus_per_shard": 1, "device": "cuda"}):
        assert device_problem(EngineConfig(model="m", **ok), in_actor=True) is None, ok


def test_replica_bundles_derive_from_the_engine(tiny_ckpt):
    from v4ray.cluster.replica import ReplicaConfig
    from v4ray.engine.config import EngineConfig
    from v4ray.model.config import V4Config

    ckpt = str(tiny_ckpt("v4-tiny"))
    cfg = V4Config.from_file(ckpt)
    c = ReplicaConfig(EngineConfig(model=ckpt, num_routers=2, num_expert_shards=2, gpus_per_router=1,
                                   gpus_per_shard=2, kv_cache_dtype="fp8"))
    assert c.bundles() == [{"CPU": 1, "GPU": 1}] * 2 + [{"CPU": 1, "GPU": 2}] * 2
    assert c.placement_strategy == "auto"
    c.validate(cfg)   # fp8 KV sizes the probe's fixed state
    extra = ReplicaConfig(c.engine, shard_resources={"CPU": 1, "expert_slot": 1})   # the GPUs are still the engine's
    assert extra.shard_resources == {"CPU": 1, "expert_slot": 1, "GPU": 2}
    with pytest.raises(ValueError, match="router_resources asks for GPU=4 but gpus_per_router=1"):
        ReplicaConfig(c.engine, router_resources={"CPU": 1, "GPU": 4}).validate(cfg)
    with pytest.raises(ValueError, match="routers and expert shards share one process group"):
        ReplicaConfig(c.engine.model_copy(update={"gpus_per_shard": 0})).validate(cfg)
    assert ReplicaConfig(EngineConfig(model=ckpt, num_expert_shards=1)).bundles() == [{"CPU": 1}] * 2


def test_a_router_resolves_its_device_in_its_process():
    """A Router takes cuda:0 (its own GPU under Ray) when it sees one, else the CPU; device=cuda without a visible
    GPU fails in the constructor, naming the fields that reserve one."""
    import torch

    from v4ray.actors.router import Router
    from v4ray.engine.config import EngineConfig
    from v4ray.model.expert_placement import ExpertPlacement

    placement = ExpertPlacement.contiguous(4, 1, {})
    router = Router(EngineConfig(model="m", num_expert_shards=1), 0, 2, placement)
    assert router.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="gpus_per_router/gpus_per_shard"):
            Router(EngineConfig(model="m", num_expert_shards=1, device="cuda"), 0, 2, placement)


# ---- on the running cluster -------------------------------------------------------------------------------------

def _cluster_state():
    import ray
    from ray._private.state import actors
    from ray.util import placement_group_table

    return (ray.available_resources().get("CPU", 0.0),
            {i for i, t in placement_group_table().items() if t["state"] != "REMOVED"},
            {i for i, a in actors().items() if a["ActorClassName"] in ("Router", "ExpertShard") and a["State"] != "DEAD"})


def _assert_nothing_left(before):
    t0 = time.time()
    while _cluster_state() != before:
        assert time.time() - t0 < RELEASE_WITHIN_S, f"still placed: {_cluster_state()} vs {before}"
        time.sleep(0.2)


@pytest.mark.parametrize("layout,missing", [
    ({"num_expert_shards": 2, "replica_options": {"shard_resources": {"CPU": 1, "expert_slot": 2}}},
     "missing {expert_slot: 1}"),
    ({"num_routers": 2, "num_expert_shards": 5}, "missing {CPU: 1}"),                 # 7 bundles, 6 CPUs
    ({"num_routers": 1, "num_expert_shards": 3,
      "replica_options": {"placement_strategy": "STRICT_SPREAD"}}, "missing 1 node(s)"),   # 4 bundles, 3 nodes
    ({"num_expert_shards": 1, "gpus_per_router": 1, "gpus_per_shard": 1}, "the cluster has 0 GPU"),
])
def test_a_layout_that_can_never_fit_fails_fast_and_places_nothing(ray_session, tiny_ckpt, layout, missing):
    from v4ray import LLM
    from v4ray.cluster.replica import ReplicaError

    before = _cluster_state()
    t0 = time.time()
    with pytest.raises(ReplicaError, match="can never be placed") as e:
        LLM(model=tiny_ckpt("v4-tiny"), dtype="float32", **layout)   # start_timeout_s: 300 s
    took = time.time() - t0
    assert took < FAIL_FAST_S, f"took {took:.1f}s"
    assert missing in str(e.value)
    _assert_nothing_left(before)


def test_a_placeable_group_still_pending_says_what_it_waits_for(ray_session, caplog):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from v4ray.cluster.placement import cluster_problem, wait_placed

    before = _cluster_state()
    blocker = placement_group([{"CPU": 2}] * 3, strategy="STRICT_SPREAD")   # every CPU of the cluster
    ray.get(blocker.ready(), timeout=30)
    bundles = [{"CPU": 1}]
    assert cluster_problem(bundles, "PACK") is None        # it could fit; it must wait
    pg = placement_group(bundles)
    try:
        with caplog.at_level(logging.WARNING, logger="v4ray.cluster.placement"), \
                pytest.raises(ray.exceptions.GetTimeoutError):
            wait_placed(pg, bundles, timeout_s=3, report_after_s=1)
        msg = caplog.text
        assert "1 bundles [{CPU: 1}] is still pending after 1s (waiting up to 3s)" in msg
        assert "no other placement group is waiting; available now {CPU: 0}" in msg
    finally:
        remove_placement_group(pg)
        remove_placement_group(blocker)
    _assert_nothing_left(before)


# ---- a process of its own: its own local Ray, or the running cluster -----------------------------------------

def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}


def _run(cmd: list[str], timeout_s: float) -> tuple[int, str, float]:
    """Run `cmd` in its own process group; kill the group (its Ray included) if it outlives `timeout_s`."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out, time.time() - t0


def test_llm_with_more_ranks_than_cores_generates_on_its_own_ray(tiny_ckpt):
    """2 routers + 3 shards ask for 5 CPUs; the local Ray LLM starts on this 2-core machine is sized for them.
    (ignore_eos: an unseeded draw from the random tiny model may end at eos before max_tokens.)"""
    script = textwrap.dedent(f"""
        import json, ray
        from v4ray import LLM, SamplingParams
        with LLM(model={str(tiny_ckpt("v4-tiny"))!r}, dtype="float32", num_routers=2, num_expert_shards=3) as llm:
            out = llm.generate(["hello", "expert parallel"], SamplingParams(max_tokens=5, ignore_eos=True))
            print(json.dumps({{"cpus": ray.cluster_resources()["CPU"],
                               "tokens": [len(o.outputs[0].token_ids) for o in out]}}))
        ray.shutdown()
    """)
    rc, out, took = _run([sys.executable, "-c", script], SUBPROCESS_TIMEOUT_S)
    assert rc == 0, out[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens"] == [5, 5]
    assert result["cpus"] >= 5, result
    print(f"LLM(num_routers=2, num_expert_shards=3) on its own Ray: {took:.1f}s")


def _serve(args: list[str]) -> subprocess.Popen:
    """`v4ray serve ARGS` in its own process group (the test kills the group)."""
    return subprocess.Popen([sys.executable, "-m", "v4ray.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)


def _read_until(proc: subprocess.Popen, marker: str, timeout_s: float) -> tuple[list[str], str]:
    """Lines of `proc` up to the first holding `marker` (asserting it comes within `timeout_s`)."""
    lines, t0 = [], time.time()
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines, line
        assert time.time() - t0 < timeout_s, f"no {marker!r} within {timeout_s}s:\n" + "".join(lines[-30:])
    raise AssertionError(f"the command ended without {marker!r}:\n" + "".join(lines[-30:]))


def _serve_config(tmp_path, ckpt, port: int, **args) -> str:
    conf = tmp_path / "ray_config.yaml"
    conf.write_text(json.dumps({   # YAML is a superset of JSON
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "v4ray", "route_prefix": "/", "import_path": "v4ray.serve.app:build_app",
                          "args": {"model": str(ckpt), "served_model_name": "v4-tiny", "dtype": "float32",
                                   "max_model_len": 512, **args}}]}))
    return str(conf)


def test_v4ray_serve_with_expert_shards_serves_on_its_own_ray(tmp_path, tiny_ckpt):
    """num_expert_shards: 2 asks for 4 CPUs (the server, a router, two shards) on a 2-core machine."""
    port = free_port()
    conf = _serve_config(tmp_path, tiny_ckpt("v4-tiny"), port, num_expert_shards=2)
    proc = _serve(["--config", conf])
    try:
        t0 = time.time()
        lines, _ = _read_until(proc, "serving the OpenAI API", SUBPROCESS_TIMEOUT_S)
        assert proc.poll() is None, "".join(lines[-50:])
        up = time.time() - t0
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                          json={"model": "v4-tiny", "prompt": "shard me", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        print(f"v4ray serve with 2 expert shards up in {up:.1f}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_v4ray_serve_says_why_a_layout_cannot_fit_and_exits(ray_cluster, tmp_path, tiny_ckpt):
    """On the running 6-CPU cluster, 1 router + 6 shards + the server ask for 8 CPUs: refused before deploying."""
    before = _cluster_state()
    conf = _serve_config(tmp_path, tiny_ckpt("v4-tiny"), free_port(), num_expert_shards=6)
    rc, out, took = _run([sys.executable, "-m", "v4ray.cli", "serve", "--config", conf,
                          "--address", ray_cluster.address], CLI_FAIL_FAST_S + 30)
    assert rc == 2, out[-3000:]
    assert took < CLI_FAIL_FAST_S, f"took {took:.1f}s"
    assert "v4ray serve: error: the V4Server replica cannot be deployed" in out
    assert "8 bundles [{CPU: 1} x 8] (SPREAD)" in out and "missing {CPU: 2}" in out
    print(f"refused in {took:.1f}s: {out.strip().splitlines()[-1]}")
    _assert_nothing_left(before)


def test_v4ray_serve_says_what_a_waiting_deployment_waits_for(ray_cluster, tmp_path, tiny_ckpt):
    """Every CPU of the running cluster is held: the server's one bundle could fit, so `v4ray serve` deploys and
    waits, saying what for every few seconds; Ctrl-C stops it and the application is removed."""
    import ray
    from ray import serve
    from ray.util.placement_group import placement_group, remove_placement_group

    from v4ray.cluster.placement import PENDING_REPORT_AFTER_S

    before = _cluster_state()
    blocker = placement_group([{"CPU": 2}] * 3, strategy="STRICT_SPREAD")
    ray.get(blocker.ready(), timeout=30)
    conf = _serve_config(tmp_path, tiny_ckpt("v4-tiny"), free_port())
    proc = _serve(["--config", conf, "--address", ray_cluster.address])
    try:
        lines, line = _read_until(proc, "not deployed after", CLI_FAIL_FAST_S + PENDING_REPORT_AFTER_S)
        assert "1 placement group(s) waiting: 1 bundles [{CPU: 1}] (PACK)" in line, "".join(lines[-30:])
        assert "available now {CPU: 0}" in line
        print(line.strip())
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert "stopped before the application was deployed" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        remove_placement_group(blocker)
        serve.shutdown()   # the command started Serve on the shared cluster; --address leaves it running
    _assert_nothing_left(before)
