"""The MoE all-to-all between routers and expert shards, over torch.distributed (NCCL on GPUs, gloo on CPUs).

Ranks: routers 0..R-1, expert shards R..R+S-1, one process group per model replica. Every rank takes part in
every MoE layer's exchange, in layer order, so routers step in lockstep; a rank with nothing to send sends
zero rows. Per layer:

1. counts: all_to_all_single of int64 [world, 2] — how many (token, expert) rows each rank sends to each rank,
   and how many of them are used (the same, except in a fixed-capacity block); each rank then reads its sent and
   received counts to the host in one transfer: the split sizes of the two collectives below (the one
   device->host sync per MoE layer on each rank, except a router in a fixed-capacity exchange);
2. dispatch: all_to_all_single of the rows [M, D + 2] = hidden vector, expert id, routing weight (fp32);
3. combine: all_to_all_single of the weighted expert outputs [M, D] back, with the split sizes reversed.

Fixed capacity (a router's fixed-shape decode step, `static=True`): the router sends every shard a block of
C = N * top_k rows — all of its rows could go to one shard — its used rows first, so its split sizes are known
on the host before any data exists and it reads nothing back (DeepEP's low-latency mode sends into fixed-size
buffers the same way). Routers receive no dispatch rows in either mode, so their receive sizes are always zero.
The used counts travel in the counts exchange, computed on the device; the shards read them with the sizes
(their own step is not captured), compute only the used rows and return zeros for the rest. The collectives per
layer stay the same three, so a router in a decode step and one in a prefill step still meet in lockstep.

Micro-batches (ping-pong, docs/architecture.md §4): a step may run every MoE layer's exchange `micro_batches` times
(the driver chooses per step, every rank follows). A router that split its decode batch starts micro-batch A's
exchange without waiting (`start`: the three collectives issued asynchronously, fixed capacity), computes B's
attention and gating while the shards run A's experts, starts B's exchange, and only then waits for A's combine
(`finish`). A router with one batch (a prefill step, a small batch) sends it as the first micro-batch and an empty
one after it, so the collectives stay in the same order on every rank.

Every buffer, count and index lives on the rank's `device` (NCCL takes CUDA tensors only); routing tables are
computed there, and a shard counts the rows each expert serves in a device tensor read only by `stats()`.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from v4ray.kernels import expert_mlp
from v4ray.kernels.moe import StackedExperts
from v4ray.model.expert_placement import ExpertPlacement
from v4ray.model.v4 import combine_rows, group_rows


def rendezvous_listener(host: str) -> socket.socket:
    """A listening socket on `host` with a kernel-chosen port, for rank 0's TCPStore. Holding it from the
    moment the address is published leaves no window for another process to take the port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def tcp_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA ranks, gloo for CPU ranks: from the rank's own device, not from what the node has."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def interface_of(address: str) -> str | None:
    """The name of this host's network interface that holds `address`, or None (psutil comes with Ray)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name
    return None


SOCKET_IFNAME = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}


def bind_to_address(backend: str, node_address: str) -> str | None:
    """Make `backend`'s own connections use the interface of `node_address` (the address Ray gave this node), unless
    the operator chose one (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME set). Left to itself gloo takes the address
    its host name resolves to, which on a host with several interfaces (or in a network namespace) can be another
    interface or loopback: its peers then connect to their own 127.0.0.1 and the group never forms. -> the
    interface used, or None (the variable was set, or no interface holds the address)."""
    var = SOCKET_IFNAME[backend]
    if os.environ.get(var):
        return None
    name = interface_of(node_address)
    if name is not None:
        os.environ[var] = name
    return name


def init_group(address: str, rank: int, world_size: int, timeout_s: float, listener: socket.socket | None = None,
               device: torch.device | str = "cpu", backend: str | None = None,
               node_address: str | None = None) -> str:
    """Join the replica's process group through the TCPStore at `address` (tcp://host:port) with the backend
    for `device` (this rank's exchange buffers); every collective then has `timeout_s`. Returns the backend.
    `backend`, if given, must be the device's (a check, not a choice). `node_address`: this rank's address in
    the cluster (Ray's node address); the backend's connections go through its interface (`bind_to_address`).

    Rank 0 serves the store from `listener` (see `rendezvous_listener`): torch's own tcp:// rendezvous would
    bind the store to every interface, and anyone who reaches it could join or disturb the group."""
    device = torch.device(device)
    if backend is not None and backend != backend_for(device):
        raise ValueError(f"backend={backend!r} cannot exchange tensors on {device}: use backend_for(device) "
                         f"({backend_for(device)!r}) or leave backend unset")
    backend = backend_for(device)
    url = urlsplit(address)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"rendezvous address must be tcp://host:port, got {address!r}")
    timeout = timedelta(seconds=timeout_s)
    if node_address is not None:
        bind_to_address(backend, node_address)
    if rank == 0:
        if listener is None:
            raise ValueError("rank 0 serves the rendezvous store and needs its listening socket")
        # The store takes the socket's file descriptor over (and closes it); Python must not close it too.
        store = dist.TCPStore(url.hostname, url.port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=listener.detach())
    else:
        store = dist.TCPStore(url.hostname, url.port, world_size, is_master=False, timeout=timeout)
    # NCCL binds its communicator to this rank's GPU (the actor's own, see engine.build.resolve_device).
    bound = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **bound)
    return backend


class PhaseTimer:
    """Accumulated seconds per phase, and the last BUSY_KEPT intervals a rank computed (perf_counter: one monotonic
    clock for every process of a host), from which a benchmark measures how much routers and shards overlap."""

    BUSY_KEPT = 8192

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.busy: deque[tuple[float, float]] = deque(maxlen=self.BUSY_KEPT)
        self._busy_since: float | None = None

    def add(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - t0
        return now

    def computing(self, on: bool) -> None:
        """Mark where this rank starts (on) or stops (off) computing; a repeated mark is ignored."""
        now = time.perf_counter()
        if on and self._busy_since is None:
            self._busy_since = now
        elif not on and self._busy_since is not None:
            self.busy.append((self._busy_since, now))
            self._busy_since = None


def _exchange_counts(send: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """send [world, 2] per destination rank: (rows in the block sent to it, how many of them are used: the same,
    except in a fixed-capacity block) on the device -> (send sizes, receive sizes, used rows received) on the host:
    the all_to_all of the counts, then ONE device->host transfer of both."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    sent, got = torch.stack([send, recv]).tolist()   # the one sync of this layer
    return [s for s, _ in sent], [r for r, _ in got], [u for _, u in got]


@dataclass
class InFlight:
    """A started fixed-capacity exchange (`RouterExchange.start`): its collectives' works, the send buffers they read
    until they complete, the combine's receive buffer, where each routed row comes back and the dispatch order to
    undo. back None: a dry one."""
    num_tokens: int
    works: tuple = ()
    sent: tuple = ()
    back: torch.Tensor | None = None
    place: torch.Tensor | None = None
    order: torch.Tensor | None = None   # the dispatch order of the micro-batch's N * top_k slots (`group_rows`)
    top_k: int = 1


class RouterExchange:
    """A router's side of the exchange: the expert backend (`model.v4.ExpertBackend`) of its model's MoE layers.
    Layers take part in the same order on every rank, so the collectives need no layer tag."""

    def __init__(self, rank: int, world_size: int, num_routers: int, placement: ExpertPlacement, hidden: int,
                 device: torch.device | str = "cpu"):
        """device: where the model's activations and this exchange's buffers live (NCCL needs CUDA)."""
        self.rank, self.world, self.num_routers = rank, world_size, num_routers
        self.placement, self.hidden, self.device = placement, hidden, torch.device(device)
        holders, copies = placement.table()   # built once, on the host; routing reads them on the device
        self.holders, self.copies = holders.to(self.device), copies.to(self.device)
        self.timer = PhaseTimer()
        self.host_reads = 0   # device->host reads of split sizes (one per MoE layer of a variable-size exchange)
        self.dry = False
        self.micro_batches = 1   # exchanges per MoE layer in this step: the driver's choice, set by Router.engine_step
        self.ping_pong_steps = 0   # decode steps run as two micro-batches (engine/graphs.py counts them)
        dev = self.device
        self._no_rows = (torch.empty(0, hidden, device=dev), torch.empty(0, 1, device=dev),
                         torch.empty(0, 1, dtype=torch.long, device=dev))

    def route(self, layer: int, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
              static: bool = False) -> torch.Tensor:
        """x [N, D], weights/idx [N, K] -> sum_k w_k Expert_{idx_k}(x) [N, D] fp32, experts on the shards, as this
        layer's first micro-batch (and empty ones after it, when the step has more).
        static: fixed-capacity dispatch (a fixed-shape decode step: no host read, no data-dependent shape).
        While `dry` (the router compiling its step alone, engine/graphs.py) it meets no one and returns zeros."""
        if self.dry:
            return torch.zeros(x.shape[0], self.hidden, device=x.device)
        routed = self.finish(self.start(x, weights, idx)) if static else self._route_variable(x, weights, idx)
        for _ in range(self.micro_batches - 1):
            self.finish(self.start(*self._no_rows))
        return routed

    def _route_variable(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """`route` with the split sizes read back to the host: exactly the rows each shard is sent."""
        t0 = time.perf_counter()
        dev, D = self.device, self.hidden
        flat_e = idx.reshape(-1)
        rows = torch.arange(flat_e.numel(), device=dev)
        # Each row's holder (copy number row % copies among the expert's holders), as a global rank.
        dest = self.num_routers + self.holders[flat_e, rows % self.copies[flat_e]]
        order, tok = group_rows(idx, key=dest * self.placement.num_experts + flat_e)   # by shard, then expert
        send_counts = torch.zeros(self.world, dtype=torch.long, device=dev).scatter_add_(0, dest, torch.ones_like(dest))
        payload = torch.cat([x[tok].float(), flat_e[order].float()[:, None],
                             weights.reshape(-1)[order].float()[:, None]], dim=1)      # [M, D + 2]
        t0 = self.timer.add("router_prepare", t0)
        self.timer.computing(False)
        send_sizes, recv_sizes, _ = _exchange_counts(torch.stack([send_counts, send_counts], dim=1))
        self.host_reads += 1
        recv = torch.empty(sum(recv_sizes), D + 2, device=dev)   # routers receive none
        dist.all_to_all_single(recv, payload, recv_sizes, send_sizes)
        t0 = self.timer.add("dispatch", t0)
        back = torch.empty(payload.shape[0], D, device=dev)
        dist.all_to_all_single(back, torch.empty(0, D, device=dev), send_sizes, recv_sizes)
        self.timer.add("combine", t0)
        self.timer.computing(True)
        return combine_rows(order, back, idx.shape[1])

    def start(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> InFlight:
        """Start one micro-batch's exchange with a block of C = N * K rows per shard, without waiting: the place of each
        row in its shard's block comes from a sort and a count on the device, the split sizes are constants of
        (N, K), and the three collectives (counts, dispatch, combine) are issued asynchronously. `finish` waits."""
        N, K = idx.shape
        if self.dry:
            return InFlight(N)
        t0 = time.perf_counter()
        dev, D, R = self.device, self.hidden, self.num_routers
        C, S = N * K, self.world - R
        flat_e = idx.reshape(-1)
        rows = torch.arange(C, device=dev)
        shard = self.holders[flat_e, rows % self.copies[flat_e]]                         # 0..S-1
        order, tok = group_rows(idx, key=shard * self.placement.num_experts + flat_e)    # by shard, then expert
        by_shard = shard[order]
        counts = torch.zeros(S, dtype=torch.long, device=dev).scatter_add_(0, shard, torch.ones_like(shard))
        place = by_shard * C + rows - (torch.cumsum(counts, 0) - counts)[by_shard]       # [C] in the send buffer
        payload = torch.zeros(S * C, D + 2, device=dev)                                 # unused rows stay 0
        payload[place] = torch.cat([x[tok].float(), flat_e[order].float()[:, None],
                                    weights.reshape(-1)[order].float()[:, None]], dim=1)
        sizes, none = [0] * R + [C] * S, [0] * self.world
        block = torch.zeros(self.world, 2, dtype=torch.long, device=dev)   # (block rows, used rows) per rank
        block[R:, 0] = C
        block[R:, 1] = counts
        t0 = self.timer.add("router_prepare", t0)
        back = torch.empty(S * C, D, device=dev)
        self.timer.computing(False)   # issuing is the collectives' time, not the router's compute
        works = (dist.all_to_all_single(torch.empty_like(block), block, async_op=True),
                 dist.all_to_all_single(torch.empty(0, D + 2, device=dev), payload, none, sizes, async_op=True),
                 dist.all_to_all_single(back, torch.empty(0, D, device=dev), sizes, none, async_op=True))
        self.timer.add("dispatch", t0)
        self.timer.computing(True)
        return InFlight(N, works, (block, payload), back, place, order, K)

    def finish(self, flight: InFlight) -> torch.Tensor:
        """Wait for a started exchange (within the collective timeout) -> the micro-batch's routed sum [N, D] fp32."""
        if flight.back is None:
            return torch.zeros(flight.num_tokens, self.hidden, device=self.device)
        t0 = time.perf_counter()
        self.timer.computing(False)
        for work in flight.works:
            work.wait()
        self.timer.add("combine", t0)
        self.timer.computing(True)
        return combine_rows(flight.order, flight.back[flight.place], flight.top_k)

    def idle(self, num_layers: int) -> None:
        """Take part in a step with no tokens of our own: every micro-batch of every layer, empty."""
        for _ in range(num_layers * self.micro_batches):
            self.finish(self.start(*self._no_rows))


class ShardServer:
    """An expert shard's side: per step, for every MoE layer, receive rows, run the experts, send results."""

    def __init__(self, world_size: int, hidden: int, experts: list[dict], dtype: torch.dtype, swiglu_limit: float,
                 device: torch.device | str = "cpu"):
        """experts: per layer {global expert id: (w1, w2, w3)}, already on `device`."""
        self.world, self.hidden, self.experts, self.dtype = world_size, hidden, experts, dtype
        # plain fp32 experts on a CPU run grouped (the native kernel for a decode step's rows): kernels/moe.py
        self.stacks = [StackedExperts.stacked(layer) for layer in experts]
        self.limit, self.device = swiglu_limit, torch.device(device)
        self.timer = PhaseTimer()
        dev = self.device
        self.no_rows = torch.zeros(world_size, 2, dtype=torch.long, device=dev)   # a shard sends no dispatch rows
        self.none_in = torch.empty(0, hidden + 2, device=dev)
        self.none_out = torch.empty(0, hidden, device=dev)
        ids = [e for layer in experts for e in layer]
        # rows served per layer and global expert id, counted on the device; read only by tokens_per_expert()
        self.expert_rows = torch.zeros(len(experts), max(ids, default=-1) + 1, dtype=torch.long, device=dev)

    def serve_step(self, micro_batches: int = 1) -> int:
        """Serve one step: every MoE layer's exchange, `micro_batches` times per layer (the routers' micro-batches, in
        their order). -> (token, expert) rows served."""
        return sum(self._serve(layer, experts) for layer, experts in enumerate(self.experts)
                   for _ in range(micro_batches))

    def _serve(self, layer: int, experts: dict) -> int:
        """One micro-batch of one MoE layer: receive its rows, run the experts, send the results back."""
        D = self.hidden
        t0 = time.perf_counter()
        send_sizes, recv_sizes, used = _exchange_counts(self.no_rows)
        recv = torch.empty(sum(recv_sizes), D + 2, device=self.device)
        dist.all_to_all_single(recv, self.none_in, recv_sizes, send_sizes)
        t0 = self.timer.add("dispatch_wait", t0)
        # A fixed-capacity block's used rows come first: slices by host-known counts, no index tensor.
        starts = [0, *itertools.accumulate(recv_sizes)]
        spans = [(a, a + u) for a, u, n in zip(starts, used, recv_sizes) if u]
        rows = recv if used == recv_sizes else torch.cat([recv[a:b] for a, b in spans] or [recv[:0]])
        x, e, w = rows[:, :D].to(self.dtype), rows[:, D].long(), rows[:, D + 1]
        self.timer.computing(True)
        stack = self.stacks[layer]
        y = (stack(x, e, w, self.limit) if stack is not None else expert_mlp(x, e, w, experts, self.limit)).float()
        if used != recv_sizes:   # back into the blocks; the unused rows return zeros
            full, at = torch.zeros(recv.shape[0], D, device=self.device), 0
            for a, b in spans:
                full[a:b] = y[at:at + b - a]
                at += b - a
            y = full
        self.expert_rows[layer].scatter_add_(0, e, torch.ones_like(e))
        self.timer.computing(False)
        t0 = self.timer.add("expert", t0)
        dist.all_to_all_single(self.none_out, y, send_sizes, recv_sizes)
        self.timer.add("combine", t0)
        return x.shape[0]

    def tokens_per_expert(self) -> list[dict[int, int]]:
        """Per layer {global expert id: rows served} for the experts that served any (one read of the counts)."""
        counts = self.expert_rows.tolist()
        return [{e: counts[layer][e] for e in sorted(experts) if counts[layer][e]}
                for layer, experts in enumerate(self.experts)]
