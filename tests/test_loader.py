"""Checkpoint loading: expert ranges touch only their files, transformers' names, MTP, and broken inputs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from v4ray.model.config import ConfigError, V4Config, load_preset
from v4ray.kernels.quant import QuantTensor
from v4ray.model import loader
from v4ray.model.loader import INDEX_FILE, Checkpoint, CheckpointError, load_model
from v4ray.model.tiny import expert_files
from v4ray.model.v4 import checkpoint_name

from conftest import load_reference, parity_prompt, reference_logits, rel_err
from test_parity import PARITY_RTOL


# Two model instances holding bitwise-equal weights compute the same math, but CPU GEMM kernels choose blocked
# and vectorised paths by buffer alignment, so summation order (and fp32 round-off, ~eps * sqrt(K) per dot
# product) can differ between instances: 9.5e-7 was seen. 1e-5 is 10x that, and 10x below PARITY_RTOL.
SAME_WEIGHTS_RTOL = 1e-5


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    def get(**kw):
        dst = tmp_path / "ckpt"
        shutil.copytree(tiny_ckpt(**kw), dst)
        return dst
    return get


def test_expert_range_reads_only_its_files(ckpt_copy):
    ckpt = ckpt_copy(preset="v4-tiny", dtype="fp4-experts", experts_per_file=2)
    full = load_model(ckpt, torch.float32)
    deleted = []
    for fname, ids in expert_files(ckpt).items():
        if ids and ids.isdisjoint({-1, 2, 3}):  # files holding only other experts
            (ckpt / fname).unlink()
            deleted.append(fname)
    assert len(deleted) == 3
    shard = load_model(ckpt, torch.float32, expert_range=(2, 4), keep_quantized=True)
    for layer_full, layer_shard in zip(full.layers, shard.layers):
        assert sorted(layer_shard.ffn.experts) == ["2", "3"]
        for e in ("2", "3"):
            for w in ("w1", "w2", "w3"):
                a = getattr(layer_full.ffn.experts[e], w).weight
                b = getattr(layer_shard.ffn.experts[e], w).qweight().dequantize(torch.float32)
                assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(ckpt, torch.float32)  # the full model needs the deleted files: named in the error


def test_transformers_save_pretrained_names_load(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("v4-tiny-pro")
    ref = load_reference(ckpt)
    ref.save_pretrained(tmp_path / "tf")
    names = set(json.loads((tmp_path / "tf" / INDEX_FILE).read_text())["weight_map"]) if \
        (tmp_path / "tf" / INDEX_FILE).exists() else set(load_file(tmp_path / "tf" / "model.safetensors"))
    assert "model.embed_tokens.weight" in names and "model.hc_head.hc_fn" in names  # transformers' spelling
    ids = parity_prompt(160)
    ours = load_model(tmp_path / "tf", torch.float32)(ids)
    assert rel_err(ours, reference_logits(ref, ids)).max() <= PARITY_RTOL


def test_single_file_checkpoint_and_mtp_tensors(tiny_ckpt, tmp_path):
    src = tiny_ckpt("v4-tiny-swa")
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(f))
    tensors["mtp.0.e_proj.weight"] = torch.zeros(4, 4)
    tensors["mtp.0.hnorm.weight"] = torch.zeros(4)
    dst = tmp_path / "single"
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors")
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(src / f, dst / f)
    assert Checkpoint(dst).skipped_mtp == 2
    single, sharded = load_model(dst, torch.float32), load_model(src, torch.float32)
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys()
    for name in a:  # the same bytes from either file layout: bitwise
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ids = parity_prompt(40)
    assert rel_err(single(ids), sharded(ids)).max() <= SAME_WEIGHTS_RTOL


def _rewrite_index(ckpt, fn):
    index = ckpt / INDEX_FILE
    d = json.loads(index.read_text())
    fn(d["weight_map"])
    index.write_text(json.dumps(d))


def test_missing_tensor_is_named(ckpt_copy):
    ckpt = ckpt_copy(preset="v4-tiny-swa")
    _rewrite_index(ckpt, lambda wm: wm.pop("layers.1.attn.wq_b.weight"))
    with pytest.raises(CheckpointError, match=r"'layers\.1\.attn\.wq_b\.weight' \(expected shape \[256, 64\]\)"):
        load_model(ckpt)


def test_wrong_shape_is_named(ckpt_copy):
    ckpt = ckpt_copy(preset="v4-tiny-swa")
    fname = json.loads((ckpt / INDEX_FILE).read_text())["weight_map"]["layers.0.attn.wkv.weight"]
    t = load_file(ckpt / fname)
    t["layers.0.attn.wkv.weight"] = torch.zeros(64, 100)
    save_file(t, ckpt / fname)
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.wkv\.weight' has shape \[64, 100\], expected \[64, 128\]"):
        load_model(ckpt)


def test_pickle_checkpoint_refused(tmp_path, tiny_ckpt):
    shutil.copy(tiny_ckpt("v4-tiny-swa") / "config.json", tmp_path / "config.json")
    torch.save({"embed.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*safetensors only"):
        load_model(tmp_path)


def test_unknown_model_type(tmp_path):
    d = load_preset("v4-tiny").to_hf_dict() | {"model_type": "deepseek_v3"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="'model_type' is 'deepseek_v3'"):
        V4Config.from_file(tmp_path)


def test_bad_preset_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "v4ray.cli", "make-tiny", str(tmp_path / "x"),
                        "--preset", "v4-huge"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown preset 'v4-huge'" in r.stderr and "v4-tiny" in r.stderr
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_preset("nope")


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_index_entry_outside_the_checkpoint_is_refused(ckpt_copy, tmp_path, where):
    ckpt = ckpt_copy(preset="v4-tiny-swa")
    wm = json.loads((ckpt / INDEX_FILE).read_text())["weight_map"]
    fname = wm["layers.0.attn.wkv.weight"]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(ckpt / fname, outside)  # a loadable file: only its place is wrong
    entry = {"dotdot": "../outside.safetensors", "absolute": str(outside), "symlink": "link.safetensors"}[where]
    if where == "symlink":
        (ckpt / "link.safetensors").symlink_to(outside)
    _rewrite_index(ckpt, lambda wm: wm.__setitem__("layers.0.attn.wkv.weight", entry))
    with pytest.raises(CheckpointError, match=rf"'layers\.0\.attn\.wkv\.weight' to '{re.escape(entry)}'.*outside"):
        Checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load_model(ckpt)


def test_hugging_face_cache_symlinks_load(tiny_ckpt, tmp_path):
    """The hub cache's layout, snapshots/<rev>/<file> -> ../../blobs/<sha>, is inside the checkpoint."""
    src = tiny_ckpt("v4-tiny-swa")
    repo = tmp_path / "models--deepseek-ai--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    linked, direct = load_model(snap, torch.float32).state_dict(), load_model(src, torch.float32).state_dict()
    assert linked.keys() == direct.keys() and all(torch.equal(linked[k], direct[k]) for k in linked)


@pytest.mark.parametrize("dtype,keep", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_chunked_conversion_equals_whole_tensor_conversion(ckpt_copy, monkeypatch, dtype, keep):
    """Tensors converted on load (casts, FP8/FP4 dequantization) are filled a chunk of rows at a time. With chunks
    of a few hundred elements every tensor crosses chunk edges; each must equal its stored tensor (read by
    safetensors itself) converted whole. Scales are redrawn per block so that a chunk paired with another chunk's
    scale rows shows."""
    ckpt = ckpt_copy(preset="v4-tiny", dtype="fp4-experts")
    g = torch.Generator().manual_seed(0)
    stored = {}
    for f in ckpt.glob("*.safetensors"):
        tensors = load_file(f)
        for k, v in tensors.items():
            if k.endswith(".scale"):
                tensors[k] = torch.randint(118, 136, v.shape, generator=g, dtype=torch.uint8).view(v.dtype)
        save_file(tensors, f)
        stored.update(tensors)
    monkeypatch.setattr(loader, "CHUNK_ELEMENTS", 300)
    model = load_model(ckpt, dtype, keep_quantized=keep, device=torch.device("cpu"))
    converted = 0
    for mod_name, t in model.state_dict().items():
        name = checkpoint_name(mod_name)
        if name.endswith(".scale"):
            assert keep and torch.equal(t, stored[name].view(torch.uint8)), name
            continue
        s = stored[name]
        scale = name[: -len("weight")] + "scale"
        if scale in stored and not keep:
            fmt = "fp8" if s.dtype == torch.float8_e4m3fn else "fp4"
            ref = QuantTensor(s, stored[scale].view(torch.uint8), fmt).dequantize(t.dtype)
        else:
            ref = s.to(t.dtype)
        converted += ref.dtype != s.dtype
        assert t.dtype == ref.dtype and torch.equal(t, ref), name
    assert converted > 0
