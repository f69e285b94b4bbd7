"""A bounded soak on real hosts (issue 19): 2 expert-parallel replicas on 3 network-namespace hosts, a steady mix of
requests at ~80 % of measured capacity, one worker host killed and restored, then a worker host cut off and healed.

    sudo python bench/soak.py [--duration 300] [--load 0.8] [--kill-at 60] [--revive-at 120]
                              [--cut-at 180] [--cut-s 20]

Needs root and iproute2 (v4ray.testing.hosts builds the hosts; nothing leaves the machine). One run:

1. Three hosts (Ray head with 1 CPU + 2 workers with 4, token auth), the tiny model served by 2 replicas, each 1
   router + 1 expert shard (+ its V4Server, 3 CPUs: one replica per worker), fp32, prefix caching through one
   shared KVCacheService; the proxy and the OpenAIIngress on host 0 (`ingress_resources`).
2. Reference answers for a fixed pool of prompts, one at a time, greedy: short, streamed, cached (a shared 256-token
   prefix) and long (~600 tokens) requests.
3. Capacity: the mix in a closed loop at a fixed concurrency for `--calibrate-s`; the soak's open-loop (Poisson)
   rate is `--load` times the requests/s reached.
4. The soak: that rate for `--duration` s. At `--kill-at` every process of one worker host (one replica) is
   SIGKILLed; at `--revive-at` its Ray node restarts; at `--cut-at` the other worker host's link goes down for
   `--cut-s`, then comes back and that host's Ray restarts (the head dropped it meanwhile). While a replica is
   gone the other carries ~1.6x its capacity: requests beyond its queue get a clean 429.
5. Drain, then the replicas' queues and KV pools are compared with their levels before the soak.

Every request ends as one of: ok (the reference answer), wrong (a different answer), error (a clean OpenAI-shaped
error: a JSON error body, or an error event in the stream) or lost (anything else: cut connection, client timeout,
a body that is not OpenAI-shaped). Goal: 0 lost, 0 wrong. Writes bench/results/soak.json and soak.png (a timeline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
from collections import Counter
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, table, write  # noqa: E402

APP = "soak"
PORT = 8000
SERVICE = "v4ray-soak-kv"
CLIENT_TIMEOUT_S = 90.0     # a request not answered by then is lost (the server's own deadline is 60 s)
MAX_IN_FLIGHT = 64          # the open loop's bound: arrivals beyond it are counted as shed, not sent
STATS_PERIOD_S = 2.0

PREFIX = [16 + (7 * i) % 250 for i in range(256)]   # the cached kind's shared 2-unit prefix


def request_pool() -> list[dict]:
    """The fixed prompts (token ids: the same bytes every time) of each kind, with their request bodies."""
    pool = []
    for k in range(6):
        pool.append({"kind": "short", "body": {"prompt": [20 + k, 30 + k, 40 + k, 50], "max_tokens": 8}})
        pool.append({"kind": "stream", "body": {"prompt": [60 + k, 70 + k, 80], "max_tokens": 32, "stream": True}})
        pool.append({"kind": "cached", "body": {"prompt": PREFIX + [100 + k, 110 + k], "max_tokens": 8}})
        pool.append({"kind": "long", "body": {"prompt": [16 + (13 * i + k) % 250 for i in range(600)],
                                              "max_tokens": 16}})
    for p in pool:
        p["body"].update({"model": "v4-tiny", "temperature": 0, "ignore_eos": True})
    return pool


async def send(session, url: str, body: dict) -> tuple[str, str | None]:
    """-> (outcome, text): 'done' with the text, 'error' (OpenAI-shaped) with its message, or 'lost: <why>'."""
    import aiohttp

    try:
        async with session.post(url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)) as r:
            if r.status != 200:
                try:
                    err = json.loads(await r.read())
                except ValueError:
                    return f"lost: status {r.status} without a JSON body", None
                if isinstance(err, dict) and "message" in err.get("error", {}):
                    return "error", err["error"]["message"]
                return f"lost: status {r.status}, body {str(err)[:80]}", None
            if not body.get("stream"):
                return "done", json.loads(await r.read())["choices"][0]["text"]
            text = []
            async for line in r.content:
                line = line.strip()
                if line == b"data: [DONE]":
                    return "done", "".join(text)
                if line.startswith(b"data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return "error", chunk["error"].get("message")
                    text += [c["text"] for c in chunk["choices"]]
            return "lost: stream ended without [DONE]", None
    except asyncio.TimeoutError:
        return f"lost: no answer in {CLIENT_TIMEOUT_S:.0f} s", None
    except aiohttp.ClientError as e:
        return f"lost: {type(e).__name__}", None


class Log:
    """Every request: when it was sent, how long it took, its kind and its outcome (ok/wrong/error/lost)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.shed = 0

    def add(self, t: float, latency: float, kind: str, outcome: str, detail: str | None = None):
        self.rows.append({"t": round(t, 3), "latency_s": round(latency, 4), "kind": kind, "outcome": outcome,
                          **({"detail": detail} if detail else {})})


async def one(session, url, item, refs, log: Log, t0: float):
    start = time.monotonic()
    outcome, text = await send(session, url, item["body"])
    latency = time.monotonic() - start
    if outcome == "done":
        outcome = "ok" if text == refs[id(item)] else "wrong"
        detail = None if outcome == "ok" else f"{text!r} != {refs[id(item)]!r}"
    else:
        outcome, detail = ("error", text) if outcome == "error" else ("lost", outcome[6:])
    log.add(start - t0, latency, item["kind"], outcome, detail)


async def references(url: str, pool: list[dict]) -> dict:
    import aiohttp

    refs = {}
    async with aiohttp.ClientSession() as s:
        for item in pool:
            outcome, text = await send(s, url, item["body"])
            assert outcome == "done", f"reference request failed: {outcome}: {text}"
            refs[id(item)] = text
    return refs


async def closed_loop(url: str, pool, refs, concurrency: int, seconds: float) -> float:
    """The mix at a fixed concurrency for `seconds` -> completed requests per second."""
    import aiohttp

    log, rng, t0 = Log(), random.Random(1), time.monotonic()

    async def worker(s):
        while time.monotonic() - t0 < seconds:
            await one(s, url, rng.choice(pool), refs, log, t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    ok = sum(r["outcome"] == "ok" for r in log.rows)
    assert ok == len(log.rows), f"calibration saw failures: {[r for r in log.rows if r['outcome'] != 'ok'][:3]}"
    return ok / (time.monotonic() - t0)


async def open_loop(url: str, pool, refs, rate: float, seconds: float, faults, log: Log) -> float:
    """Poisson arrivals at `rate` for `seconds` while `faults` (a coroutine taking t0) runs; waits for every
    request to end. -> t0 (monotonic)."""
    import aiohttp

    rng = random.Random(2)
    t0 = time.monotonic()
    fault_task = asyncio.ensure_future(faults(t0))
    tasks, sem_free = set(), asyncio.Semaphore(MAX_IN_FLIGHT)

    async def run(s, item):
        try:
            await one(s, url, item, refs, log, t0)
        finally:
            sem_free.release()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        next_at = 0.0
        while next_at < seconds:
            await asyncio.sleep(max(0.0, t0 + next_at - time.monotonic()))
            if sem_free.locked():
                log.shed += 1
            else:
                await sem_free.acquire()
                t = asyncio.ensure_future(run(s, rng.choice(pool)))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            next_at += rng.expovariate(rate)
        await fault_task
        if tasks:
            await asyncio.wait(tasks)
    return t0


STATS_CODE = """
import json, sys, time, ray
from ray import serve
ray.init(log_to_driver=False)
h = serve.get_deployment_handle("V4Server", app_name=%r)
while True:
    seen = {}
    for _ in range(6):   # the router spreads these over the replicas
        try:
            s = h.stats.remote().result(timeout_s=3)
            seen[s["replica"]] = {k: s.get(k) for k in ("waiting", "running", "kv_blocks", "kv_free_blocks",
                                                         "requests_in_flight", "address", "dead")}
            seen[s["replica"]]["ranks"] = [f"{r['role']}@{r['address']}" for r in s.get("ranks") or []]
        except Exception as e:
            seen.setdefault("error", type(e).__name__)
    print(json.dumps({"wall": time.time(), "replicas": seen}), flush=True)
    time.sleep(%r)
"""


class StatsPoller:
    """A driver on host 0 printing every replica's queue and KV-pool levels every STATS_PERIOD_S."""

    def __init__(self, hosts):
        self.samples: list[dict] = []
        self.proc = subprocess.Popen(["ip", "netns", "exec", hosts.head.ns, sys.executable, "-c",
                                      STATS_CODE % (APP, STATS_PERIOD_S)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True,
                                     env={**hosts.env(), "RAY_ADDRESS": hosts.gcs_address})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(json.loads(line))
            except ValueError:
                pass

    def latest(self, replicas: int, timeout_s: float = 30.0) -> dict:
        """The newest sample that saw `replicas` replicas (and no error)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for s in reversed(self.samples):
                if len(s["replicas"]) == replicas and "error" not in s["replicas"] and s["wall"] > time.time() - 10:
                    return s["replicas"]
            time.sleep(0.5)
        raise TimeoutError(f"no stats sample saw {replicas} replicas in {timeout_s:.0f} s")

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=30)


def pool_levels(replicas: dict) -> dict:
    return {"waiting": sum(r["waiting"] or 0 for r in replicas.values()),
            "running": sum(r["running"] or 0 for r in replicas.values()),
            "kv_blocks": sum(r["kv_blocks"] or 0 for r in replicas.values()),
            "kv_free_blocks": sum(r["kv_free_blocks"] or 0 for r in replicas.values())}


def window(rows: list[dict], lo: float, hi: float) -> dict:
    xs = sorted(r["latency_s"] for r in rows if lo <= r["t"] < hi and r["outcome"] == "ok")
    out = {"from_s": lo, "to_s": hi, "sent": sum(lo <= r["t"] < hi for r in rows), "ok": len(xs),
           **{o: sum(lo <= r["t"] < hi and r["outcome"] == o for r in rows) for o in ("error", "lost", "wrong")}}
    errors = Counter((r.get("detail") or "")[:100] for r in rows if lo <= r["t"] < hi and r["outcome"] == "error")
    if errors:
        out["error_messages"] = dict(errors.most_common(5))
    if xs:
        out.update({"p50_ms": round(1e3 * statistics.median(xs), 1),
                    "p99_ms": round(1e3 * xs[max(0, int(len(xs) * 0.99) - 1)], 1)})
    return out


def plot(rows: list[dict], samples: list[dict], wall0: float, marks: list[tuple[str, float, float]],
         seconds: float) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e .[bench])")
        return None
    fig, ax = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    end = int(max([seconds] + [r["t"] + r["latency_s"] for r in rows])) + 1
    for outcome, color in [("ok", "tab:green"), ("error", "tab:orange"), ("lost", "tab:red"), ("wrong", "black")]:
        counts = [0] * end
        for r in rows:
            if r["outcome"] == outcome:
                counts[int(r["t"] + r["latency_s"])] += 1
        if any(counts):
            ax[0].plot(range(end), counts, color=color, label=outcome, lw=1)
    ax[0].set(ylabel="requests ended / s", title="soak: 2 replicas on 3 hosts")
    ax[0].legend(loc="upper right")
    ok = [r for r in rows if r["outcome"] == "ok"]
    ax[1].scatter([r["t"] for r in ok], [1e3 * r["latency_s"] for r in ok], s=3, alpha=0.5)
    ax[1].set(ylabel="latency ms (ok)", yscale="log")
    ts = [s["wall"] - wall0 for s in samples]
    for key, color in [("running", "tab:blue"), ("waiting", "tab:purple")]:
        ax[2].plot(ts, [sum((r.get(key) or 0) for k, r in s["replicas"].items() if k != "error") for s in samples],
                   color=color, label=key)
    used = [sum((r.get("kv_blocks") or 0) - (r.get("kv_free_blocks") or 0) for k, r in s["replicas"].items()
                if k != "error") for s in samples]
    ax[2].plot(ts, used, color="tab:gray", label="KV blocks in use")
    ax[2].set(xlabel="s since the soak began", ylabel="all replicas")
    ax[2].legend(loc="upper right")
    for a in ax:
        for name, lo, hi in marks:
            a.axvspan(lo, hi, color="tab:red", alpha=0.12)
        a.set_xlim(0, end)
    for name, lo, hi in marks:
        ax[0].text(lo, ax[0].get_ylim()[1] * 0.9, name, fontsize=8)
    fig.tight_layout()
    path = RESULTS / "soak.png"
    fig.savefig(path, dpi=100)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--calibrate-s", type=float, default=30.0)
    ap.add_argument("--calibrate-concurrency", type=int, default=8)
    ap.add_argument("--kill-at", type=float, default=60.0)
    ap.add_argument("--revive-at", type=float, default=120.0)
    ap.add_argument("--cut-at", type=float, default=180.0)
    ap.add_argument("--cut-s", type=float, default=20.0)
    ap.add_argument("--logs", default="/tmp/v4ray-soak-logs", help="where the hosts' Serve logs are copied at the end")
    args = ap.parse_args()
    assert args.kill_at < args.revive_at < args.cut_at < args.cut_at + args.cut_s < args.duration

    from v4ray.testing.hosts import Hosts, missing

    if missing():
        sys.exit(f"bench/soak.py needs real hosts: {missing()}")
    began = time.monotonic()
    # a replica (V4Server, router, shard: 3 CPUs) packs onto one 4-CPU worker; the head (1 CPU) keeps Serve's
    # controller, proxy and ingress: each fault below hits a host that holds a replica
    hosts = Hosts(tag="v4s", num_hosts=3, cpus=4, head_cpus=1, subnet=216)
    hosts.down()
    hosts.up()
    poller = None
    try:
        config = {"model": "v4-tiny", "model_cache_dir": str(hosts.dir / "models"), "dtype": "float32",
                  # a collective waits for the slowest rank's step; 30 s (and 512-token steps) leave room for slow
                  # steps on 2 oversubscribed cores. (Replicas used to fail their collectives after a fault: their
                  # routers waited 30 s on a KVCacheService whose host was gone; calls now end within 5 s.)
                  "num_replicas": 2, "num_routers": 1, "num_expert_shards": 1, "collective_timeout_s": 30.0,
                  "max_num_batched_tokens": 512,
                  "max_model_len": 1024, "request_timeout_s": 60, "enable_prefix_caching": True,
                  "kv_cache_service": SERVICE, "ingress_resources": {"v4ray_host_0": 0.01}}
        hosts.driver(f"""
import ray
from ray import serve
from v4ray.serve.app import build_app
ray.init(log_to_driver=False)
serve.start(http_options={{"host": {hosts.head.address!r}, "port": {PORT}}}, proxy_location="HeadOnly")
serve.run(build_app({config!r}), name={APP!r}, route_prefix="/", blocking=False)
""", timeout_s=300)
        url = f"http://{hosts.head.address}:{PORT}"
        import requests

        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the application never became ready"
            time.sleep(1.0)
        poller = StatsPoller(hosts)
        before = poller.latest(2, timeout_s=120)
        placement = {rid: r["address"] for rid, r in before.items()}
        print(f"ready after {time.monotonic() - began:.0f} s; replicas on {placement}, their ranks on "
              f"{ {rid: r.get('ranks') for rid, r in before.items()} }", flush=True)

        pool = request_pool()
        refs = asyncio.run(references(url, pool))
        service_host = None   # where the shared KVCacheService lives: its host's death or cut-off stalls its callers
        for _ in range(30):
            out = hosts.driver(f"""
import ray
from ray._private.state import actors   # the GCS's actor table: these hosts run no dashboard for the state API
ray.init(log_to_driver=False)
print([a["Address"]["IPAddress"] for a in actors().values() if a["Name"] == {SERVICE!r} and a["State"] == "ALIVE"])
""", timeout_s=90).stdout.strip().splitlines()[-1]
            if out != "[]":
                service_host = out.strip("[]'")
                break
            time.sleep(2.0)   # the routers start it at their first prefix lookup
        print(f"KVCacheService on {service_host}", flush=True)
        capacity = asyncio.run(closed_loop(url, pool, refs, args.calibrate_concurrency, args.calibrate_s))
        rate = args.load * capacity
        print(f"capacity {capacity:.2f} req/s at concurrency {args.calibrate_concurrency}; soak at {rate:.2f} req/s",
              flush=True)

        holding = set(placement.values())        # the hosts of the two V4Servers
        kill_victim = next((h for h in hosts.hosts[1:] if h.address in holding), hosts.hosts[1])
        cut_victim = next(h for h in hosts.hosts[1:] if h is not kill_victim)
        print(f"kill {kill_victim.ns} ({'holds' if kill_victim.address in holding else 'holds no'} replica), "
              f"cut {cut_victim.ns} ({'holds' if cut_victim.address in holding else 'holds no'} replica)", flush=True)
        events: list[dict] = []

        def heal_and_restart(index: int):
            """The head dropped the cut-off node (5 missed 1 s health checks) and its raylet exits on return, as a
            pod's would; its Ray starts again, as Kubernetes would restart that pod."""
            hosts.heal(index)
            hosts.revive(index)

        async def faults(t0: float):
            async def at(s: float):
                await asyncio.sleep(max(0.0, t0 + s - time.monotonic()))

            for when, what, fn in [(args.kill_at, f"kill {kill_victim.ns}", lambda: hosts.kill(kill_victim.index)),
                                   (args.revive_at, f"revive {kill_victim.ns}",
                                    lambda: hosts.revive(kill_victim.index)),
                                   (args.cut_at, f"cut {cut_victim.ns}", lambda: hosts.cut(cut_victim.index)),
                                   (args.cut_at + args.cut_s, f"heal {cut_victim.ns}, restart its Ray",
                                    lambda: heal_and_restart(cut_victim.index))]:
                await at(when)
                await asyncio.to_thread(fn)
                events.append({"t": round(time.monotonic() - t0, 2), "event": what})
                print(f"  t={events[-1]['t']:6.1f} s  {what}", flush=True)

        log = Log()
        wall0 = time.time()
        asyncio.run(open_loop(url, pool, refs, rate, args.duration, faults, log))
        print(f"soak sent its last request; all ended after {time.time() - wall0:.0f} s", flush=True)

        # A sample is the replicas' levels when the poller asked, which lags while a replica stalls: wait (up to
        # a minute) for the levels to return to the baseline, and report how long that took.
        levels_before, drained_at = pool_levels(before), time.monotonic()
        while True:
            time.sleep(STATS_PERIOD_S)
            after = poller.latest(2, timeout_s=180)
            levels_after = pool_levels(after)
            back_after_s = time.monotonic() - drained_at
            if levels_after == levels_before or back_after_s > 60:
                break
        print(f"pools {'back to' if levels_after == levels_before else 'NOT back to'} their levels before the "
              f"soak {back_after_s:.0f} s after the last request ended; replicas on "
              f"{ {rid: (r['address'], r.get('ranks')) for rid, r in after.items()} }", flush=True)
        rows = log.rows
        phases = [("before", 0.0, args.kill_at), ("host dead", args.kill_at, args.revive_at),
                  ("host back", args.revive_at, args.cut_at), ("partition", args.cut_at, args.cut_at + args.cut_s),
                  ("after", args.cut_at + args.cut_s, args.duration)]
        windows = [{"phase": name, **window(rows, lo, hi)} for name, lo, hi in phases]
        totals = {"sent": len(rows), "shed": log.shed,
                  **{o: sum(r["outcome"] == o for r in rows) for o in ("ok", "error", "lost", "wrong")}}
        print(table(windows, ["phase", "from_s", "to_s", "sent", "ok", "error", "lost", "wrong", "p50_ms",
                              "p99_ms"]))
        print(f"totals {totals}; pools before {levels_before}, after {levels_after}")
        for w in windows:
            if w.get("error_messages"):
                print(f"  errors {w['phase']}: {w['error_messages']}")
        bad = [r for r in rows if r["outcome"] in ("lost", "wrong")][:10]
        if bad:
            print("lost or wrong:", json.dumps(bad, indent=1))
        marks = [("host dead", args.kill_at, args.revive_at), ("partition", args.cut_at, args.cut_at + args.cut_s)]
        png = plot(rows, [s for s in poller.samples if s["wall"] >= wall0 - 5], wall0, marks, args.duration)
        path = write("soak", {
            "args": vars(args), "hosts": [h.address for h in hosts.hosts], "replicas_before": placement,
            "kv_cache_service_host": service_host,
            "replicas_after": {rid: r["address"] for rid, r in after.items()},
            "ranks_before": {rid: r.get("ranks") for rid, r in before.items()},
            "ranks_after": {rid: r.get("ranks") for rid, r in after.items()},
            "capacity_req_s": round(capacity, 2), "rate_req_s": round(rate, 2), "events": events,
            "totals": totals, "phases": windows, "pool_levels": {"before": levels_before, "after": levels_after},
            "pools_back_to_baseline": levels_after == levels_before,
            "pools_back_after_s": round(back_after_s, 1), "lost_or_wrong": bad,
            "wall_s": round(time.monotonic() - began, 1)})
        print(f"wrote {path}" + (f" and {png}" if png else ""))
    finally:
        if poller is not None:
            poller.stop()
        import shutil

        shutil.rmtree(args.logs, ignore_errors=True)
        for logs in hosts.dir.glob("h*/session_2*/logs/serve"):   # every node's Serve logs, for a post-mortem
            shutil.copytree(logs, Path(args.logs) / logs.parts[-4] / logs.parts[-3], dirs_exist_ok=True)
        hosts.driver("import ray\nfrom ray import serve\nray.init(log_to_driver=False)\nserve.shutdown()\n"
                     f"ray.kill(ray.get_actor({SERVICE!r}, namespace='v4ray'), no_restart=True)",
                     timeout_s=120, check=False)
        hosts.down()


if __name__ == "__main__":
    main()
