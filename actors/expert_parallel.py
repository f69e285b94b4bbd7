"""The MoE all-to-all between routers and expert shards, over torch.distributed (NCCL on GPUs, gloo on CPUs).

Ranks: routers 0..R-1, expert shards R..R+S-1, one process group per model replica. Every rank takes part in
every MoE layer's exchange, in layer order, so routers step in lockstep; a rank with nothing to send sends
zero rows. Per layer:

1. counts: all_to_all_single of int64 [world] — how many (token, expert) rows each rank sends to each rank
   (the one host synchronisation per MoE layer);
2. dispatch: all_to_all_single of the rows [M, D + 2] = hidden vector, expert id, routing weight (fp32);
3. combine: all_to_all_single of the weighted expert outputs [M, D] back, with the split sizes reversed.
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from datetime import timedelta
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from v4ray.kernels import expert_mlp
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


def init_group(address: str, rank: int, world_size: int, timeout_s: float, listener: socket.socket | None = None,
               backend: str | None = None) -> str:
    """Join the replica's process group through the TCPStore at `address` (tcp://host:port); every collective
    then has `timeout_s`. Returns the backend.

    Rank 0 serves the store from `listener` (see `rendezvous_listener`): torch's own tcp:// rendezvous would
    bind the store to every interface, and anyone who reaches it could join or disturb the group."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    url = urlsplit(address)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"rendezvous address must be tcp://host:port, got {address!r}")
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        if listener is None:
            raise ValueError("rank 0 serves the rendezvous store and needs its listening socket")
        # The store takes the socket's file descriptor over (and closes it); Python must not close it too.
        store = dist.TCPStore(url.hostname, url.port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=listener.detach())
    else:
        store = dist.TCPStore(url.hostname, url.port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return backend


class PhaseTimer:
    """Accumulated seconds per phase and call counts, for statistics."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - t0
        return now


def _exchange_counts(send: torch.Tensor) -> torch.Tensor:
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv


class RouterExchange:
    """A router's side of the exchange: the expert backend (`model.v4.ExpertBackend`) of its model's MoE layers.
    Layers take part in the same order on every rank, so the collectives need no layer tag."""

    def __init__(self, rank: int, world_size: int, num_routers: int, placement: ExpertPlacement, hidden: int):
        self.rank, self.world, self.num_routers = rank, world_size, num_routers
        self.placement, self.hidden = placement, hidden
        self.timer = PhaseTimer()

    def route(self, layer: int, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights/idx [N, K] -> sum_k w_k Expert_{idx_k}(x) [N, D] fp32, experts on the shards."""
        t0 = time.perf_counter()
        flat_e = idx.reshape(-1)
        rows = torch.arange(flat_e.numel(), device=idx.device)
        dest = self.num_routers + self.placement.destinations(flat_e, rows)   # global rank of each row's holder
        order, tok = group_rows(idx, key=dest * self.placement.num_experts + flat_e)   # by shard, then expert
        send_counts = torch.bincount(dest[order], minlength=self.world)
        payload = torch.cat([x[tok].float(), flat_e[order].float()[:, None],
                             weights.reshape(-1)[order].float()[:, None]], dim=1)      # [M, D + 2]
        t0 = self.timer.add("router_prepare", t0)
        recv_counts = _exchange_counts(send_counts)
        recv = torch.empty(int(recv_counts.sum()), self.hidden + 2, device=x.device)   # routers receive none
        dist.all_to_all_single(recv, payload, recv_counts.tolist(), send_counts.tolist())
        t0 = self.timer.add("dispatch", t0)
        back = torch.empty(payload.shape[0], self.hidden, device=x.device)
        dist.all_to_all_single(back, torch.empty(0, self.hidden, device=x.device), send_counts.tolist(),
                               recv_counts.tolist())
        t0 = self.timer.add("combine", t0)
        return combine_rows(idx.shape[0], tok, back)

    def idle(self, num_layers: int) -> None:
        """Take part in a step with no tokens of our own."""
        empty = torch.empty(0, self.hidden)
        for layer in range(num_layers):
            self.route(layer, empty, torch.empty(0, 1), torch.empty(0, 1, dtype=torch.long))


class ShardServer:
    """An expert shard's side: per step, for every MoE layer, receive rows, run the experts, send results."""

    def __init__(self, world_size: int, hidden: int, experts: list[dict], dtype: torch.dtype, swiglu_limit: float):
        self.world, self.hidden, self.experts, self.dtype = world_size, hidden, experts, dtype
        self.limit = swiglu_limit
        self.timer = PhaseTimer()
        self.tokens_per_expert = [defaultdict(int) for _ in experts]   # per layer: expert -> rows served

    def serve_step(self) -> int:
        rows_served = 0
        zeros = torch.zeros(self.world, dtype=torch.long)
        for layer, experts in enumerate(self.experts):
            t0 = time.perf_counter()
            recv_counts = _exchange_counts(zeros)
            recv = torch.empty(int(recv_counts.sum()), self.hidden + 2)
            dist.all_to_all_single(recv, torch.empty(0, self.hidden + 2), recv_counts.tolist(), zeros.tolist())
            t0 = self.timer.add("dispatch_wait", t0)
            x, e, w = recv[:, :self.hidden].to(self.dtype), recv[:, self.hidden].long(), recv[:, self.hidden + 1]
            y = expert_mlp(x, e, w, experts, self.limit).float()
            for eid, n in zip(*torch.unique(e, return_counts=True)):
                self.tokens_per_expert[layer][int(eid)] += int(n)
            rows_served += x.shape[0]
            t0 = self.timer.add("expert", t0)
            dist.all_to_all_single(torch.empty(0, self.hidden), y, zeros.tolist(), recv_counts.tolist())
            self.timer.add("combine", t0)
        return rows_served
