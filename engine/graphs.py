"""Decode steps in fixed shapes, compiled on the CPU or captured as CUDA graphs (docs/architecture.md §12).

The decode rows of a step (sequences adding one token) run `V4Model.decode` on a `DecodeBatch`: B rows
(the sequences, then padding) and block tables W blocks wide. Nothing in it reads the device from the host or
takes a shape from the data, so:

* on CUDA each (B, W) bucket — B and W powers of two, B up to `max_num_seqs`, W up to the blocks of
  `max_model_len` — is captured once as a `torch.cuda.CUDAGraph` on first use and replayed after (its inputs are
  the bucket's persistent `DecodeInputs`, its cache writes inside the graph);
* on the CPU the step is compiled once by `torch.compile(fullgraph=True)` (inductor) with B and W symbolic, at
  start-up (`warm_up`); a cold compile of a tiny preset takes about a minute on 2 cores, a warm one (inductor's
  on-disk cache) seconds. The cache writes are returned by the compiled graph and made right after it
  (`DecodeBatch.put`): written inside, inductor copies the whole pools every step.

`EngineConfig.enforce_eager` turns all of this off: every step then runs the plain `StepBatch` path, the
reference the tests compare against. Prompt chunks always take that path (beside the step's decode rows).
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from v4ray.kernels.backend import kernel_backend
from v4ray.model.kv_cache import DecodeBatch, DecodeInputs, PagedKVCache, SeqCache
from v4ray.model.v4 import V4Model

log = logging.getLogger(__name__)


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
            block.ffn.uses_dense(model.embed_weight[:1], static=True) for block in model.layers):
        return "routed experts kept quantized (keep_quantized) have no fixed-shape form on the torch backend"
    return None


class DecodeGraphs:
    """Runs decode-only steps of one model and cache in fixed shapes: compiled (CPU), CUDA graphs (CUDA)."""

    def __init__(self, model: V4Model, cache: PagedKVCache, max_num_seqs: int, max_blocks: int,
                 compiled: bool = True):
        """compiled: False runs the fixed-shape step as it is (the eager reference of the compiled step, and what
        the device-provenance tests follow op by op)."""
        self.model, self.cache = model, cache
        if compiled and model.experts_remote:
            log.warning("an expert-parallel router runs the fixed-shape decode step uncompiled (with fixed-capacity "
                        "dispatch): its all-to-all is not compiled or captured in a CUDA graph yet")
            compiled = False
        if compiled and cache.device.type == "cpu" and torch._dynamo.config.disable:
            log.warning("torch.compile is disabled (TORCH_COMPILE_DISABLE): the decode step runs uncompiled")
            compiled = False
        self.cuda = compiled and cache.device.type == "cuda"
        # On the CPU B and W are symbolic in one compiled graph; sizes 1 would be specialised, so they pad to 2.
        smallest = 1 if self.cuda else 2
        self.batch_sizes = bucket_sizes(max(max_num_seqs, smallest), smallest)
        self.widths = bucket_sizes(max(max_blocks, smallest), smallest)
        self.inputs: dict[tuple[int, int], DecodeInputs] = {}
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # CUDA graphs' shared memory pool
        self.compiled = compiled  # torch.compile on the CPU, CUDA graphs on CUDA; False: the step as it is
        self._step = (torch.compile(self._deferred_step, fullgraph=True, dynamic=None)
                      if compiled and not self.cuda else self._deferred_step)

    def fits(self, num_seqs: int, longest_table: int) -> bool:
        return num_seqs <= self.batch_sizes[-1] and longest_table <= self.widths[-1]

    def bucket(self, num_seqs: int, longest_table: int) -> tuple[int, int]:
        return (next(b for b in self.batch_sizes if b >= num_seqs),
                next(w for w in self.widths if w >= max(1, longest_table)))

    def _inputs(self, key: tuple[int, int]) -> DecodeInputs:
        if key not in self.inputs:
            inputs = self.inputs[key] = DecodeInputs(self.cache, *key)
            if self.compiled and not self.cuda:  # one compiled graph for every bucket
                for t in (inputs.token_ids, inputs.positions, inputs.slots, inputs.real, inputs.block_tables):
                    torch._dynamo.mark_dynamic(t, 0)
                torch._dynamo.mark_dynamic(inputs.block_tables, 1)
        return self.inputs[key]

    # ---- the step -----------------------------------------------------------------------------------------
    def _deferred_step(self, token_ids, positions, slots, block_tables, real):
        batch = DecodeBatch(self.cache, token_ids, positions, slots, block_tables, real, deferred=[])
        return self.model.decode(batch), batch.deferred

    def run(self, seqs: list[SeqCache], token_ids: list[int]) -> torch.Tensor:
        """One decode step of `seqs` (their blocks already appended) -> logits [len(seqs), V] fp32. The caller
        advances each sequence's cached token count."""
        key = self.bucket(len(seqs), max(len(s.block_table) for s in seqs))
        inputs = self._inputs(key)
        if self.cuda:
            if key not in self.graphs:
                self._capture(key, inputs)
            inputs.fill(seqs, token_ids)
            graph, logits = self.graphs[key]
            graph.replay()
            return logits[:len(seqs)]
        batch = inputs.fill(seqs, token_ids)
        logits, writes = self._step(batch.token_ids, batch.positions, batch.slots, batch.block_tables, batch.real)
        batch.apply_writes(writes)
        return logits[:len(seqs)]

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
        self.graphs[key] = (graph, logits)
        log.info("captured the decode step for %d rows x %d blocks in %.2f s", *key, time.perf_counter() - t0)

    def warm_up(self) -> float:
        """Compile (CPU) the step before the first request, on padding rows only (they read and write the scratch
        slot and block alone). CUDA graphs are captured per bucket on first use instead. -> seconds spent."""
        if self.cuda or not self.compiled:
            return 0.0
        t0 = time.perf_counter()
        # stderr, not only the log: a Serve replica or Ray actor shows it in its .err log whatever its log level
        print("v4ray: compiling the fixed-shape decode step (torch.compile, inductor; about a minute cold on 2 "
              "cores, seconds from the disk cache)...", file=sys.stderr, flush=True)
        batch = self._inputs((self.batch_sizes[0], self.widths[0])).padding()
        self.model.decode(batch)  # eager first: lazily built state (stacked experts) exists before tracing
        _, writes = self._step(batch.token_ids, batch.positions, batch.slots, batch.block_tables, batch.real)
        batch.apply_writes(writes)
        spent = time.perf_counter() - t0
        print(f"v4ray: decode step compiled in {spent:.1f} s", file=sys.stderr, flush=True)
        return spent
