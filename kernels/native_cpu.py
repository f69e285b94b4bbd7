"""Small native CPU kernels, built at first use: C++ source compiled for this machine and loaded with ctypes.

A few decode-step operations on the CPU are too small for torch's per-call machinery and too irregular for
inductor (a gather it cannot fuse into a GEMM, a GEMM per expert over a handful of rows). Their kernels are C++
source strings in the modules that use them (kernels/paged_cpu.py, kernels/moe_cpu.py), compiled here with the
compiler inductor uses (`CXX`, default g++) for this machine (-O3 -march=native) with OpenMP (the runtime torch
itself loaded), once per process and source, into a temporary directory (~0.2 s a kernel): no build product is
shared between machines, so a binary never meets a CPU it was not built for. Where no compiler builds it, `load`
returns None and the caller computes the same thing with torch, its reference (docs/architecture.md §12).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 120
# False: every kernel answers "not built" (`load` returns None) and its caller computes with torch; for a run that
# must take the same formulation as a device would (tests/test_engine.py's provenance comparison)
ENABLED = True

# What the kernels' sources start with: 16-lane fp32 vectors (GCC vector extensions), unaligned loads and stores,
# and a horizontal sum in one fixed order
SIMD_PRELUDE = r"""
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <stdlib.h>
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
static inline v16 ld(const float* p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float* p, v16 v) { memcpy(p, &v, sizeof v); }
/* the sum of 16 lanes, in one fixed order */
static inline float hsum(v16 a) {
    v8 lo, hi; memcpy(&lo, &a, 32); memcpy(&hi, (char*)&a + 32, 32);
    v8 s8 = lo + hi;
    v4 l4, h4; memcpy(&l4, &s8, 16); memcpy(&h4, (char*)&s8 + 16, 16);
    v4 s4 = l4 + h4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
"""

_lock = threading.Lock()
_built: dict[str, object] = {}      # name -> the ctypes function, or False once building it failed


def load(name: str, source: str, restype, argtypes: list) -> ctypes._CFuncPtr | None:
    """The C function `name` (extern "C" in `source`) built for this machine, with its ctypes signature; None where
    it cannot be built (the reason logged once), or while `ENABLED` is False. Built once per process; later calls
    return the first answer."""
    if not ENABLED:
        return None
    fn = _built.get(name)
    if fn is not None:
        return fn or None
    with _lock:
        if name not in _built:
            _built[name] = _compile(name, source, restype, argtypes) or False
    return _built[name] or None


def _compile(name: str, source: str, restype, argtypes: list):
    compiler = os.environ.get("CXX", "g++")
    with tempfile.TemporaryDirectory(prefix=f"v4ray-{name}-") as tmp:
        src, lib = Path(tmp) / f"{name}.cpp", Path(tmp) / f"{name}.so"
        src.write_text(source)
        for openmp in (["-fopenmp"], []):   # without OpenMP (one thread) where the compiler has none
            cmd = [*shlex.split(compiler), "-O3", "-march=native", *openmp, "-shared", "-fPIC", str(src), "-o", str(lib)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as e:
                log.warning("native CPU kernel %s not built (%s); torch computes it instead", name, e)
                return None
            if done.returncode == 0:
                fn = getattr(ctypes.CDLL(str(lib)), name)     # mapped: the file may go with the directory
                fn.restype, fn.argtypes = restype, argtypes
                return fn
        log.warning("native CPU kernel %s not built (%s: %s); torch computes it instead", name, " ".join(cmd),
                    done.stderr.strip()[-500:])
    return None
