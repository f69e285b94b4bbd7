"""Router actor: embedding, mHC, attention, gates, shared expert and head for its own sequences; routed experts
through the all-to-all with the expert shards. Its engine core is built by the same `build_engine_core` as the
single-process engine, from the replica's EngineConfig."""

from __future__ import annotations

import os
import time

from v4ray.engine.build import build_engine_core, resolve_dtype, select_device
from v4ray.engine.config import EngineConfig
from v4ray.engine.core import EngineCore
from v4ray.engine.runner import ModelRunner
from v4ray.engine.sampling import SamplingParams
from v4ray.model.config import V4Config
from v4ray.model.expert_placement import ExpertPlacement
from v4ray.model.loader import load_model

from .expert_parallel import RouterExchange, init_group, rendezvous_listener, tcp_address


class Router:
    """Constructed cheaply; `start()` joins the process group and loads the dense weights."""

    def __init__(self, config: EngineConfig, rank: int, world_size: int, placement: ExpertPlacement,
                 prefix_cache: dict | None = None):
        """config: the replica's engine (this router's cache and limits); prefix_cache: PrefixCacheClient args."""
        self.config, self.rank, self.world, self.num_routers = config, rank, world_size, config.num_routers
        self.placement, self.timeout_s, self.prefix_cache_cfg = placement, config.collective_timeout_s, prefix_cache
        self.device = select_device(config.device)   # once, in this actor, before the process group forms
        self.runner: ModelRunner | None = None
        self.core: EngineCore | None = None
        self.steps, self.step_seconds = 0, 0.0
        self._listener = None   # rank 0: the rendezvous store's socket, from rendezvous_address() to start()

    # ---- lifecycle --------------------------------------------------------------------------------------
    def info(self) -> dict:
        import ray

        return {"rank": self.rank, "role": "router", "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "address": ray.util.get_node_ip_address(),
                "device": str(self.device)}

    def rendezvous_address(self) -> str:
        """Rank 0 publishes where the process group meets: a store on this node's Ray address, not on every
        interface."""
        import ray

        host = ray.util.get_node_ip_address()
        self._listener = rendezvous_listener(host)
        return tcp_address(host, self._listener.getsockname()[1])

    def start(self, init_method: str) -> dict:
        import ray

        t0 = time.perf_counter()
        listener, self._listener = self._listener, None
        backend = init_group(init_method, self.rank, self.world, self.timeout_s, listener=listener,
                             node_address=ray.util.get_node_ip_address(),
                             device=self.device)   # NCCL for a GPU rank, gloo for a CPU one
        cfg = V4Config.from_file(self.config.model)
        self.exchange = RouterExchange(self.rank, self.world, self.num_routers, self.placement, cfg.hidden_size,
                                       device=self.device)
        model = load_model(self.config.model, resolve_dtype(self.config.dtype, cfg, self.device), cfg=cfg,
                           expert_range=(0, 0), expert_backend=self.exchange,   # routed experts: on the shards
                           device=self.device)
        client = None
        if self.prefix_cache_cfg is not None:
            from .kv_cache_service import PrefixCacheClient

            client = PrefixCacheClient(**self.prefix_cache_cfg)
        self.core = build_engine_core(self.config, model=model, prefix_cache=client, lockstep=True)
        self.runner = self.core.runner
        return {"backend": backend, "load_s": time.perf_counter() - t0, "device": str(self.device)}

    def ping(self) -> bool:
        return True

    # ---- the engine: requests in, tokens out (scheduling and sampling on this router) ------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        self.core.add_request(request_id, prompt_ids, params, prompt)

    def abort(self, request_id: str) -> bool:
        return self.core.abort(request_id)

    def engine_step(self, micro_batches: int = 1) -> tuple[list, bool]:
        """One lockstep step of this router's engine: schedule, run (or take part idly), sample. micro_batches: the
        exchanges of every MoE layer in this step, the same on every rank (2: ping-pong, a decode batch split in two
        halves; cluster/replica.py chooses); 0: no router of the replica holds a request, so no rank enters a
        layer's exchange."""
        if not micro_batches:
            return [], False
        t0 = time.perf_counter()
        self.exchange.micro_batches = int(micro_batches)
        self.exchange.timer.computing(True)
        try:
            ran = self.core.num_steps
            outs = self.core.step()
            if self.core.num_steps == ran:
                self.exchange.idle(self.runner.model.cfg.num_hidden_layers)
        finally:
            self.exchange.timer.computing(False)
        self.steps += 1
        self.step_seconds += time.perf_counter() - t0
        return outs, self.core.has_work()

    def stats(self) -> dict:
        t = dict(self.exchange.timer.seconds)
        t["attention_and_dense"] = self.step_seconds - sum(t.values())
        return {"rank": self.rank, "steps": self.steps, "step_seconds": self.step_seconds, "phases": t,
                "busy": list(self.exchange.timer.busy), "split_size_reads": self.exchange.host_reads,
                "ping_pong_steps": self.exchange.ping_pong_steps,
                "kv_free_blocks": self.runner.cache.blocks.num_free, "kv_blocks": self.runner.cache.blocks.num,
                "running": len(self.runner.seqs), "engine": self.core.stats(), "config": self.config.model_dump(),
                "device": str(self.device), "kv_format": self.runner.cache.kv_format}
