"""Device provenance on a machine without a GPU: which tensors would live on the device, and every crossing.

The GPU path's rules (issue 16; docs/architecture.md §11) are about where tensors live, not about values: no op
may mix a host tensor with a device tensor, a step uploads its metadata once, and a decode step reads back one
result. All of that is decidable on the CPU by following each tensor's would-be device through every op:

* `DeviceTensor` wraps a real CPU tensor and claims the device `meta` (a device that exists in every torch build,
  so `x.device` flows through the code like `cuda` would, and `torch.zeros(..., device=x.device)` reaches this
  mode instead of a CUDA runtime). Mark the model's weights with `mark_device(module)`; whatever the code then
  allocates on `model.device` (the cache, per-step buffers) is device-resident too.
* `Provenance` (a `TorchDispatchMode`) runs every op on the unwrapped CPU tensors, so values are exact and a
  whole engine runs under it, and records:
  - uploads: a copy of a host tensor to the device (`.to(device)`, `copy_` host -> device);
  - syncs: anything that makes the host wait for the device: `.item()`/`float()`/`bool()`, `.tolist()`,
    `.cpu()`, `copy_` device -> host, and ops whose output shape depends on device values (boolean-mask indexing,
    `nonzero`, `unique`, ...), which synchronise implicitly on CUDA;
  - mixes: an op that takes a device tensor and a host tensor with at least one dimension (CUDA rejects those;
    zero-dim host tensors are scalars and allowed).

Counts are kept per `window(name)`, so a test can assert "at most one upload per step".

Kernels: on CUDA every `v4ray.kernels` dispatch function runs a Triton kernel (on device-side schedules; see
kernels/moe.py `_tile_schedule`), but under this mode the tensors claim `meta`, so the torch references run, and
their host-side bookkeeping (a reference may loop over experts) is not what the GPU does. `kernels_as_device_ops()`
makes each dispatch function one device op: its tensor arguments are checked for mixes, its internals are not
counted.
"""

from __future__ import annotations

import importlib
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

DEVICE = torch.device("meta")
aten = torch.ops.aten

# Ops whose output size depends on tensor values: CUDA reads the size back before it can allocate (a sync).
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                   aten.unique_consecutive.default, aten.unique_dim.default, aten.repeat_interleave.Tensor,
                   aten.bincount.default, aten.histc.default}
_ACTIVE: list["Provenance"] = []


class DeviceTensor(torch.Tensor):
    """A CPU tensor that says it lives on the device. Only `Provenance` can run ops on it."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                   device=DEVICE, storage_offset=inner.storage_offset(),
                                                   requires_grad=False)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self) -> str:
        return f"DeviceTensor({self.inner!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a DeviceTensor outside a Provenance mode")

    # Python-level reads that bypass the dispatcher.
    def tolist(self):
        _record_sync("tolist")
        return self.inner.tolist()

    def numpy(self, *args, **kwargs):
        _record_sync("numpy")
        return self.inner.numpy(*args, **kwargs)

    def data_ptr(self) -> int:  # a device pointer: fine to read (kernels take pointer tables), no sync
        return self.inner.data_ptr()


def _record_sync(what: str) -> None:
    if _ACTIVE:
        _ACTIVE[-1]._event("sync", what, [])


def on_device(t: torch.Tensor) -> bool:
    return isinstance(t, DeviceTensor)


def to_device(t: torch.Tensor) -> DeviceTensor:
    """Tag an existing CPU tensor as device-resident (setup only: not counted as an upload)."""
    return t if isinstance(t, DeviceTensor) else DeviceTensor(t)


def mark_device(module: torch.nn.Module) -> torch.nn.Module:
    """Tag every buffer and parameter of `module` as device-resident, in place (the weights as loaded on a GPU)."""
    for m in module.modules():
        for name, buf in m._buffers.items():
            if isinstance(buf, torch.Tensor) and buf.device.type != "meta":
                m._buffers[name] = DeviceTensor(buf)
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = DeviceTensor(p.detach())
    return module


@dataclass
class Event:
    kind: str          # "upload", "sync", "mix"
    op: str
    shapes: list
    where: str         # the innermost project frame that caused it


@dataclass
class Window:
    name: str
    events: list[Event] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(e.kind == kind for e in self.events)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def summary(self) -> str:
        by = Counter((e.kind, e.op, e.where) for e in self.events)
        return "\n".join(f"  {n:4d} x {k:6s} {op:40s} at {where}" for (k, op, where), n in by.most_common())


def _caller() -> str:
    """The innermost frame in the project (not torch, not this file) that led to the op."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        f = frame.filename
        if "/torch/" in f or f.endswith("device_provenance.py") or "/site-packages/" in f and "v4ray" not in f:
            continue
        return f"{'/'.join(f.split('/')[-2:])}:{frame.lineno} {frame.name}"
    return "?"


def _is_device_arg(d) -> bool:
    return d is not None and torch.device(d).type == DEVICE.type


class Provenance(TorchDispatchMode):
    """Run ops on the CPU while following which tensors are device-resident; count crossings per window."""

    def __init__(self):
        super().__init__()
        self.windows: list[Window] = [Window("setup")]
        self.opaque = 0  # > 0 inside a kernel dispatch function (kernels_as_device_ops)

    @property
    def current(self) -> Window:
        return self.windows[-1]

    @contextmanager
    def window(self, name: str):
        """Count the events of one step (or any span) separately; yields its Window."""
        w = Window(name)
        self.windows.append(w)
        try:
            yield w
        finally:
            self.windows.append(Window(f"after {name}"))

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def _event(self, kind: str, op, shapes) -> None:
        if self.opaque:
            return
        self.current.events.append(Event(kind, str(op), shapes, _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device == DEVICE and not isinstance(t, DeviceTensor) for t in leaves):
            # torch.tensor(data, device=...) copies outside the dispatcher: the values never reach this mode.
            raise RuntimeError(f"{func}: a {DEVICE.type} tensor without data, from torch.tensor(data, device=...) or "
                               f"similar; build it on the host and move it with .to(device), which is counted as "
                               f"the upload it is ({_caller()})")
        dev = [t for t in leaves if isinstance(t, DeviceTensor)]
        host = [t for t in leaves if not isinstance(t, DeviceTensor) and t.dim() > 0]
        to_dev = _is_device_arg(kwargs.get("device"))
        if to_dev:
            kwargs["device"] = torch.device("cpu")
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs a CUDA runtime; where memory lives is what we follow

        wrap = bool(dev) or to_dev
        if func is aten._to_copy.default:
            if to_dev and not dev:
                self._event("upload", func, [list(t.shape) for t in leaves])
            elif dev and "device" in kwargs and not to_dev:
                self._event("sync", "to(cpu)", [list(t.shape) for t in dev])
                wrap = False
        elif func is aten.copy_.default:
            dst, src = args[0], args[1]
            if isinstance(dst, DeviceTensor) and not isinstance(src, DeviceTensor):
                self._event("upload", func, [list(src.shape)])
            elif not isinstance(dst, DeviceTensor) and isinstance(src, DeviceTensor):
                self._event("sync", "copy_ to host", [list(src.shape)])
            wrap = isinstance(dst, DeviceTensor)
        elif func is aten._local_scalar_dense.default:
            if dev:
                self._event("sync", "item", [])
        else:
            if dev and host:
                self._event("mix", func, [list(t.shape) for t in host])
            if dev and func in _DATA_DEPENDENT:
                self._event("sync", f"{func} (data-dependent shape)", [])
            elif dev and func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                    self._event("sync", f"{func} (boolean mask)", [])

        unwrap = lambda a: a.inner if isinstance(a, DeviceTensor) else a
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func is aten.copy_.default or (func._schema.is_mutable and args and isinstance(args[0], torch.Tensor)
                                          and func.overloadpacket.__name__.endswith("_")):
            return args[0]  # in place: hand back the caller's (possibly wrapped) tensor
        if not wrap:
            return out
        return tree_map(lambda o: DeviceTensor(o) if isinstance(o, torch.Tensor) else o, out)


# Where the model and the all-to-all import the kernel dispatch functions (the names they call them by).
KERNEL_CALL_SITES = {
    "v4ray.model.v4": ("compress_pool", "expert_mlp", "indexer_topk", "indexer_topk_padded", "mhc_weights",
                       "sink_attention", "sparse_sink_attention", "sparse_sink_attention_fp8",
                       "indexer_topk_padded_fp8", "indexer_topk_paged"),
    "v4ray.actors.expert_parallel": ("expert_mlp",),
}


@contextmanager
def kernels_as_device_ops(prov: Provenance):
    """Within the block, each kernel dispatch function called from the model or the all-to-all counts as one
    device kernel: a host tensor among its arguments is a mix; what the torch reference does inside is not
    counted (on CUDA it is a Triton launch)."""
    patched = []

    def opaque(name, fn):
        def call(*args, **kwargs):
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if any(on_device(t) for t in tensors):
                for t in tensors:
                    if not on_device(t) and t.dim() > 0:
                        prov._event("mix", f"kernel {name}", [list(t.shape)])
            prov.opaque += 1
            try:
                return fn(*args, **kwargs)
            finally:
                prov.opaque -= 1
        return call

    for module_name, names in KERNEL_CALL_SITES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            fn = getattr(module, name, None)
            if fn is not None:
                patched.append((module, name, fn))
                setattr(module, name, opaque(name, fn))
    try:
        yield
    finally:
        for module, name, fn in patched:
            setattr(module, name, fn)
