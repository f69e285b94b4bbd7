"""How v4ray compiles its CPU graphs (the fixed-shape decode step, the prefill regions, Sinkhorn's op): one place for
torch.compile's options, so that every graph is built alike.

* `fullgraph=True`: a graph break or host sync fails the compile (the CPU's proxy for CUDA-graph capture).
* `cpp_wrapper` (the decode step's graphs): inductor's wrapper, the code that calls a graph's kernels one after
  another, is compiled C++ instead of Python. A decode step is ~150 small kernels and ATen calls, where the Python
  wrapper's per-call cost shows: at 32 rows 7.6-8.1 -> 7.3-7.6 ms, three A/B pairs in one session (v4-tiny fp32,
  2 cores), for ~25 s more of cold compile. The prefill regions are fewer, larger calls: no gain measured there,
  so they keep the Python wrapper (docs/architecture.md §12).
* `fixed_modules` (the single-process decode step): dynamo checks its guards before every call, and most of a
  step's ~300 are on the model's modules (their types, hooks, attributes, each parameter's metadata), which never
  change while an engine serves. They are dropped (`torch.compiler.skip_guard_on_all_nn_modules_unsafe`); the
  guards on the step's inputs, the cache's tensors and globals stay (they choose the B = 1 or B >= 2 graph). At 32
  rows dynamo's cache lookup went from ~450-520 to ~130-160 us per step (torch profiler, v4-tiny, 2 cores). Safe
  only where the graph belongs to one model: such a function gets a code object of its own (`own_code`), and so
  a dynamo cache of its own, which another model's step, in the same process, cannot hit.
"""

from __future__ import annotations

import types

import torch

# Higher-order ops whose graphs inductor may keep in its on-disk cache (it bypasses the cache for every HOP it does
# not know to be safe). `torch.cond` (the decode step's HCA pool, `DecodeBatch.pool_on_close`) is a pure choice
# between two subgraphs that are part of the cache key (inductor hashes a graph module with its submodules' code);
# without this, every start-up recompiled the decode step's two graphs cold (~85 s on 2 cores, v4-tiny). The value
# is part of the cache key: a new torch misses.
CACHEABLE_OPS = {"torch.ops.higher_order.cond": torch.__version__}


def compile_graph(fn, dynamic: bool | None = None, cpp_wrapper: bool = False, fixed_modules: bool = False):
    """torch.compile(fn, fullgraph=True) as v4ray's CPU graphs are built (module docstring). `fixed_modules`: fn is
    a bound method whose modules never change; it is compiled with a code object of its own and without guards on
    its modules."""
    options = {"cpp_wrapper": cpp_wrapper, "unsafe_marked_cacheable_functions": CACHEABLE_OPS}
    if fixed_modules:
        fn = own_code(fn)
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return torch.compile(fn, fullgraph=True, dynamic=dynamic, options=options)


def own_code(method: types.MethodType) -> types.MethodType:
    """The bound method with a copy of its function's code object. Dynamo keeps its compiled graphs and their guards
    per code object, so the copy's graphs are this object's alone."""
    f = method.__func__
    copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = f.__kwdefaults__, f.__qualname__
    return types.MethodType(copy, method.__self__)
