"""Checkpoint loading: safetensors only, single file or sharded, official DeepSeek-V4 names or transformers'.

Only the tensors the model asks for are read: a model built for experts [e0, e1) opens only the shard files
that hold its tensors (docs/v4_model.md §5.5). Quantized tensors (FP8 e4m3 + ue8m0 128x128 block scales,
FP4 e2m1 experts + ue8m0 per-32 scales) are dequantized on load or kept as stored (`keep_quantized`).
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
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

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors, opening each needed file once; ue8m0 scales come back as raw uint8."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n][0], []).append(n)
        out = {}
        with ExitStack() as stack:
            for fname, group in by_file.items():
                path = self.dir / fname
                if not path.exists():
                    raise CheckpointError(f"{INDEX_FILE} maps '{group[0]}' to {fname}, which is missing")
                f = stack.enter_context(safe_open(path, framework="pt"))
                for n in group:
                    t = f.get_tensor(self.files[n][1])
                    out[n] = t.view(torch.uint8) if t.dtype == torch.float8_e8m0fnu else t
        return out


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


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, expert_range: tuple[int, int] | None = None,
               keep_quantized: bool = False, cfg: V4Config | None = None, expert_backend=None) -> V4Model:
    """Build a V4Model from a checkpoint directory.

    expert_range: load only routed experts [e0, e1) (an expert shard). keep_quantized: FP8/FP4 tensors stay in
    their checkpoint format with their scales (dequantized per use); otherwise they are dequantized to `dtype`.
    expert_backend: where the routed experts run (an expert-parallel router's exchange); None: in this process.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    cfg = cfg or V4Config.from_file(path)
    ckpt = Checkpoint(path)
    if expert_range is not None:
        e0, e1 = expert_range
        if not 0 <= e0 <= e1 <= cfg.n_routed_experts:
            raise ValueError(f"expert_range {expert_range} must satisfy 0 <= e0 <= e1 <= {cfg.n_routed_experts} "
                             f"(e0 == e1: no routed experts, as on a router)")
    model = V4Model(cfg, dtype, expert_range, expert_backend)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, Linear)}
    wanted = {}  # official name -> (module, attr)
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
    scale_names = [n[: -len("weight")] + "scale" for n, m in wanted.items() if m in linears]
    tensors = ckpt.read(list(wanted) + [s for s in scale_names if s in ckpt])

    for name, mod_name in wanted.items():
        t = tensors[name]
        owner_name, _, attr = mod_name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if mod_name in linears:
            lin: Linear = owner
            scale = tensors.get(name[: -len("weight")] + "scale")
            fmt = _weight_format(name, t, scale, (lin.out_features, lin.in_features))
            q = QuantTensor(t, scale, fmt)
            if fmt is not None and not keep_quantized:
                q = QuantTensor(q.dequantize(dtype))
            elif fmt is None:
                q = QuantTensor(t.to(dtype))
            lin.fmt, lin._buffers["weight"], lin._buffers["scale"] = q.fmt, q.data, q.scale
            continue
        expect = tuple(owner._buffers[attr].shape)
        if tuple(t.shape) != expect:
            raise CheckpointError(f"tensor '{name}' has shape {list(t.shape)}, expected {list(expect)}")
        if attr == "tid2eid":
            t = t.long()
            if t.numel() and (t.min() < 0 or t.max() >= cfg.n_routed_experts):
                raise CheckpointError(f"tensor '{name}' holds expert ids outside [0, {cfg.n_routed_experts})")
        elif name.endswith(FP32_SUFFIXES):
            t = t.float()
        else:
            t = t.to(dtype)
        owner._buffers[attr] = t
    model.eval()
    return model


def load_expert_weights(path: str | Path, expert_ids: list[int], dtype: torch.dtype = torch.float32,
                        keep_quantized: bool = True, cfg: V4Config | None = None,
                        ) -> list[dict[int, tuple[QuantTensor, QuantTensor, QuantTensor]]]:
    """The routed experts `expert_ids` of every layer, reading only their tensors (an expert shard's load).

    Returns per layer {expert id: (w1, w2, w3)}; FP8/FP4 stay as stored unless keep_quantized is False."""
    cfg = cfg or V4Config.from_file(path)
    ckpt = Checkpoint(path)
    bad = [e for e in expert_ids if not 0 <= e < cfg.n_routed_experts]
    if bad:
        raise ValueError(f"expert ids {bad} are outside [0, {cfg.n_routed_experts})")
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {"w1": (I, D), "w2": (D, I), "w3": (I, D)}
    names = [f"layers.{L}.ffn.experts.{e}.{w}" for L in range(cfg.num_hidden_layers) for e in expert_ids
             for w in shapes]
    missing = [n + ".weight" for n in names if n + ".weight" not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.dir} lacks {len(missing)} expert tensor(s): {missing[:3]}")
    tensors = ckpt.read([n + ".weight" for n in names] + [n + ".scale" for n in names if n + ".scale" in ckpt])
    out = []
    for L in range(cfg.num_hidden_layers):
        layer = {}
        for e in expert_ids:
            ws = []
            for w, shape in shapes.items():
                name = f"layers.{L}.ffn.experts.{e}.{w}"
                t, scale = tensors[name + ".weight"], tensors.get(name + ".scale")
                q = QuantTensor(t, scale, _weight_format(name + ".weight", t, scale, shape))
                if q.fmt is None or not keep_quantized:
                    q = QuantTensor(q.dequantize(dtype))
                ws.append(q)
            layer[e] = tuple(ws)
        out.append(layer)
    return out
