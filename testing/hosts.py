"""Real hosts on one machine: network namespaces joined by veth pairs and a bridge, a Ray node in each
(docs/architecture.md §13).

    python -m v4ray.testing.hosts up [--tag v4h] [--hosts 3] [--cpus 2]
    python -m v4ray.testing.hosts down [--tag v4h]

Host i is the namespace `<tag><i>` with its own address 10.213.<subnet>.<i+1>/24 on `eth0`, one end of a veth pair
whose other end (`<tag>v<i>`) sits on the bridge `<tag>br` in the machine's own namespace. The bridge holds
.254, so a process of this machine (a test, `curl`) reaches every host; the namespaces have no default route and
there is no NAT: nothing they send leaves the machine. Host 0 runs the Ray head, the others Ray workers that
join it over the bridge; every node binds to its own address, declares its CPUs and a custom resource
`v4ray_host_<i>` (and the label `v4ray.io/host=<i>`), and requires Ray's token authentication with a token made
for this cluster (0600, in the cluster's directory). Cutting a host's link (`cut`) and restoring it (`heal`)
takes its bridge port down and up: a real partition, seen by Ray's health checks.

A Ray driver must run on a node of its cluster: `driver()` runs Python code in host 0's namespace against the
head. Everything started is found again from the namespaces alone (`ip netns pids`), so `down` cleans up after a
crashed test or another process too, and leaves no namespace, bridge, process or directory behind.

Root and iproute2 are required (`missing()` says why when they are not there); tests skip then.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

GCS_PORT = 6379
# The head declares a node dead after 5 missed 1 s health checks (Ray's defaults: 3 s period, 10 s timeout, 5 misses:
# about half a minute); the same knobs an operator tunes. A partitioned host is then given up within ~10 s, and the
# cluster rebuilds what it held on the other hosts instead of waiting for it.
NODE_FAILURE_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                          "RAY_health_check_failure_threshold": "5"}
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
START_TIMEOUT_S = 180.0   # 3 Ray nodes on a 2-core machine come up in ~30 s; generous for a loaded CI host
STEP_TIMEOUT_S = 30.0     # any single ip(8) or kill


def missing() -> str | None:
    """Why real hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, as CI does)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is missing (apt-get install iproute2)"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns` does not work here: {r.stderr.strip()}"
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r


@dataclass
class Host:
    index: int
    ns: str
    address: str
    port: str     # its veth end on the bridge

    @property
    def resource(self) -> str:
        return f"v4ray_host_{self.index}"


@dataclass
class Hosts:
    """`num_hosts` namespaces with Ray: `up()` builds them, `down()` removes every trace (idempotent)."""

    tag: str = "v4h"
    num_hosts: int = 3
    cpus: int = 2
    subnet: int = 213
    head_cpus: int | None = None   # the head's CPUs (default `cpus`): fewer keep the workload on the workers
    root: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    hosts: list[Host] = field(init=False)
    _procs: list[subprocess.Popen] = field(init=False, default_factory=list)   # `ray start` of each host: reaped

    def __post_init__(self):
        if not (self.tag.isalnum() and self.tag.islower() and len(self.tag) <= 8):
            raise ValueError(f"tag must be up to 8 lowercase letters/digits (it names interfaces), got {self.tag!r}")
        if not 2 <= self.num_hosts <= 16:
            raise ValueError(f"num_hosts must be in [2, 16], got {self.num_hosts}")
        self.hosts = [Host(i, f"{self.tag}{i}", f"10.213.{self.subnet}.{i + 1}", f"{self.tag}v{i}")
                      for i in range(self.num_hosts)]
        self.dir = self.root / f"{self.tag}-hosts"
        if len(str(self.dir)) > 40:   # Ray's session sockets live below it; a unix socket path has 107 bytes
            raise ValueError(f"root {self.root} is too long for Ray's socket paths: use a short one (/tmp)")

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def bridge_address(self) -> str:
        return f"10.213.{self.subnet}.254"

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    @property
    def token_path(self) -> Path:
        return self.dir / "auth_token"

    def env(self) -> dict[str, str]:
        """The environment of every Ray process and driver of this cluster (token auth on, this cluster's token)."""
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
               "RAY_USAGE_STATS_ENABLED": "0",
               # "0" (what an embedded local Ray sets, cluster/local_ray.py) confines a node to 127.0.0.1
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", **NODE_FAILURE_DETECTION}
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env.pop(k, None)
        return env

    # ---- up -----------------------------------------------------------------------------------------------
    def up(self) -> "Hosts":
        problem = missing()
        if problem:
            raise RuntimeError(problem)
        if self.exists():
            raise RuntimeError(f"hosts tagged {self.tag!r} exist already: `python -m v4ray.testing.hosts down "
                               f"--tag {self.tag}` first")
        try:
            self._network()
            self.dir.mkdir(mode=0o700, parents=True)
            self.token_path.write_text(secrets.token_hex(32))
            self.token_path.chmod(0o600)
            for h in self.hosts:
                self._start_ray(h)
            self.wait_nodes(self.num_hosts)
        except BaseException:
            self.down()
            raise
        return self

    def _network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for h in self.hosts:
            _ip("netns", "add", h.ns)
            _ip("link", "add", h.port, "type", "veth", "peer", "name", f"{self.tag}p{h.index}")
            _ip("link", "set", f"{self.tag}p{h.index}", "netns", h.ns)
            _ip("link", "set", f"{self.tag}p{h.index}", "name", "eth0", ns=h.ns)
            _ip("addr", "add", f"{h.address}/24", "dev", "eth0", ns=h.ns)
            _ip("link", "set", "eth0", "up", ns=h.ns)
            _ip("link", "set", "lo", "up", ns=h.ns)
            _ip("link", "set", h.port, "master", self.bridge)
            _ip("link", "set", h.port, "up")

    def _start_ray(self, h: Host) -> None:
        temp = self.dir / f"h{h.index}"   # Ray's session files: short (unix socket paths), one per node
        cpus = self.head_cpus if h.index == 0 and self.head_cpus is not None else self.cpus
        args = ["start", "--block", f"--node-ip-address={h.address}", f"--num-cpus={cpus}",
                f"--resources={json.dumps({h.resource: 1})}", f"--labels=v4ray.io/host={h.index}",
                f"--temp-dir={temp}", "--object-store-memory=268435456", "--disable-usage-stats"]
        if h.index == 0:
            args += ["--head", f"--port={GCS_PORT}", "--include-dashboard=false"]
        else:
            args += [f"--address={self.gcs_address}"]
        log = open(self.dir / f"h{h.index}.log", "ab")
        # the namespace holds every process Ray starts: `down` finds them there
        self._procs.append(subprocess.Popen(["ip", "netns", "exec", h.ns, *RAY, *args], stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env(), start_new_session=True))
        log.close()

    def wait_nodes(self, count: int, timeout_s: float = START_TIMEOUT_S) -> list[dict]:
        """Block until `count` nodes are alive in the cluster (as the head sees them); -> their records."""
        code = f"""
import json, time, ray
ray.init(address={self.gcs_address!r}, log_to_driver=False)
deadline = time.time() + {timeout_s}
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= {count} or time.time() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([{{"address": n["NodeManagerAddress"], "resources": n["Resources"], "labels": n.get("Labels", {{}})}}
                  for n in alive]))
"""
        deadline = time.time() + timeout_s
        while True:   # the head's GCS may not listen yet
            r = self.driver(code, timeout_s=timeout_s + 30, check=False)
            if r.returncode == 0:
                nodes = json.loads(r.stdout.strip().splitlines()[-1])
                if len(nodes) >= count:   # a node the head has not yet noticed is gone may count for a while
                    return nodes
            if time.time() > deadline:
                raise TimeoutError(f"{count} Ray nodes not alive within {timeout_s:.0f} s: {r.stderr[-1500:]}\n"
                                   f"node logs: {self.dir}")
            time.sleep(1.0)

    def driver(self, code: str, timeout_s: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run Python `code` as a Ray driver on host 0 (a driver must run on one of its cluster's nodes)."""
        r = subprocess.run(["ip", "netns", "exec", self.head.ns, sys.executable, "-c", code], capture_output=True,
                           text=True, env={**self.env(), "RAY_ADDRESS": self.gcs_address}, timeout=timeout_s)
        if check and r.returncode != 0:
            raise RuntimeError(f"driver failed ({r.returncode}): {r.stderr[-3000:]}")
        return r

    # ---- faults -------------------------------------------------------------------------------------------
    def cut(self, index: int) -> None:
        """Partition host `index` from the others (its bridge port down)."""
        _ip("link", "set", self.hosts[index].port, "down")

    def heal(self, index: int) -> None:
        _ip("link", "set", self.hosts[index].port, "up")

    def kill(self, index: int) -> None:
        """Host death: SIGKILL every process of host `index` (its network stays; `revive` starts Ray again)."""
        h = self.hosts[index]
        deadline = time.time() + STEP_TIMEOUT_S
        while pids := self.pids(index):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.time() > deadline:
                raise RuntimeError(f"processes {pids} in {h.ns} survive SIGKILL")
            time.sleep(0.1)
        for proc in self._procs:   # reap our `ray start` of that host
            if proc.poll() is None and proc.args[3] == h.ns:
                proc.wait(STEP_TIMEOUT_S)

    def revive(self, index: int) -> None:
        """Start host `index`'s Ray node again (after `kill`, or after a partition made the head drop it) and wait
        until every host is alive."""
        self.kill(index)
        self._start_ray(self.hosts[index])
        self.wait_nodes(self.num_hosts)

    def pids(self, index: int) -> list[int]:
        r = _ip("netns", "pids", self.hosts[index].ns, check=False)
        return [int(p) for p in r.stdout.split()]

    # ---- down ---------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        names = _ip("netns", "list").stdout.split()
        return any(h.ns in names for h in self.hosts) or _ip("link", "show", self.bridge, check=False).returncode == 0

    def down(self) -> None:
        """Kill every process in the namespaces, delete them (their veth pairs go with them), the bridge and the
        cluster's directory. Safe to call on a half-built or absent cluster."""
        names = set(_ip("netns", "list", check=False).stdout.split())
        for h in self.hosts:
            if h.ns not in names:
                continue
            self.kill(h.index)
            _ip("netns", "del", h.ns, check=False)
        for proc in self._procs:   # killed above with everything in its namespace; not left a zombie
            proc.wait(STEP_TIMEOUT_S)
        self._procs.clear()
        for h in self.hosts:   # a veth whose namespace end was never moved
            _ip("link", "del", h.port, check=False)
        _ip("link", "del", self.bridge, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m v4ray.testing.hosts", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("--tag", default="v4h", help="names the namespaces, interfaces and directory")
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs each host's Ray node declares")
    args = ap.parse_args(argv)
    hosts = Hosts(tag=args.tag, num_hosts=args.hosts, cpus=args.cpus)
    if args.action == "down":
        hosts.down()
        print(f"hosts tagged {args.tag!r} are gone")
        return
    hosts.up()
    print(json.dumps({"gcs_address": hosts.gcs_address, "bridge_address": hosts.bridge_address,
                      "hosts": {h.ns: h.address for h in hosts.hosts}, "token_path": str(hosts.token_path)}, indent=1))
    print(f"a driver: sudo ip netns exec {hosts.head.ns} env RAY_AUTH_MODE=token "
          f"RAY_AUTH_TOKEN_PATH={hosts.token_path} RAY_ADDRESS={hosts.gcs_address} python ...")


if __name__ == "__main__":
    main()
