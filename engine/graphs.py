"""Decode steps in fixed shapes, compiled on the CPU or captured as CUDA graphs (docs/architecture.md §12).

The decode rows of a step (sequences adding one token) run `V4Model.decode` on a `DecodeBatch`: B rows
(the sequences, then padding) and block tables W blocks wide. Nothing in it reads the device from the host or
takes a shape from the data, so:

* on CUDA each (B, W) bucket — B and W powers of two, B up to `max_num_seqs`, W up to the blocks of
  `max_model_len` — is captured once as a `torch.cuda.CUDAGraph` on first use and replayed after (its inputs are
  the bucket's persistent `DecodeInputs`, its cache writes inside the graph);
* on the CPU the step is compiled by `torch.compile(fullgraph=True)` (inductor) at start-up (`warm_up`) into two
  graphs: one with B and W symbolic for every B >= 2, one for B = 1 (a symbolic size is never 1; padding a lone
  sequence to 2 rows doubled the step's context-proportional work, its indexer over every compressed entry). So
  nothing is padded: B is the number of sequences and W the longest block table (at least 2). A cold compile of
  a tiny preset takes about two minutes on 2 cores (one per graph), a warm one (inductor's on-disk cache)
  seconds. The cache writes are returned by the compiled graph and made right after it (`DecodeBatch.put`):
  written inside, inductor copies the whole pools every step. One branch is left in it: an HCA layer pools its
  128-row window only in a step where some row's window closes (`DecodeBatch.pool_on_close`, a `torch.cond` whose
  flag inductor reads on the host: free on the CPU, where host and device are one; a CUDA graph pools every step).

`EngineConfig.enforce_eager` turns all of this off: every step then runs the plain `StepBatch` path, the
reference the tests compare against. Prompt chunks always take that path (beside the step's decode rows).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict

import torch

from v4ray.kernels.backend import kernel_backend
from v4ray.kernels.compiled import compile_graph
from v4ray.model.kv_cache import DecodeBatch, DecodeInputs, PagedKVCache, SeqCache
from v4ray.model.v4 import V4Model, layer_after_exchange, layer_until_exchange

from .sampler import greedy_picks

log = logging.getLogger(__name__)

CPU_INPUTS_KEPT = 64  # (B, W) input buffers kept on the CPU, where every size is a bucket (a few KiB each)


class _LayerWrites(DecodeBatch):
    """A DecodeBatch for one layer's graph: its cache writes are collected as (pool, index, value); the caller knows
    the layer."""

    def put(self, layer: int, pool: str, index: tuple, value: torch.Tensor) -> None:
        self.deferred.append((pool, index, value))


def bucket_sizes(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit` itself: the padded sizes a dimension may take."""
    sizes, b = [], smallest
    while b < limit:
        sizes.append(b)
        b *= 2
    return sizes + [limit]


def static_decode_problem(model: V4Model) -> str | None:
    """Why this model's decode step cannot run in fixed shapes here, or None."""
    if kernel_backend(model.device) == "torch" and not model.experts_remote and not all(
            block.ffn.uses_grouped(model.embed_weight[:1]) for block in model.layers):
        return "routed experts kept quantized (keep_quantized) have no fixed-shape form on the torch backend"
    return None


class DecodeGraphs:
    """Runs decode-only steps of one model and cache in fixed shapes: compiled (CPU), CUDA graphs (CUDA)."""

    def __init__(self, model: V4Model, cache: PagedKVCache, max_num_seqs: int, max_blocks: int,
                 compiled: bool = True):
        """compiled: False runs the fixed-shape step as it is (the eager reference of the compiled step, and what
        the device-provenance tests follow op by op)."""
        self.model, self.cache = model, cache
        # An expert-parallel router's step holds every MoE layer's exchange. On the CPU it is compiled as the
        # graphs between the exchanges (`_router_step`); on CUDA the collectives are not captured yet.
        self.remote = model.experts_remote
        if compiled and self.remote and cache.device.type == "cuda":
            log.warning("an expert-parallel router runs the fixed-shape decode step uncompiled on CUDA (with "
                        "fixed-capacity dispatch): its all-to-all is not captured in a CUDA graph yet")
            compiled = False
        if compiled and cache.device.type == "cpu" and torch._dynamo.config.disable:
            log.warning("torch.compile is disabled (TORCH_COMPILE_DISABLE): the decode step runs uncompiled")
            compiled = False
        self.cuda = compiled and cache.device.type == "cuda"
        # On the CPU every size is its own bucket (W at least 2: symbolic sizes are never 1), served by two compiled
        # graphs, B = 1 and B >= 2. CUDA graphs are captured per bucket: powers of two.
        smallest = 1 if self.cuda else 2
        self.max_batch, self.max_width = max(max_num_seqs, smallest), max(max_blocks, smallest)
        if self.cuda:
            self.batch_sizes = bucket_sizes(self.max_batch)
            self.widths = bucket_sizes(self.max_width)
        # the buckets' persistent inputs; on the CPU the most recently used CPU_INPUTS_KEPT of them
        self.inputs: OrderedDict[tuple[int, int], DecodeInputs] = OrderedDict()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None  # CUDA graphs' shared memory pool
        self.compiled = compiled  # torch.compile on the CPU, CUDA graphs on CUDA; False: the step as it is
        # compiled on the CPU: an HCA layer pools its 128-row window only in a step where one closes (a cond). Not in
        # a router's graphs between exchanges: inductor (torch 2.13) fails on the cond there ("A subgraph argument
        # other than striding has been modified")
        self._pool_on_close = compiled and not self.cuda and not self.remote
        if self.remote:
            self.exchange = next(b.ffn.expert_backend for b in model.layers if b.ffn.expert_backend is not None)
            self._until, self._after = self._until_exchange, layer_after_exchange
            if compiled:
                # one graph per layer kind and bucket kind (B = 1 or more) on each side of the exchange; dynamo's
                # default limit of 8 per function is below that for the real configs' layer kinds
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                self._until = compile_graph(self._until, cpp_wrapper=True)
                self._after = compile_graph(self._after, cpp_wrapper=True)
            self._step = self._router_step
        else:
            self._step = (compile_graph(self._deferred_step, cpp_wrapper=True)
                          if compiled and not self.cuda else self._deferred_step)

    def fits(self, num_seqs: int, longest_table: int) -> bool:
        return num_seqs <= self.max_batch and longest_table <= self.max_width

    def bucket(self, num_seqs: int, longest_table: int) -> tuple[int, int]:
        if not self.cuda:
            return num_seqs, max(longest_table, 2)
        return (next(b for b in self.batch_sizes if b >= num_seqs),
                next(w for w in self.widths if w >= max(1, longest_table)))

    def _inputs(self, key: tuple[int, int]) -> DecodeInputs:
        if key in self.inputs:
            self.inputs.move_to_end(key)
            return self.inputs[key]
        inputs = self.inputs[key] = DecodeInputs(self.cache, *key)
        if not self.cuda:
            if self.compiled:  # one compiled graph for B = 1, one for every B >= 2; W symbolic in both
                mark = torch._dynamo.maybe_mark_dynamic if self.remote else torch._dynamo.mark_dynamic
                if key[0] > 1:
                    for t in (inputs.token_ids, inputs.positions, inputs.slots, inputs.real, inputs.block_tables):
                        mark(t, 0)
                mark(inputs.block_tables, 1)
            if len(self.inputs) > CPU_INPUTS_KEPT:
                self.inputs.popitem(last=False)
        return inputs

    # ---- the step -----------------------------------------------------------------------------------------
    def _deferred_step(self, token_ids, positions, slots, block_tables, real):
        batch = DecodeBatch(self.cache, token_ids, positions, slots, block_tables, real, deferred=[],
                            pool_on_close=self._pool_on_close)
        logits = self.model.decode(batch)
        return logits, greedy_picks(logits), batch.deferred

    def _until_exchange(self, block, cache_layer, x, token_ids, positions, slots, block_tables, real):
        batch = _LayerWrites(self.cache, token_ids, positions, slots, block_tables, real, deferred=[],
                             pool_on_close=self._pool_on_close)
        return layer_until_exchange(block, cache_layer, x, batch), batch.deferred

    def _router_step(self, *inputs):
        """A router's step: per layer, one graph up to the exchange, the exchange itself (eager: its collectives),
        one graph after it. The graphs take the block as an argument, so the layers of a kind share them; their
        cache writes come back without the layer index, which would specialize a graph per layer. When the step has
        two micro-batches (`RouterExchange.micro_batches`) and at least two rows, the rows run as two ping-ponged
        halves (`_ping_pong`)."""
        if self.exchange.micro_batches == 2 and inputs[0].shape[0] >= 2:
            logits, writes = self._ping_pong(inputs)
        else:
            model, writes = self.model, []
            x = model._embed(inputs[0])
            for i, block in enumerate(model.layers):
                (x, u, weights, idx, shared, post, comb), writes_i = self._layer_until_exchange(i, x, inputs)
                writes += writes_i
                x = self._layer_after_exchange(x, block.ffn.route(u, weights, idx, static=True), shared, post, comb)
            logits = model.logits(x)
        return logits, greedy_picks(logits), writes

    def _ping_pong(self, inputs: tuple[torch.Tensor, ...]):
        """The step as two micro-batches, the first ceil(B/2) rows and the rest, through every layer in turn: each
        micro-batch's exchange is started and left in flight while the other computes (its attention and gating,
        or the layer after its exchange), and waited for only when its own next part needs it. The exchanges of a
        layer go A then B, on every rank. Rows never interact, so the values are the unsplit step's."""
        model, ex, writes = self.model, self.exchange, []
        ex.ping_pong_steps += not ex.dry
        h = (inputs[0].shape[0] + 1) // 2
        parts = [tuple(t[:h] for t in inputs), tuple(t[h:] for t in inputs)]
        xs = [model._embed(p[0]) for p in parts]
        flight: list = [None, None]

        def until(m: int, i: int) -> None:
            (x, u, weights, idx, shared, post, comb), writes_i = self._layer_until_exchange(i, xs[m], parts[m])
            writes.extend(writes_i)
            flight[m] = (ex.start(u, weights, idx), x, shared, post, comb)

        for m in (0, 1):
            until(m, 0)
        for i in range(len(model.layers)):
            for m in (0, 1):
                started, x, shared, post, comb = flight[m]
                xs[m] = self._layer_after_exchange(x, ex.finish(started), shared, post, comb)
                if i + 1 < len(model.layers):
                    until(m, i + 1)
        return torch.cat([model.logits(x) for x in xs]), writes

    def _layer_until_exchange(self, i: int, x: torch.Tensor, inputs: tuple[torch.Tensor, ...]):
        """Layer i up to its exchange (the `_until` graph) -> its outputs and its cache writes, layer-tagged."""
        if inputs[0].shape[0] > 1:   # one graph for every row count above 1 (not only for the first seen)
            for t in (x, *inputs):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(inputs[3], 1)   # the block tables' width
        outs, deferred = self._until(self.model.layers[i], self.cache.layers[i], x, *inputs)
        return outs, [(i, *w) for w in deferred]

    def _layer_after_exchange(self, *tensors: torch.Tensor) -> torch.Tensor:
        if tensors[0].shape[0] > 1:
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return self._after(*tensors)

    def run(self, seqs: list[SeqCache], token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of `seqs` (their blocks already appended) -> (logits [len(seqs), V] fp32, their greedy
        picks [len(seqs), 2], `greedy_picks`, computed in the step's graph). The caller advances each sequence's
        cached token count."""
        n = len(seqs)
        key = self.bucket(n, max(len(s.block_table) for s in seqs))
        inputs = self._inputs(key)
        if self.cuda:
            if key not in self.graphs:
                self._capture(key, inputs)
            inputs.fill(seqs, token_ids)
            graph, logits, picks = self.graphs[key]
            graph.replay()
            return logits[:n], picks[:n]
        batch = inputs.fill(seqs, token_ids)
        logits, picks, writes = self._step(batch.token_ids, batch.positions, batch.slots, batch.block_tables,
                                           batch.real)
        batch.apply_writes(writes)
        return logits[:n], picks[:n]

    def _capture(self, key: tuple[int, int], inputs: DecodeInputs) -> None:
        """Capture the bucket's step on padding rows (they touch only the scratch slot and block): one eager run
        on a side stream first, so lazy initialisation (pointer tables, stacked weights) stays out of the graph.
        The bucket's graphs share one memory pool."""
        t0 = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        batch = inputs.padding()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.decode(batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model.decode(batch)
            picks = greedy_picks(logits)
        self.graphs[key] = (graph, logits, picks)
        log.info("captured the decode step for %d rows x %d blocks in %.2f s", *key, time.perf_counter() - t0)

    def warm_up(self) -> float:
        """Compile (CPU) the step's two graphs before the first request, on padding rows only (they read and write
        the scratch slot and block alone). CUDA graphs are captured per bucket on first use instead. -> seconds
        spent."""
        if self.cuda or not self.compiled:
            return 0.0
        t0 = time.perf_counter()
        # stderr, not only the log: a Serve replica or Ray actor shows it in its .err log whatever its log level
        print("v4ray: compiling the fixed-shape decode step (torch.compile, inductor, two graphs; about two minutes "
              "cold on 2 cores, seconds from the disk cache)...", file=sys.stderr, flush=True)
        exchanges = {b.ffn.expert_backend for b in self.model.layers} - {None}
        for ex in exchanges:
            ex.dry = True   # a router compiles alone: its exchanges answer zeros without meeting the shards
        try:
            # the graph of every B >= 2, then B = 1's; a router then runs its two ping-pong forms (2 + 2 rows, 2 + 1)
            # on them, so that their inputs' guards are settled before serving too
            for rows, micro_batches in ((2, 1), (1, 1)) + (((4, 2), (3, 2)) if self.remote else ()):
                for ex in exchanges:
                    ex.micro_batches = micro_batches
                batch = self._inputs((rows, 2)).padding()
                if rows == 2:
                    self.model.decode(batch)  # eager first: lazily built state (stacked experts) exists before tracing
                *_, writes = self._step(batch.token_ids, batch.positions, batch.slots, batch.block_tables,
                                        batch.real)
                batch.apply_writes(writes)
        finally:
            for ex in exchanges:
                ex.dry, ex.micro_batches = False, 1
        spent = time.perf_counter() - t0
        print(f"v4ray: decode step compiled in {spent:.1f} s", file=sys.stderr, flush=True)
        return spent
