"""Which implementation a kernel dispatch function runs: Triton or the torch reference.

`V4RAY_KERNELS` is read here and nowhere else:

* `torch`  - always the torch reference.
* `triton` - always Triton. On CPU tensors that needs Triton's interpreter (`TRITON_INTERPRET=1` set before
  Triton or v4ray is imported: `@triton.jit` picks compiled vs. interpreted when the kernel files load).
* `auto`   - (default) Triton for CUDA tensors, the torch reference for CPU tensors.

`triton_calls` counts Triton launches per kernel name, so tests can prove the Triton path ran instead of a
silent fallback to torch.

Every wrapper launches through `launch`, so `aot.recording()` can capture the exact kernel, arguments, block sizes
and warps a wrapper would launch and compile them ahead of time for a GPU this machine does not have.
"""

from __future__ import annotations

import os
from collections import Counter

import torch

ENV_KERNELS = "V4RAY_KERNELS"
BACKENDS = ("auto", "triton", "torch")

# @triton.jit chooses interpreted or compiled functions at decoration time; this module is imported by every
# kernel file before its kernels are decorated, so this is the mode they were built in.
_INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"

triton_calls: Counter[str] = Counter()
_recorded_launches: list | None = None  # a list while `aot.recording()` is active: launches are recorded, not run


def kernel_backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`, as `V4RAY_KERNELS` asks (see the module docstring)."""
    choice = os.environ.get(ENV_KERNELS, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_KERNELS}={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    on_cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        return "triton" if on_cuda else "torch"
    if not on_cuda and not _INTERPRETED_AT_IMPORT:
        raise RuntimeError(f"{ENV_KERNELS}=triton with {torch.device(device).type} tensors needs Triton's "
                           "interpreter: set TRITON_INTERPRET=1 in the environment before importing triton or "
                           f"v4ray, or use {ENV_KERNELS}=auto|torch")
    return "triton"


def triton_interpreted() -> bool:
    """Whether this process's kernels were built for Triton's interpreter (CPU tensors, slow, for tests)."""
    return _INTERPRETED_AT_IMPORT


def record_triton_call(name: str) -> None:
    """Called by each Triton wrapper once per launch group."""
    triton_calls[name] += 1


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, or, inside `aot.recording()`, record (kernel, grid, args, kwargs) instead."""
    if _recorded_launches is not None:
        _recorded_launches.append((kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)
