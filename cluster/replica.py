"""One model replica on Ray: a placement group of Router and ExpertShard actors joined by one process group.

`Replica` places and starts the actors; `ReplicaEngine` is the engine API over them (add_request, abort, step,
has_work: the single-process EngineCore's): each request goes to the least loaded router, which schedules and
samples it; each step calls every router's engine step and every shard once, and they meet in each MoE
layer's all-to-all.

Health: every remote call waits at most `step_timeout_s`; every collective at most `collective_timeout_s`.
When a step fails, each rank is probed and the error names the ranks that died or stopped answering; the
replica is then unusable and `shutdown()` tears it down (a new Replica rebuilds it).

Lifecycle: the layout is validated against the model config before anything is placed; a start that fails
kills what it placed and removes its placement group before the error propagates; a Replica that is dropped
without `shutdown()` is released by a finalizer when it is garbage-collected.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from v4ray.engine.build import dtype_name, resolve_dtype
from v4ray.engine.config import EngineConfig
from v4ray.model.config import V4Config
from v4ray.model.expert_placement import ExpertPlacement

from .placement import actor_options, choose_strategy, device_problem, layout_bundles, rank_device_type, \
    rank_resources

log = logging.getLogger(__name__)


PLACEMENT_STRATEGIES = ("auto", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")   # auto: choose_strategy
# Ping-pong needs two decode rows on a router to split; below that a step's second micro-batch would be empty
# everywhere, all overhead. (A router below it in a ping-pong step sends its rows as the first micro-batch.)
PING_PONG_MIN_REQUESTS = 2


class ReplicaError(RuntimeError):
    """The replica failed (a rank died or hung); it must be rebuilt."""


class _Placed:
    """What a replica placed on the cluster: its actors and, when it created one, its placement group. The
    finalizer holds this object, never the Replica, so that a dropped Replica can be collected and released."""

    def __init__(self):
        self.actors: list = []
        self.pg = None
        self.graph = None   # the compiled step (ray.dag.CompiledDAG), once built

    def release(self, healthy: bool = True) -> None:
        """Tear the compiled step down, kill the actors and remove the placement group; idempotent, never raises
        (Ray may be gone). The teardown runs on a thread and is waited for at most GRAPH_TEARDOWN_WAIT_S (a rank on
        a host cut off would hold it until Ray gives the host up): before the kills while every rank is healthy (a
        channel must not be written after its reader died), after them once one has failed (a hung rank would
        not let it finish)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        actors, pg, graph, self.actors, self.pg, self.graph = self.actors, self.pg, self.graph, [], None, None
        if graph is not None and healthy:
            _teardown_bounded(graph)
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead, or Ray shut down
                pass
        if graph is not None and not healthy:
            _teardown_bounded(graph)
        if pg is not None:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass


GRAPH_TEARDOWN_WAIT_S = 5.0   # how long a release waits for the step graph's teardown before leaving it to a thread


def _teardown_bounded(graph) -> None:
    def teardown() -> None:
        try:
            graph.teardown()
        except Exception:  # noqa: BLE001 - its actors are gone: nothing left to release
            pass

    t = threading.Thread(target=teardown, name="v4ray-step-graph-teardown", daemon=True)
    t.start()
    t.join(GRAPH_TEARDOWN_WAIT_S)


_ENGINE_FIELDS = frozenset(EngineConfig.model_fields)


@dataclass
class ReplicaConfig:
    """One distributed model replica: its engine (model, dtype, layout, per-router cache and limits — an
    EngineConfig, whose fields also read as this config's own: `config.num_routers`) plus placement and timeouts.

    Each rank's bundle is a CPU plus the engine's gpus_per_router / gpus_per_shard GPUs (`rank_resources`); extra
    resources may be added (`shard_resources={"CPU": 1, "expert_slot": 1}`), the GPUs come from the engine only.
    placement_strategy "auto": PACK when one node holds the whole replica, else SPREAD (`choose_strategy`)."""

    engine: EngineConfig
    prefix_cache: dict | None = None  # PrefixCacheClient kwargs for the routers, or None
    redundant_experts: dict[int, list[int]] = field(default_factory=dict)  # expert -> extra holder shards
    router_resources: dict[str, float] | None = None   # default: rank_resources(engine.gpus_per_router)
    shard_resources: dict[str, float] | None = None    # default: rank_resources(engine.gpus_per_shard)
    placement_strategy: str = "auto"
    step_timeout_s: float = 120.0
    start_timeout_s: float = 300.0
    shard_model_dirs: list[str] | None = None  # per-shard checkpoint copies (e.g. node-local, own experts only)

    def __post_init__(self):
        for name, gpus in (("router_resources", self.engine.gpus_per_router),
                           ("shard_resources", self.engine.gpus_per_shard)):
            given = getattr(self, name)
            res = rank_resources(gpus) if given is None else dict(given)
            if gpus > 0:
                res.setdefault("GPU", gpus)
            setattr(self, name, res)

    def bundles(self) -> list[dict[str, float]]:
        """The replica's placement group: one bundle per router, then one per expert shard."""
        return layout_bundles(self.num_routers, self.num_expert_shards, self.router_resources, self.shard_resources)

    def __getattr__(self, name: str):
        if name in _ENGINE_FIELDS and "engine" in self.__dict__:
            return getattr(self.engine, name)
        raise AttributeError(f"ReplicaConfig has no attribute {name!r}")

    def validate(self, cfg: V4Config) -> None:
        """Everything a rank would reject at start, checked here so that a bad layout fails before anything is
        placed (rank start-up costs minutes on a real model)."""
        from v4ray.model.kv_cache import PagedKVCache, PrefixIO
        from v4ray.model.kv_format import kv_bytes

        if self.num_routers < 1:
            raise ValueError(f"num_routers must be >= 1, got {self.num_routers}")
        if not 1 <= self.num_expert_shards <= cfg.n_routed_experts:
            raise ValueError(f"num_expert_shards must be in [1, {cfg.n_routed_experts}] (the model's routed experts), "
                             f"got {self.num_expert_shards}")
        if self.shard_model_dirs is not None:
            if len(self.shard_model_dirs) != self.num_expert_shards:
                raise ValueError(f"shard_model_dirs has {len(self.shard_model_dirs)} entries for "
                                 f"{self.num_expert_shards} shards")
            missing = [d for d in self.shard_model_dirs if not (Path(d) / "config.json").is_file()]
            if missing:
                raise ValueError(f"shard_model_dirs {missing} are not checkpoint directories (no config.json)")
        for name in ("collective_timeout_s", "step_timeout_s", "start_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, "
                             f"got {self.placement_strategy!r}")
        for name in ("router_resources", "shard_resources"):
            res = getattr(self, name)
            if not res or any(not isinstance(v, (int, float)) or v < 0 for v in res.values()) or \
                    not any(v > 0 for v in res.values()):
                raise ValueError(f"{name} must map resource names to amounts >= 0, at least one positive; got {res!r}")
        for name, field_name in (("router_resources", "gpus_per_router"), ("shard_resources", "gpus_per_shard")):
            gpus, res = getattr(self, field_name), getattr(self, name)
            if abs(res.get("GPU", 0) - gpus) > 1e-6:
                raise ValueError(f"{name} asks for GPU={res.get('GPU', 0):g} but {field_name}={gpus:g}: a rank's GPUs "
                                 f"are {field_name}'s (one value for the bundle and the device); drop GPU from {name}")
        problem = device_problem(self.engine, in_actor=True)
        if problem:
            raise ValueError(problem)
        # The routers' KV pool: the same checks as PagedKVCache.from_budget, on a one-slot cache with no blocks
        # (a few MB; the real pool is allocated on the routers).
        dtype = resolve_dtype(self.dtype, cfg, torch.device(rank_device_type(self.device, self.gpus_per_router)))
        stored = None if self.kv_cache_dtype == "auto" else self.kv_cache_dtype   # auto: the compute dtype's
        probe = PagedKVCache(cfg, 0, 1, dtype, self.block_size, kv_format=stored)   # raises on a bad block_size
        kb = kv_bytes(cfg, probe.kv_format, probe.block_size)
        if (self.max_num_seqs + 1) * kb.fixed_per_seq + kb.per_block > self.kv_cache_bytes:  # + the scratch slot/block
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes} cannot hold the fixed state of max_num_seqs="
                             f"{self.max_num_seqs} sequences ({kb.fixed_per_seq} B each) and the decode step's "
                             f"scratch slot and block; raise the budget or lower max_num_seqs")
        if self.prefix_cache is not None:
            PrefixIO(probe)   # raises when the compression rates do not divide the prefix unit


class Replica:
    def __init__(self, config: ReplicaConfig):
        self.config = config
        self.cfg = V4Config.from_file(config.model)
        config.validate(self.cfg)
        self.placement = ExpertPlacement.contiguous(self.cfg.n_routed_experts, config.num_expert_shards,
                                                    config.redundant_experts)
        self.world = config.num_routers + config.num_expert_shards
        self.routers, self.shards, self.pg = [], [], None
        self.failed: str | None = None
        self.rendezvous_address: str | None = None   # tcp://host:port of rank 0's store, once started
        self._placed = _Placed()
        # Released when this object is collected (the job's end releases everything anyway, hence no atexit).
        self._finalizer = weakref.finalize(self, self._placed.release)
        self._finalizer.atexit = False

    # ---- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> "Replica":
        """Reserve the placement group, start every rank, rendezvous, load weights — all under timeouts. If any
        of it fails, whatever was placed is torn down before the error propagates."""
        try:
            self._place()
            c = self.config
            self.rendezvous_address = self._get(self.routers[0].rendezvous_address.remote(), c.start_timeout_s,
                                                "rendezvous")
            self.start_info = self._get([a.start.remote(self.rendezvous_address) for a in self.ranks],
                                        c.start_timeout_s, "start")
            if c.replica_control == "compiled_graph":
                self._compile_step()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _place(self) -> None:
        """The placement group (the Serve replica's when we run inside one) and one actor per rank."""
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from v4ray.actors.expert_shard import ExpertShard
        from v4ray.actors.router import Router

        c = self.config
        bundles = c.bundles()
        current = get_current_placement_group()
        offset = 0
        if current is not None and len(current.bundle_specs) >= len(bundles) + 1:
            self.pg, offset = current, 1   # inside a Serve replica: bundle 0 is the replica, Serve owns the group
        else:
            from .placement import cluster_nodes, placement_problem, wait_placed

            nodes = cluster_nodes()
            strategy = choose_strategy(bundles, nodes) if c.placement_strategy == "auto" else c.placement_strategy
            problem = placement_problem(bundles, strategy, nodes)   # never placeable: say so now, place nothing
            if problem:
                raise ReplicaError(problem)
            self.pg = self._placed.pg = placement_group(bundles, strategy=strategy)
            try:
                wait_placed(self.pg, bundles, c.start_timeout_s)   # reports what it waits for after a few seconds
            except ray.exceptions.GetTimeoutError:
                raise ReplicaError(f"placement group of {len(bundles)} bundles {bundles} was not placed within "
                                   f"{c.start_timeout_s:.0f}s: the cluster lacks those resources") from None

        def opts(i: int, resources: dict) -> dict:
            return {**actor_options(resources), "max_concurrency": 2, "max_restarts": 0,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i + offset)}

        model = str(Path(c.model).resolve())
        prefix = dict(c.prefix_cache) if c.prefix_cache else None
        shard_dtype = dtype_name(resolve_dtype(c.dtype, self.cfg, torch.device(rank_device_type(c.device,
                                                                                              c.gpus_per_shard))))
        for r in range(c.num_routers):
            self.routers.append(ray.remote(Router).options(**opts(r, c.router_resources)).remote(
                c.engine.model_copy(update={"model": model}), r, self.world, self.placement, prefix))
            self._placed.actors.append(self.routers[-1])
        for s in range(c.num_expert_shards):
            shard_model = str(Path(c.shard_model_dirs[s]).resolve()) if c.shard_model_dirs else model
            self.shards.append(ray.remote(ExpertShard).options(**opts(c.num_routers + s, c.shard_resources)).remote(
                shard_model, c.num_routers + s, self.world, s, self.placement.shard_experts(s),
                shard_dtype, c.collective_timeout_s, device=c.device))
            self._placed.actors.append(self.shards[-1])

    def run_step(self, micro_batches: int) -> list:
        """One lockstep step of every rank (the compiled step, or a Ray task per rank) with `micro_batches` exchanges
        per MoE layer (0: no router holds a request, no exchange) -> the routers' (outputs, has work), then the
        shards' results, in rank order."""
        import ray

        c = self.config
        if self.failed:
            raise ReplicaError(f"replica already failed ({self.failed}); shut it down and build a new one")
        if self._placed.graph is None:
            return self._get([a.engine_step.remote(micro_batches) for a in self.routers] +
                             [s.step.remote(micro_batches) for s in self.shards], c.step_timeout_s, "step")
        try:
            ref = self._placed.graph.execute(micro_batches)
        except ray.exceptions.RayError as e:   # a channel closed: a rank's graph thread is gone
            self.failed = self._diagnose("step", e)
            raise ReplicaError(self.failed) from e
        return self._get(ref, c.step_timeout_s, "step")

    @property
    def ranks(self) -> list:
        return self.routers + self.shards

    def _compile_step(self) -> None:
        """The step as a Ray Compiled Graph (docs/architecture.md §4), built at start: the driver writes the step's
        input (its micro-batches per MoE layer, 0 when no router holds a request) into one shared-memory channel per
        rank, each rank's step runs on its actor's graph thread as soon as it reads it, and the results come back the
        same way — one round trip instead of a Ray task per rank. Only this process may execute it (the engine's step
        thread does). Requests, aborts, pings and stats stay ordinary actor calls, served beside it."""
        import ray
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as micro_batches:
            dag = MultiOutputNode([a.engine_step.bind(micro_batches) for a in self.routers] +
                                  [s.step.bind(micro_batches) for s in self.shards])
        try:
            self._placed.graph = dag.experimental_compile(_submit_timeout=self.config.step_timeout_s)
        except ray.exceptions.RayError as e:   # a rank died since it started
            self.failed = self._diagnose("compiling the step graph", e)
            raise ReplicaError(self.failed) from e

    def role(self, rank: int) -> str:
        r = self.config.num_routers
        return f"rank {rank} (router {rank})" if rank < r else f"rank {rank} (expert shard {rank - r})"

    def shutdown(self) -> None:
        """Kill every rank and remove the placement group this replica created (idempotent)."""
        self._placed.release(healthy=not self.failed)
        self.routers, self.shards, self.pg = [], [], None

    # ---- health -----------------------------------------------------------------------------------------
    def _get(self, refs, timeout_s: float, what: str):
        import ray

        if self.failed:
            raise ReplicaError(f"replica already failed ({self.failed}); shut it down and build a new one")
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, (ValueError, KeyError)):  # the request was invalid, the replica is fine
                raise e.cause from None
            self.failed = self._diagnose(what, e)
            raise ReplicaError(self.failed) from e
        except (ray.exceptions.RayError, TimeoutError) as e:
            self.failed = self._diagnose(what, e)
            raise ReplicaError(self.failed) from e

    def _diagnose(self, what: str, err: Exception) -> str:
        """Probe every rank: name the dead and the unresponsive ones."""
        import ray

        dead, hung = [], []
        probes = [(i, a.ping.remote()) for i, a in enumerate(self.ranks)]
        for i, ref in probes:
            try:
                ray.get(ref, timeout=5)
            except ray.exceptions.RayActorError:
                dead.append(self.role(i))
            except (ray.exceptions.GetTimeoutError, TimeoutError):
                hung.append(self.role(i))
            except ray.exceptions.RayError:
                dead.append(self.role(i))
        parts = [f"{what} failed"]
        if dead:
            parts.append(f"dead: {', '.join(dead)}")
        if hung:
            parts.append(f"not answering: {', '.join(hung)}")
        if not dead and not hung:   # a rank raised: its own exception, not the RayTaskError's header line
            cause = getattr(err, "cause", None) or err
            lines = [line for line in str(cause).strip().splitlines() if line.strip()]
            parts.append(f"error: {type(cause).__name__}: {(lines[-1] if lines else '')[:300]}")
        return "; ".join(parts)

    # ---- observability ----------------------------------------------------------------------------------
    def actor_info(self) -> list[dict]:
        return self._get([a.info.remote() for a in self.ranks], self.config.step_timeout_s, "info")

    def stats(self) -> dict:
        """Per-phase times and tokens per expert / per shard per layer (load imbalance)."""
        routers = self._get([r.stats.remote() for r in self.routers], self.config.step_timeout_s, "stats")
        shards = self._get([s.stats.remote() for s in self.shards], self.config.step_timeout_s, "stats")
        L = self.cfg.num_hidden_layers
        per_expert = [[0] * self.cfg.n_routed_experts for _ in range(L)]
        per_shard = [[0] * len(self.shards) for _ in range(L)]
        for s in shards:
            for layer, counts in enumerate(s["tokens_per_expert"]):
                for e, n in counts.items():
                    per_expert[layer][int(e)] += n
                    per_shard[layer][s["shard"]] += n
        imbalance = [max(row) / (sum(row) / len(row)) if sum(row) else 0.0 for row in per_shard]
        return {"routers": routers, "shards": shards, "tokens_per_expert": per_expert,
                "tokens_per_shard": per_shard, "shard_imbalance": imbalance}


class ReplicaEngine:
    """The engine API (add_request, abort, step, has_work) over a replica's routers: each request goes to the
    least loaded router, which schedules and samples it; every step all routers and shards move together."""

    def __init__(self, replica: Replica):
        self.replica = replica
        self.request_router: dict[str, int] = {}

    @property
    def failed(self) -> str | None:
        return self.replica.failed

    def _load(self) -> list[int]:
        """Requests held by each router."""
        load = [0] * len(self.replica.routers)
        for i in self.request_router.values():
            load[i] += 1
        return load

    def add_request(self, request_id: str, prompt_ids: list[int], params, prompt: str | None = None) -> None:
        load = self._load()
        i = min(range(len(load)), key=lambda k: load[k])
        r = self.replica
        r._get(r.routers[i].add_request.remote(request_id, prompt_ids, params, prompt), r.config.step_timeout_s,
               "add_request")
        self.request_router[request_id] = i

    def abort(self, request_id: str) -> bool:
        i = self.request_router.pop(request_id, None)
        if i is None or self.replica.failed:
            return False
        r = self.replica
        return r._get(r.routers[i].abort.remote(request_id), r.config.step_timeout_s, "abort")

    def has_work(self) -> bool:
        return bool(self.request_router)

    def check_health(self, timeout_s: float = 5.0) -> None:
        """Ping every rank; raises ReplicaError naming the dead or silent ones (called while idle, so a rank that
        dies between requests is noticed before a request trips over it)."""
        r = self.replica
        r._get([a.ping.remote() for a in r.ranks], min(timeout_s, r.config.step_timeout_s), "health check")

    def micro_batches(self) -> int:
        """The exchanges per MoE layer of the next step: 0 with no request (no rank enters an exchange), 2 with
        `ping_pong` once a router holds PING_PONG_MIN_REQUESTS requests (its decode batch can be split in two
        halves), else 1."""
        if not self.request_router:
            return 0
        if not self.replica.config.ping_pong:
            return 1
        return 2 if max(self._load()) >= PING_PONG_MIN_REQUESTS else 1

    def step(self) -> list:
        """One lockstep step of every rank. No request on any router: an empty step (no rank enters an exchange)."""
        r = self.replica
        results = r.run_step(self.micro_batches())
        outs = [o for outs, _ in results[:len(r.routers)] for o in outs]
        for o in outs:
            if o.finished:
                self.request_router.pop(o.request_id, None)
        return outs

    def stats(self) -> dict:
        return self.replica.stats()
