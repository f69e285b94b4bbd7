"""How v4ray compiles its CPU graphs (the fixed-shape decode step, the prefill regions, Sinkhorn's op): one place for
torch.compile's options, so that every graph is built alike.

* `fullgraph=True`: a graph break or host sync fails the compile (the CPU's proxy for CUDA-graph capture).
* `cpp_wrapper` (the decode step's graphs): inductor's wrapper, the code that calls a graph's kernels one after
  another, is compiled C++ instead of Python. A decode step is ~150 small kernels and ATen calls, where the Python
  wrapper's per-call cost shows: at 32 rows 7.6-8.1 -> 7.3-7.6 ms, three A/B pairs in one session (v4-tiny fp32,
  2 cores), for ~25 s more of cold compile. The prefill regions are fewer, larger calls: no gain measured there,
  so they keep the Python wrapper (docs/architecture.md §12).
* `guard_filter_fn` (`keep_guard`): dynamo's guards on torch's pytree registry are dropped. Tracing `torch.cond` (the
  decode step's HCA pool) guards on `torch.utils._pytree.SUPPORTED_NODES`, so any module imported after start-up that
  registers a pytree type (transformers does, on import) failed the guard and recompiled the decode step from
  scratch in the middle of serving: a ~6 s stall on 2 cores (v4-tiny), the step's graph compiled again. A graph's
  inputs and outputs are tensors and tuples of tensors, which flatten the same whatever other types are registered.
"""

from __future__ import annotations

import torch

# Higher-order ops whose graphs inductor may keep in its on-disk cache (it bypasses the cache for every HOP it does
# not know to be safe). `torch.cond` (the decode step's HCA pool, `DecodeBatch.pool_on_close`) is a pure choice
# between two subgraphs that are part of the cache key (inductor hashes a graph module with its submodules' code);
# without this, every start-up recompiled the decode step's two graphs cold (~85 s on 2 cores, v4-tiny). The value
# is part of the cache key: a new torch misses.
CACHEABLE_OPS = {"torch.ops.higher_order.cond": torch.__version__}


def keep_guard(entry) -> bool:
    """False for a guard on torch's pytree registry (module docstring), True for every other guard."""
    return "_pytree" not in entry.name


def compile_graph(fn, dynamic: bool | None = None, cpp_wrapper: bool = False):
    """torch.compile(fn, fullgraph=True) as v4ray's CPU graphs are built (module docstring)."""
    return torch.compile(fn, fullgraph=True, dynamic=dynamic,
                         options={"cpp_wrapper": cpp_wrapper, "unsafe_marked_cacheable_functions": CACHEABLE_OPS,
                                  "guard_filter_fn": lambda entries: [keep_guard(e) for e in entries]})
