"""The host allocator under CPU steps: freed memory stays in the process for the next step.

glibc's malloc serves a large block (over 128 KiB, a threshold it raises as such blocks are freed, up to 32 MiB)
with its own `mmap` and returns it to the kernel on `free`, and trims the top of its heap whenever 128 KiB there are
free. A CPU prefill allocates and frees hundreds of MiB of activations per step (a 32 x 128-token batch of
v4-tiny: 13-35 thousand fresh 4 KiB pages per step, each faulted and zeroed by the kernel on first touch, ~0.5 us
apiece on the 2-core CI host), so every step paid again for memory the previous step had just given back. With
larger thresholds, set once per process by `keep_freed_memory`, a step's blocks come from the heap the previous
step freed: no page faults from the third step on (docs/architecture.md §12). vLLM's CPU backend asks for
tcmalloc through LD_PRELOAD for the same reason; this needs nothing installed.

The cost: a process keeps up to TRIM_THRESHOLD of freed heap (its high-water mark of transient memory) instead
of returning it. `V4RAY_HOST_ALLOCATOR=system` leaves glibc's defaults alone.

`freeze_startup_objects` does for Python's cyclic garbage collector what the thresholds do for malloc: compiling
the decode step and the prefill regions leaves ~730 thousand tracked Python objects (graphs, guards, code caches;
v4-tiny) that live as long as the process, and a full collection walks them all: ~370-400 ms on the 2-core host,
a stall of every running request whenever the collector's oldest generation comes due. Moved to the permanent
generation once start-up is done, they are never walked again (a full collection then takes well under 1 ms).
vLLM freezes its start-up objects the same way.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import gc
import logging
import os

log = logging.getLogger(__name__)

ENV = "V4RAY_HOST_ALLOCATOR"           # "keep" (default) or "system"
MMAP_THRESHOLD = 64 << 20              # blocks below this come from the heap (and go back to it)
TRIM_THRESHOLD = 1 << 30               # free memory at the heap's top kept before trimming

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (malloc.h)
_applied: bool | None = None
_frozen = False


def keep_freed_memory(device=None) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once; later calls return the first answer) when its
    steps run on `device` (a torch.device; None: the CPU). True where applied; False for a GPU's steps, with
    `V4RAY_HOST_ALLOCATOR=system` or without glibc (musl, macOS), where the system allocator runs as it is."""
    global _applied
    if device is not None and device.type != "cpu":
        return False
    if _applied is not None:
        return _applied
    choice = os.environ.get(ENV, "keep")
    if choice not in ("keep", "system"):
        raise ValueError(f"{ENV} must be 'keep' or 'system', got {choice!r}")
    _applied = False
    if choice == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("host allocator left as it is: no glibc mallopt here")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _applied:
        log.warning("mallopt refused the host allocator's thresholds; CPU steps keep glibc's defaults")
    return _applied


def freeze_startup_objects() -> bool:
    """Once per process (later calls do nothing and return False): collect, then move every object the collector
    tracks to its permanent generation (module docstring), so that the first engine's start-up (weights, compiled
    graphs) is never walked by a later collection. Objects created later are collected as before. A frozen object
    that becomes cyclic garbage is never freed, so only the first engine is frozen: a process that builds engines
    again and again (a test session) does not pin each one."""
    global _frozen
    if _frozen:
        return False
    _frozen = True
    gc.collect()
    gc.freeze()
    # back in the collector's reach at exit, so that interpreter shutdown finalizes them as it would have (native
    # extensions such as triton's nanobind bindings report every object still alive then as a leak)
    atexit.register(gc.unfreeze)
    return True
