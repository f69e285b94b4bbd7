"""ExpertShard actor: holds routed experts of every MoE layer (a contiguous range of global ids, plus any
redundant copies), kept in their checkpoint format on its device, and serves them to the routers each step."""

from __future__ import annotations

import os
import time

from v4ray.engine.build import resolve_dtype, select_device
from v4ray.engine.host_memory import keep_freed_memory
from v4ray.model.config import V4Config
from v4ray.model.loader import load_expert_weights

from .expert_parallel import ShardServer, init_group


class ExpertShard:
    def __init__(self, model_path: str, rank: int, world_size: int, shard_index: int, expert_ids: list[int],
                 dtype: str, collective_timeout_s: float, keep_quantized: bool = True, device: str = "auto"):
        """device: the engine config's device ("auto": the GPU Ray assigned this actor, else the CPU)."""
        self.model_path, self.rank, self.world, self.shard_index = model_path, rank, world_size, shard_index
        self.expert_ids = list(expert_ids)
        self.dtype_name, self.device_spec = dtype, device
        self.timeout_s, self.keep_quantized = collective_timeout_s, keep_quantized
        self.server: ShardServer | None = None
        self.steps = 0

    def info(self) -> dict:
        import ray

        return {"rank": self.rank, "role": "expert_shard", "shard": self.shard_index, "experts": self.expert_ids,
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "address": ray.util.get_node_ip_address()}

    def start(self, init_method: str) -> dict:
        import ray

        t0 = time.perf_counter()
        device = select_device(self.device_spec)   # under Ray, cuda:0 is the GPU assigned to this actor
        keep_freed_memory(device)                      # on a CPU: engine/host_memory.py
        backend = init_group(init_method, self.rank, self.world, self.timeout_s, device=device,
                             node_address=ray.util.get_node_ip_address())
        cfg = V4Config.from_file(self.model_path)
        dtype = resolve_dtype(self.dtype_name, cfg, device=device)
        experts = load_expert_weights(self.model_path, self.expert_ids, dtype, self.keep_quantized, cfg, device=device)
        self.server = ShardServer(self.world, cfg.hidden_size, experts, dtype, cfg.swiglu_limit, device=device)
        nbytes = sum(w.nbytes for layer in experts for ws in layer.values() for w in ws)
        return {"backend": backend, "device": str(device), "load_s": time.perf_counter() - t0, "expert_bytes": nbytes}

    def ping(self) -> bool:
        return True

    def step(self, micro_batches: int = 1) -> int:
        """Serve one lockstep step: every MoE layer's exchange, `micro_batches` times (the routers' micro-batches);
        0: the routers hold no request, the step has no exchange."""
        if not micro_batches:
            return 0
        self.steps += 1
        return self.server.serve_step(int(micro_batches))

    def stats(self) -> dict:
        return {"rank": self.rank, "shard": self.shard_index, "steps": self.steps,
                "phases": dict(self.server.timer.seconds), "busy": list(self.server.timer.busy),
                "tokens_per_expert": self.server.tokens_per_expert()}
