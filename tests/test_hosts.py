"""The multi-host test cluster (v4ray.testing.hosts): three Ray nodes in network namespaces, each on its own address,
joined over a bridge, token auth required; a link cut and healed; nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from v4ray.serve.deployments import READY_TIMEOUT_S
from v4ray.testing.hosts import Hosts, missing

pytestmark = pytest.mark.skipif(missing() is not None, reason=f"no real hosts here: {missing()}")

TAG = "v4t"            # not the CLI's default tag: a person's `hosts up` and a test run do not collide
AUTH_REFUSAL_S = 10.0
PRESETS = ["v4-tiny", "v4-tiny-pro", "v4-tiny-rates", "v4-tiny-swa"]  # a driver with the wrong token logs the refusal within its first retry (~1 s)


@pytest.fixture(scope="module")
def hosts():
    h = Hosts(tag=TAG, subnet=214)   # its directory under /tmp: Ray's unix socket paths must stay short
    h.down()  # what a killed earlier run may have left
    h.up()
    yield h
    h.down()


def _connects(hosts: Hosts, src: int, address: str, port: int) -> bool:
    code = (f"import socket\ntry:\n    socket.create_connection(({address!r}, {port}), timeout=2).close()\n"
            f"    print('yes')\nexcept OSError:\n    print('no')")
    r = subprocess.run(["ip", "netns", "exec", hosts.hosts[src].ns, sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=30)
    return r.stdout.strip() == "yes"


@pytest.mark.timeout(300)
def test_three_hosts_each_run_their_own_tasks_and_require_the_token(hosts):
    nodes = hosts.wait_nodes(3)
    assert sorted(n["address"] for n in nodes) == [h.address for h in hosts.hosts]
    for n in nodes:
        i = hosts.hosts[[h.address for h in hosts.hosts].index(n["address"])].index
        assert n["resources"][f"v4ray_host_{i}"] == 1 and n["resources"]["CPU"] == hosts.cpus
        assert n["labels"].get("v4ray.io/host") == str(i)
    out = hosts.driver("""
import json, ray
ray.init(log_to_driver=False)
@ray.remote(num_cpus=0)
def where():
    return ray.util.get_node_ip_address()
print(json.dumps([ray.get(where.options(resources={f"v4ray_host_{i}": 0.01}).remote(), timeout=60) for i in range(3)]))
""").stdout
    assert json.loads(out.strip().splitlines()[-1]) == [h.address for h in hosts.hosts]

    # the wrong token is refused by the head (Ray keeps retrying: the refusal is in its log, then we stop it)
    bad = hosts.dir / "wrong_token"
    bad.write_text("0" * 64)
    env = {**hosts.env(), "RAY_AUTH_TOKEN_PATH": str(bad), "RAY_ADDRESS": hosts.gcs_address}
    p = subprocess.Popen(["ip", "netns", "exec", hosts.head.ns, sys.executable, "-c",
                          "import ray; ray.init(log_to_driver=False); print('CONNECTED')"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = p.communicate(timeout=AUTH_REFUSAL_S)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    assert "CONNECTED" not in out and "InvalidAuthToken" in err, err[-2000:]


@pytest.mark.timeout(420)
def test_an_expert_parallel_replica_across_hosts_matches_one_process(hosts):
    """Router on host 0, one expert shard on each other host (a shard bundle takes a whole host's 2 CPUs; host 0
    keeps one for the router): the all-to-all crosses the bridge on Ray's node addresses, and greedy tokens equal
    the single-process engine's on every tiny preset."""
    out = hosts.driver(f"""
import json, tempfile
from pathlib import Path
from v4ray import LLM, SamplingParams
from v4ray.model.tiny import make_tiny
prompts = [{{"prompt_token_ids": list(range(5 + i, 40 + 37 * i))}} for i in range(3)]
p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
res = {{}}
for preset in {PRESETS!r}:
    ckpt = make_tiny(Path(tempfile.mkdtemp(dir={str(hosts.dir)!r})) / "ckpt", preset=preset, dtype="fp32")
    ref = [o.outputs[0].token_ids for o in LLM(ckpt, dtype="float32", device="cpu").generate(prompts, p)]
    with LLM(ckpt, address="auto", dtype="float32", num_routers=1, num_expert_shards=2, collective_timeout_s=60,
             replica_options={{"router_resources": {{"CPU": 1, "v4ray_host_0": 0.01}},
                               "shard_resources": {{"CPU": {hosts.cpus}}}}}) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
        res[preset] = {{"equal": got == ref, "addresses": [r["address"] for r in llm.replica.actor_info()]}}
print(json.dumps(res))
""", timeout_s=400).stdout
    res = json.loads(out.strip().splitlines()[-1])
    addresses = [h.address for h in hosts.hosts]
    for preset in PRESETS:
        assert res[preset]["equal"], preset
        router, *shards = res[preset]["addresses"]
        assert router == addresses[0] and sorted(shards) == addresses[1:], res[preset]


@pytest.mark.timeout(120)
def test_a_cut_link_partitions_the_host_until_healed(hosts):
    target = hosts.hosts[2]
    nodes = json.loads(hosts.driver("""
import json, ray
ray.init(log_to_driver=False)
print(json.dumps({n["NodeManagerAddress"]: n["NodeManagerPort"] for n in ray.nodes() if n["Alive"]}))
""").stdout.strip().splitlines()[-1])
    port = nodes[target.address]   # host 2's raylet listens there
    assert _connects(hosts, 0, target.address, port)
    hosts.cut(target.index)
    try:
        assert not _connects(hosts, 0, target.address, port)
        assert not _connects(hosts, 1, target.address, port)
        assert _connects(hosts, 1, hosts.head.address, 6379)   # the rest of the network is whole
    finally:
        hosts.heal(target.index)
    assert _connects(hosts, 0, target.address, port)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for a parent outside this test to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_down_leaves_nothing_behind():
    h = Hosts(tag="v4d", num_hosts=2, subnet=215)
    h.down()
    h.up()
    pids = [p for i in range(2) for p in h.pids(i)]
    assert pids
    h.down()
    h.down()  # idempotent
    assert not any(n.startswith("v4d") for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                               text=True).stdout.split())
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert "v4dbr" not in links and "v4dv" not in links
    assert not h.dir.exists()
    alive = [p for p in pids if _running(p)]
    assert not alive, f"processes {alive} outlived down()"


# ---- Serve across the hosts, and a host that dies ----------------------------------------------------------------

SERVE_PORT = 8000
COLLECTIVE_TIMEOUT_S = 5.0   # the replica's: a dead rank fails the step within it
READY_RED_S = 5.0            # /ready turns 503 within this of the failure being detected
RECOVERY_S = 60.0            # the bound: serving again without an operator
PARTITION_S = 20.0           # how long a partitioned host stays cut off
STREAM_DEADLINE_S = 90.0     # a stream's client gives up here; the server's own deadline (request_timeout_s) is 60 s


def _deploy(hosts: Hosts, name: str, **args) -> str:
    """Deploy the tiny model as an expert-parallel replica (1 router, 2 shards) with Serve's proxy and the
    OpenAIIngress on host 0 (`ingress_resources`); the application outlives the driver. -> its base URL (reached
    over the bridge)."""
    config = {"model": "v4-tiny", "model_cache_dir": str(hosts.dir / "models"), "num_routers": 1,
              "num_expert_shards": 2, "collective_timeout_s": COLLECTIVE_TIMEOUT_S, "max_model_len": 512,
              "request_timeout_s": 60, "ingress_resources": {"v4ray_host_0": 0.01}, **args}
    hosts.driver(f"""
import ray
from ray import serve
from v4ray.serve.app import build_app
ray.init(log_to_driver=False)
serve.start(http_options={{"host": {hosts.head.address!r}, "port": {SERVE_PORT}}}, proxy_location="HeadOnly")
serve.run(build_app({config!r}), name={name!r}, route_prefix="/", blocking=False)
""", timeout_s=120)
    return f"http://{hosts.head.address}:{SERVE_PORT}"


def _server_stats(hosts: Hosts) -> dict:
    """The V4Server's stats, plus "ingress": the address of the host running the OpenAIIngress replica."""
    out = hosts.driver("""
import json, ray
from ray import serve
from ray._private.state import actors   # the GCS's actor table: these hosts run no dashboard for the state API
ray.init(log_to_driver=False)
stats = serve.get_deployment_handle("V4Server", app_name="chaos").stats.remote().result(timeout_s=30)
ingress = [a for a in actors().values() if a["ActorClassName"] == "ServeReplica:chaos:OpenAIIngress"
           and a["State"] == "ALIVE"]
print(json.dumps({**stats, "ingress": ingress[0]["Address"]["IPAddress"]}))
""", timeout_s=90).stdout
    return json.loads(out.strip().splitlines()[-1])


def _wait_status(url: str, path: str, status: int, within_s: float) -> float:
    """Poll until `path` answers `status`; -> seconds it took (fails past `within_s`)."""
    import requests

    t0 = time.monotonic()
    while True:
        try:
            if requests.get(url + path, timeout=READY_TIMEOUT_S + 2).status_code == status:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        assert time.monotonic() - t0 < within_s, f"{path} did not answer {status} within {within_s:.0f} s"
        time.sleep(0.2)


def _greedy(url: str, timeout_s: float = 60) -> str:
    import requests

    r = requests.post(url + "/v1/completions", timeout=timeout_s,
                      json={"model": "v4-tiny", "prompt": "across hosts", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text[:500]
    return r.json()["choices"][0]["text"]


def _stream_outcome(url: str, deadline_s: float) -> str:
    """One long stream: 'error' (an OpenAI-shaped error event or status), 'done' ([DONE]) or 'cut' (the connection
    ended without either); never more than `deadline_s`."""
    import requests

    body = {"model": "v4-tiny", "prompt": "a long answer", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t0 = time.monotonic()
    try:
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=deadline_s) as r:
            if r.status_code != 200:
                return "error" if "error" in r.json() else f"status {r.status_code}"
            for line in r.iter_lines():
                assert time.monotonic() - t0 < deadline_s, "stream ran past its deadline"
                if line.startswith(b'data: {"error"'):
                    return "error"
                if line == b"data: [DONE]":
                    return "done"
    except requests.RequestException:
        return "cut"
    return "cut"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fault", ["host death", "partition"])
def test_a_worker_host_fault_mid_generation_and_the_service_heals(hosts, fault):
    """While streams run, a worker host holding part of the replica either dies (SIGKILL of every process on it) or
    is cut off for PARTITION_S and then reconnected. Each stream ends cleanly (an OpenAI-shaped error event, or
    [DONE]) before its deadline, /ready turns 503, Serve serves again with no operator within RECOVERY_S of the
    fault (on the remaining hosts: the layout fits on two), and greedy output afterwards equals the output before."""
    from concurrent.futures import ThreadPoolExecutor

    url = _deploy(hosts, "chaos")
    try:
        _wait_status(url, "/ready", 200, 240)
        before = _greedy(url)
        stats = _server_stats(hosts)
        # the ingress stays on host 0 as ingress_resources asks: a dead ingress would cut its open connections
        # (Serve restarts it), which is not the fault under test
        assert stats["ingress"] == hosts.head.address, stats["ingress"]
        used = {r["address"] for r in stats["ranks"]} | {stats["address"]}   # ranks and the V4Server
        victims = [h for h in hosts.hosts[1:] if h.address in used]
        assert victims, f"no worker host holds part of the replica: {stats['ranks']}, server on {stats['address']}"
        victim = victims[0]
        with ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(_stream_outcome, url, STREAM_DEADLINE_S) for _ in range(3)]
            time.sleep(3.0)   # the streams are generating
            fault_at = time.monotonic()
            if fault == "host death":
                hosts.kill(victim.index)
            else:
                hosts.cut(victim.index)
            try:
                red_after = _wait_status(url, "/ready", 503, COLLECTIVE_TIMEOUT_S + READY_RED_S + 10)
                outcomes = [f.result(timeout=STREAM_DEADLINE_S + 30) for f in streams]
            finally:
                if fault == "partition":
                    time.sleep(max(0.0, fault_at + PARTITION_S - time.monotonic()))
                    hosts.heal(victim.index)
        assert all(o in ("error", "done") for o in outcomes), outcomes   # a clean end, none hangs or is cut
        assert "error" in outcomes
        _wait_status(url, "/ready", 200, RECOVERY_S)
        healed_after = time.monotonic() - fault_at
        assert healed_after <= RECOVERY_S
        assert _greedy(url) == before
        print(f"{fault} of {victim.ns}: /ready red {red_after:.1f} s after it, serving again after {healed_after:.1f} "
              f"s; streams {outcomes}")
    finally:
        hosts.driver("import ray\nfrom ray import serve\nray.init(log_to_driver=False)\nserve.shutdown()",
                     timeout_s=120, check=False)
        if fault == "partition":
            hosts.revive(victim.index)   # the head may have dropped it while it was cut off
        for h in hosts.hosts[1:]:
            if not hosts.pids(h.index):
                hosts.revive(h.index)


@pytest.mark.timeout(400)
def test_the_kv_cache_service_killed_mid_load_costs_hits_not_answers(hosts):
    """Requests sharing a long prefix run 4 at a time while the KVCacheService (a detached actor, pinned to host 2
    by `kv_cache_service_resources`) is killed: every request still answers 200 with the text it gave before the
    fault (a lost prefix is a miss, recomputed), /ready stays 200, and once Ray has restarted the service (on host 2
    again) a stored prefix is a hit again."""
    import requests
    from concurrent.futures import ThreadPoolExecutor

    service = "v4t-kv-chaos"
    url = _deploy(hosts, "kvchaos", num_expert_shards=0, enable_prefix_caching=True,
                  kv_cache_service=service, kv_cache_service_resources={"v4ray_host_2": 0.01})
    prefix = [16 + (7 * i) % 256 for i in range(2 * 128)]
    prompts = [prefix + [16 + k, 17 + k] for k in range(16)]

    def complete(prompt: list[int]) -> tuple[str, int]:
        r = requests.post(url + "/v1/completions", timeout=60,
                          json={"model": "v4-tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text[:500]
        details = r.json()["usage"].get("prompt_tokens_details") or {}
        return r.json()["choices"][0]["text"], details.get("cached_tokens", 0)

    try:
        _wait_status(url, "/ready", 200, 240)
        reference = {k: complete(p)[0] for k, p in enumerate(prompts)}   # one at a time, before the fault
        with ThreadPoolExecutor(4) as pool:
            later = [pool.submit(complete, p) for p in prompts]
            time.sleep(0.5)
            hosts.driver(f"import ray\nray.init(log_to_driver=False)\n"
                         f"ray.kill(ray.get_actor({service!r}, namespace='v4ray'), no_restart=False)", timeout_s=60)
            results = [f.result(timeout=120) for f in later]
        assert [text for text, _ in results] == [reference[k] for k in range(len(prompts))]
        assert requests.get(url + "/ready", timeout=READY_TIMEOUT_S + 2).status_code == 200
        deadline = time.monotonic() + RECOVERY_S
        while True:   # the restarted service is empty: one request stores the prefix, the next one hits it
            complete(prefix + [99])
            if complete(prefix + [98])[1] >= 2 * 128:
                break
            assert time.monotonic() < deadline, "the restarted KVCacheService never served a hit"
            time.sleep(1.0)
        where = hosts.driver(f"""
from ray._private.state import actors
import ray
ray.init(log_to_driver=False)
print([a["Address"]["IPAddress"] for a in actors().values() if a["Name"] == {service!r} and a["State"] == "ALIVE"])
""", timeout_s=60).stdout.strip().splitlines()[-1]
        assert where == str([hosts.hosts[2].address])   # kv_cache_service_resources placed it, and its restart
    finally:
        hosts.driver("import ray\nfrom ray import serve\nray.init(log_to_driver=False)\nserve.shutdown()\n"
                     f"ray.kill(ray.get_actor({service!r}, namespace='v4ray'), no_restart=True)",
                     timeout_s=120, check=False)
