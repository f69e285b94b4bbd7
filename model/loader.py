"""Checkpoint loading: safetensors only, single file or sharded, official DeepSeek-V4 names or transformers'.

Only the tensors the model asks for are read: a model built for experts [e0, e1) opens only the shard files
that hold its tensors (docs/v4_model.md §5.5). Quantized tensors (FP8 e4m3 + ue8m0 128x128 block scales,
FP4 e2m1 experts + ue8m0 per-32 scales) are dequantized on load or kept as stored (`keep_quantized`).

Loading streams tensor by tensor onto the target device: read one stored tensor (and its scale) from the file
with pread into a fresh host buffer, upload it, place it in its module buffer, drop the host buffer. A tensor
converted on load (a cast, or dequantization when not keep_quantized) is filled on the device a chunk of rows at
a time through one reused host buffer. Shapes are checked from the file headers before any data is read. The files are not memory-mapped:
pages of a mapping stay resident (and counted in the process's RSS) until the file is closed, which would hold
a second copy of every weight in host memory during the load (`bench/load.py` measures this).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from v4ray.kernels.quant import FP4_BLOCK, FP8_BLOCK, QuantTensor

from .config import V4Config
from .v4 import FP32_SUFFIXES, Linear, V4Model, checkpoint_name

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
_MTP = re.compile(r"^(model\.)?mtp\.")
# transformers' `save_pretrained` spelling -> official spelling (docs/v4_model.md §5.2).
_TF_RENAMES = {
    "embed_tokens.weight": "embed.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
    "lm_head.weight": "head.weight",
}


class CheckpointError(ValueError):
    """The checkpoint is unusable; the message names the file or tensor and what was expected."""


def official_name(stored: str) -> str | None:
    """Stored tensor name -> official name; None for MTP tensors (recognised, not loaded: MTP is not served)."""
    if _MTP.match(stored):
        return None
    name = stored[len("model."):] if stored.startswith("model.") else stored
    name = _TF_RENAMES.get(name, name)
    if name.endswith(".weight_scale_inv"):
        name = name[: -len(".weight_scale_inv")] + ".scale"
    return name


class Checkpoint:
    """An index of a checkpoint directory: official tensor name -> (file, stored name). Opens files lazily."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        if self.dir.is_file():
            raise CheckpointError(f"{self.dir} is a file; pass the checkpoint directory (with config.json)")
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.dir} does not exist")
        pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        index = self.dir / INDEX_FILE
        single = sorted(p.name for p in self.dir.glob("*.safetensors"))
        source = INDEX_FILE  # what names the files, for errors
        if index.exists():
            try:
                stored_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}")
        elif len(single) == 1:
            source = single[0]
            with safe_open(self.dir / single[0], framework="pt") as f:
                stored_map = {k: single[0] for k in f.keys()}
        elif pickles:
            raise CheckpointError(
                f"{self.dir} holds only pickle weights ({', '.join(pickles)}); v4ray loads safetensors only, "
                f"since unpickling can run arbitrary code. Convert the checkpoint to safetensors first.")
        elif single:
            raise CheckpointError(f"{self.dir} has several .safetensors files but no {INDEX_FILE}")
        else:
            raise CheckpointError(f"{self.dir} has no model weights (*.safetensors)")
        self.files: dict[str, tuple[str, str]] = {}
        self.skipped_mtp = 0
        inside: set[str] = set()  # file names already checked to resolve inside the checkpoint
        for stored, fname in stored_map.items():
            if not isinstance(fname, str):
                raise CheckpointError(f"{source} maps tensor '{stored}' to {fname!r}, which is not a file name")
            if Path(fname).suffix in PICKLE_SUFFIXES:
                raise CheckpointError(f"tensor '{stored}' lives in pickle file {fname}; only safetensors load")
            if fname not in inside:
                self._check_inside(source, stored, fname)
                inside.add(fname)
            name = official_name(stored)
            if name is None:
                self.skipped_mtp += 1
                continue
            self.files[name] = (fname, stored)

    def _check_inside(self, source: str, stored: str, fname: str) -> None:
        """Refuse an index entry naming a file outside the checkpoint: `..`, an absolute path, or a symlink whose
        target lies elsewhere. The index is data, and a checkpoint assembled from several sources (or an archive)
        must not make the loader read arbitrary files. One symlink layout is allowed: the Hugging Face hub cache,
        where `<repo>/snapshots/<rev>/<file>` links to `<repo>/blobs/<sha256>`."""
        root = self.dir.resolve()
        roots = [root]
        if root.parent.name == "snapshots":
            roots.append(root.parent.parent / "blobs")
        rel = Path(fname)
        target = (root / rel).resolve()
        lexical_ok = not rel.is_absolute() and ".." not in rel.parts and fname.strip() != ""
        if not lexical_ok or not any(target.is_relative_to(r) for r in roots):
            raise CheckpointError(
                f"{source} maps tensor '{stored}' to '{fname}', which resolves to {target}, outside the "
                f"checkpoint directory {root}; every weight file must lie inside the checkpoint directory")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def check_files(self, names: list[str]) -> None:
        """Every file holding one of `names` exists (checked before any tensor is read)."""
        first: dict[str, str] = {}
        for n in names:
            first.setdefault(self.files[n][0], n)
        for fname, name in first.items():
            if not (self.dir / fname).exists():
                raise CheckpointError(f"{INDEX_FILE} maps '{name}' to {fname}, which is missing")

    def reader(self, device: torch.device | str | None = None) -> "TensorReader":
        return TensorReader(self, device)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors into host memory (for small sets; the loader streams with `reader`)."""
        self.check_files(names)
        with self.reader() as r:
            return {n: r.get(n) for n in names}


# safetensors dtype names -> torch dtypes. ue8m0 scales come back as raw uint8 bytes (kernels/quant.py).
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
              "F8_E8M0": torch.uint8}


class SafetensorsFile:
    """One .safetensors file, read a tensor at a time with pread (no memory map): header = 8-byte little-endian
    length + JSON {name: {dtype, shape, data_offsets}}, then the data."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        # Each read asks for exactly one tensor's bytes, in one large request. Kernel readahead (often several
        # MB) would also pull in the neighbouring tensors, which an expert shard does not keep.
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        try:
            size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, 8, 0)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
            try:
                header = json.loads(os.pread(self.fd, n, 8))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path} has an unreadable safetensors header: {e}")
            self.base, self.size = 8 + n, size
            self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        os.close(self.fd)

    def meta(self, stored: str) -> torch.Tensor:
        """The stored tensor's dtype and shape, as a meta tensor (checks before reading)."""
        e = self.entries.get(stored)
        if e is None:
            raise CheckpointError(f"{self.path} does not hold tensor '{stored}' its index names")
        if e.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"tensor '{stored}' in {self.path} has unsupported dtype {e.get('dtype')!r}")
        t = torch.empty(e["shape"], dtype=_ST_DTYPES[e["dtype"]], device="meta")
        begin, end = e["data_offsets"]
        if end - begin != t.numel() * t.element_size() or not 0 <= begin <= end <= self.size - self.base:
            raise CheckpointError(f"tensor '{stored}' in {self.path} has data_offsets {[begin, end]} that do not "
                                  f"fit its shape {e['shape']} ({e['dtype']}) or the file")
        return t

    def read(self, stored: str, rows: tuple[int, int] | None = None, staging=None) -> torch.Tensor:
        """The stored tensor (or its rows [r0, r1) along the first dim) in host memory: a fresh buffer, or a
        view of `staging(nbytes)` (a reused uint8 buffer) for data that is converted right away."""
        m = self.meta(stored)
        shape, offset = list(m.shape), self.base + self.entries[stored]["data_offsets"][0]
        if rows is not None:
            offset += rows[0] * (m[0].numel() * m.element_size())
            shape[0] = rows[1] - rows[0]
        if staging is None:
            t = torch.empty(shape, dtype=m.dtype)
        else:
            nbytes = math.prod(shape) * m.element_size()
            t = staging(nbytes)[:nbytes].view(m.dtype).view(shape)
        buf, done = memoryview(t.reshape(-1).view(torch.uint8).numpy()), 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                raise CheckpointError(f"{self.path} ends inside tensor '{stored}' (truncated file)")
            done += n
        return t


class TensorReader:
    """Reads a checkpoint's tensors by official name onto `device`, one at a time; opens each file once."""

    def __init__(self, ckpt: Checkpoint, device: torch.device | str | None = None):
        self.ckpt, self.device = ckpt, torch.device(device or "cpu")
        self.open: dict[str, SafetensorsFile] = {}
        self._staging = torch.empty(0, dtype=torch.uint8)

    def staging(self, nbytes: int) -> torch.Tensor:
        """One host buffer for the chunks of converted tensors, reused (fresh ones would fragment the heap)."""
        if self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8)
        return self._staging

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        for f in self.open.values():
            f.close()
        self.open.clear()
        self._staging = torch.empty(0, dtype=torch.uint8)

    def _file(self, name: str) -> tuple[SafetensorsFile, str]:
        fname, stored = self.ckpt.files[name]
        if fname not in self.open:
            path = self.ckpt.dir / fname
            if not path.exists():
                raise CheckpointError(f"{INDEX_FILE} maps '{name}' to {fname}, which is missing")
            self.open[fname] = SafetensorsFile(path)
        return self.open[fname], stored

    def meta(self, name: str) -> torch.Tensor:
        f, stored = self._file(name)
        return f.meta(stored)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor onto the device, cast to `dtype` when given. A cast fills its result on the device
        CHUNK_ELEMENTS at a time, so the stored form is never held whole beside the converted one."""
        f, stored = self._file(name)
        m = f.meta(stored)
        if dtype is None or dtype == m.dtype or m.dim() == 0:
            return f.read(stored).to(self.device).to(dtype or m.dtype)
        out = torch.empty(m.shape, dtype=dtype, device=self.device)
        for rows in _row_chunks(m):
            out[rows[0]:rows[1]] = f.read(stored, rows, self.staging).to(self.device)
        return out

    def get_dequantized(self, name: str, fmt: str, dtype: torch.dtype) -> torch.Tensor:
        """An FP8/FP4 weight dequantized to `dtype` on the device, a chunk of rows (whole scale blocks) at a time."""
        f, stored = self._file(name)
        m = f.meta(stored)
        scale = self.get(name[: -len("weight")] + "scale")
        out = torch.empty(QuantTensor(m, scale, fmt).shape, dtype=dtype, device=self.device)
        for r0, r1 in _row_chunks(m, FP8_BLOCK):
            s = scale[r0 // FP8_BLOCK: -(-r1 // FP8_BLOCK)] if fmt == "fp8" else scale[r0:r1]
            data = f.read(stored, (r0, r1), self.staging).to(self.device)
            out[r0:r1] = QuantTensor(data, s, fmt).dequantize(dtype)
        return out


# Elements per chunk when a tensor is converted on load: bounds the extra memory (its stored bytes, plus the
# dequantization's fp32 temporaries, a few times 16 MB) while each read stays large.
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(m: torch.Tensor, multiple: int = 1) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of about CHUNK_ELEMENTS elements each, r0 a multiple of `multiple`."""
    per_row = max(1, m[0].numel()) if m.shape[0] else 1
    step = max(multiple, CHUNK_ELEMENTS // per_row // multiple * multiple)
    return [(r, min(r + step, m.shape[0])) for r in range(0, m.shape[0], step)]


def _weight_format(name: str, t: torch.Tensor, scale: torch.Tensor | None, logical: tuple[int, int]) -> str | None:
    """Which format a stored linear weight is in, checking its and its scale's shapes."""
    out, inn = logical
    if t.dtype == torch.float8_e4m3fn:
        fmt, phys, grid = "fp8", (out, inn), (-(-out // FP8_BLOCK), -(-inn // FP8_BLOCK))
    elif t.dtype in (torch.int8, torch.uint8):
        fmt, phys, grid = "fp4", (out, inn // 2), (out, inn // FP4_BLOCK)
    else:
        if scale is not None:
            raise CheckpointError(f"tensor '{name}' is {t.dtype} but has a '.scale' companion")
        if tuple(t.shape) != logical:
            raise CheckpointError(f"tensor '{name}' has shape {list(t.shape)}, expected {list(logical)}")
        return None
    if tuple(t.shape) != phys:
        raise CheckpointError(f"tensor '{name}' ({fmt}) has shape {list(t.shape)}, expected {list(phys)}")
    if scale is None:
        raise CheckpointError(f"tensor '{name}' is {fmt} but its scale '{name[:-len('weight')]}scale' is missing")
    if tuple(scale.shape) != grid:
        raise CheckpointError(f"scale of '{name}' has shape {list(scale.shape)}, expected {list(grid)} for {fmt}")
    return fmt


def _quant_weight(r: TensorReader, name: str, logical: tuple[int, int], dtype: torch.dtype,
                  keep_quantized: bool) -> QuantTensor:
    """One linear weight (and its scale): shapes checked from the header, read, uploaded, then dequantized to
    `dtype` on the device unless kept as stored."""
    scale_name = name[: -len("weight")] + "scale"
    has_scale = scale_name in r.ckpt
    fmt = _weight_format(name, r.meta(name), r.meta(scale_name) if has_scale else None, logical)
    if fmt is None:
        return QuantTensor(r.get(name, dtype))
    if keep_quantized:
        return QuantTensor(r.get(name), r.get(scale_name), fmt)
    return QuantTensor(r.get_dequantized(name, fmt, dtype))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, expert_range: tuple[int, int] | None = None,
               keep_quantized: bool = False, cfg: V4Config | None = None, expert_backend=None,
               device: torch.device | str | None = None) -> V4Model:
    """Build a V4Model from a checkpoint directory, its weights on `device` (default cpu).

    expert_range: load only routed experts [e0, e1) (an expert shard). keep_quantized: FP8/FP4 tensors stay in
    their checkpoint format with their scales (dequantized per use); otherwise they are dequantized to `dtype`.
    expert_backend: where the routed experts run (an expert-parallel router's exchange); None: in this process.
    Tensors stream one at a time from the files to the device (see the module docstring).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    device = torch.device(device or "cpu")
    cfg = cfg or V4Config.from_file(path)
    ckpt = Checkpoint(path)
    if expert_range is not None:
        e0, e1 = expert_range
        if not 0 <= e0 <= e1 <= cfg.n_routed_experts:
            raise ValueError(f"expert_range {expert_range} must satisfy 0 <= e0 <= e1 <= {cfg.n_routed_experts} "
                             f"(e0 == e1: no routed experts, as on a router)")
    model = V4Model(cfg, dtype, expert_range, expert_backend)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, Linear)}
    wanted = {}  # official name -> module buffer name
    for mod_name in model.state_dict():  # persistent buffers only (RoPE tables are computed)
        if mod_name.endswith(".scale") and mod_name[: -len("scale")] + "weight" in linears:
            continue  # scales are read with their weights
        wanted[checkpoint_name(mod_name)] = mod_name
    missing = [n for n in wanted if n not in ckpt]
    if missing:
        shapes = {checkpoint_name(k): list(v.shape) for k, v in model.named_buffers()}
        shown = ", ".join(f"'{n}' (expected shape {shapes[n]})" for n in missing[:5])
        raise CheckpointError(f"checkpoint {ckpt.dir} lacks {len(missing)} tensor(s) the config needs: {shown}"
                              + (" ..." if len(missing) > 5 else ""))
    ckpt.check_files(list(wanted))

    with ckpt.reader(device) as r:
        for name, mod_name in wanted.items():
            owner_name, _, attr = mod_name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if mod_name in linears:
                lin: Linear = owner
                # fp32 linears (LM head, router, compressor and indexer-weight projections) are kept in fp32
                # once here, so that their forward never casts a weight (2 GB per step for V4-Flash's head).
                q = _quant_weight(r, name, (lin.out_features, lin.in_features),
                                  torch.float32 if lin.fp32 else dtype, keep_quantized)
                lin.fmt, lin._buffers["weight"], lin._buffers["scale"] = q.fmt, q.data, q.scale
                continue
            stored, expect = list(r.meta(name).shape), list(owner._buffers[attr].shape)
            if stored != expect:
                raise CheckpointError(f"tensor '{name}' has shape {stored}, expected {expect}")
            t = r.get(name, torch.long if attr == "tid2eid" else torch.float32 if name.endswith(FP32_SUFFIXES)
                      else dtype)
            if attr == "tid2eid" and t.numel() and (t.min() < 0 or t.max() >= cfg.n_routed_experts):
                raise CheckpointError(f"tensor '{name}' holds expert ids outside [0, {cfg.n_routed_experts})")
            owner._buffers[attr] = t
    model.to(device)  # the computed tables (RoPE frequencies); the loaded weights are there already
    model.eval()
    return model


def load_expert_weights(path: str | Path, expert_ids: list[int], dtype: torch.dtype = torch.float32,
                        keep_quantized: bool = True, cfg: V4Config | None = None,
                        device: torch.device | str | None = None,
                        ) -> list[dict[int, tuple[QuantTensor, QuantTensor, QuantTensor]]]:
    """The routed experts `expert_ids` of every layer, reading only their tensors (an expert shard's load),
    streamed one tensor at a time onto `device` (default cpu).

    Returns per layer {expert id: (w1, w2, w3)}; FP8/FP4 stay as stored unless keep_quantized is False."""
    cfg = cfg or V4Config.from_file(path)
    ckpt = Checkpoint(path)
    bad = [e for e in expert_ids if not 0 <= e < cfg.n_routed_experts]
    if bad:
        raise ValueError(f"expert ids {bad} are outside [0, {cfg.n_routed_experts})")
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {"w1": (I, D), "w2": (D, I), "w3": (I, D)}
    names = [f"layers.{L}.ffn.experts.{e}.{w}.weight" for L in range(cfg.num_hidden_layers) for e in expert_ids
             for w in shapes]
    missing = [n for n in names if n not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.dir} lacks {len(missing)} expert tensor(s): {missing[:3]}")
    ckpt.check_files(names)
    out = []
    with ckpt.reader(device) as r:
        for L in range(cfg.num_hidden_layers):
            out.append({e: tuple(_quant_weight(r, f"layers.{L}.ffn.experts.{e}.{w}.weight", shape, dtype,
                                               keep_quantized) for w, shape in shapes.items())
                        for e in expert_ids})
    return out
