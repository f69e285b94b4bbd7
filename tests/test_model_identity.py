"""model_identity: the prefix cache's model identity follows every weight byte, the tokenizer, config, dtype
and layout, and agrees across copies of one checkpoint (replicas on different nodes share entries)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from v4ray.model.identity import IDENTITY_SIDECAR, model_identity


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt("v4-tiny-swa"), dst)  # copytree keeps mtimes; nothing of the shared fixture changes
    return dst


def _largest_weight_file(d):
    return max(d.glob("*.safetensors"), key=lambda p: p.stat().st_size)


def test_identity_changes_when_4k_in_the_middle_of_a_weight_file_change(ckpt):
    before = model_identity(ckpt)
    f = _largest_weight_file(ckpt)
    size = f.stat().st_size
    assert size > 3 * 65536 + 4096  # the middle 4 KiB lie outside the first and last 64 KiB
    with open(f, "r+b") as fh:
        fh.seek(size // 2)
        block = fh.read(4096)
        fh.seek(size // 2)
        fh.write(bytes(b ^ 0xFF for b in block))
    assert f.stat().st_size == size
    assert model_identity(ckpt) != before


def test_identity_covers_tokenizer_config_dtype_and_layout(ckpt):
    base = model_identity(ckpt, dtype=torch.float32, layout="kv=fp32|unit=128")
    assert model_identity(ckpt, dtype="float32", layout="kv=fp32|unit=128") == base  # a dtype or its name
    assert model_identity(ckpt, dtype=torch.bfloat16, layout="kv=fp32|unit=128") != base
    assert model_identity(ckpt, dtype=torch.float32, layout="kv=bf16|unit=128") != base
    assert model_identity(ckpt) != base  # the one-argument call still works (dtype/layout then left to root_key)

    tok = ckpt / "tokenizer.json"
    original = tok.read_bytes()
    tok.write_bytes(original.replace(b'"<', b'"<x', 1))
    changed_tokenizer = model_identity(ckpt, dtype=torch.float32, layout="kv=fp32|unit=128")
    tok.write_bytes(original)
    assert changed_tokenizer != base
    assert model_identity(ckpt, dtype=torch.float32, layout="kv=fp32|unit=128") == base

    (ckpt / "tokenizer_config.json").unlink()
    assert model_identity(ckpt, dtype=torch.float32, layout="kv=fp32|unit=128") != base

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert model_identity(ckpt, dtype=torch.float32, layout="kv=fp32|unit=128") != changed_tokenizer


def test_copies_agree_and_the_hash_is_kept_beside_the_checkpoint(ckpt, tmp_path):
    first = model_identity(ckpt)
    sidecar = json.loads((ckpt / IDENTITY_SIDECAR).read_text())["files"]
    f = _largest_weight_file(ckpt)
    assert sidecar[f.name]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert sidecar[f.name]["mtime_ns"] == f.stat().st_mtime_ns

    copy = tmp_path / "copy"
    copy.mkdir()
    for p in ckpt.iterdir():
        if p.name != IDENTITY_SIDECAR:
            shutil.copyfile(p, copy / p.name)  # new mtimes, as on another node
            os.utime(copy / p.name, ns=(1, 1))
    assert model_identity(copy) == first

    # the sidecar is what later starts read: a rewritten file (new mtime) is hashed again, not trusted
    (copy / IDENTITY_SIDECAR).write_text(json.dumps({"version": 1, "files": {
        n: e | {"sha256": "00" * 32} for n, e in json.loads((copy / IDENTITY_SIDECAR).read_text())["files"].items()}}))
    assert model_identity(copy) != first  # proves the digests are read from the sidecar
    os.utime(f := copy / f.name, ns=(2, 2))
    stale = json.loads((copy / IDENTITY_SIDECAR).read_text())["files"]
    model_identity(copy)
    assert json.loads((copy / IDENTITY_SIDECAR).read_text())["files"][f.name]["sha256"] != stale[f.name]["sha256"]


def test_unwritable_sidecar_still_gives_the_identity(ckpt):
    """A read-only checkpoint: the sidecar cannot be written (here a directory stands in its place, which
    fails for root too); the identity is computed anyway."""
    first = model_identity(ckpt)
    (ckpt / IDENTITY_SIDECAR).unlink()
    (ckpt / IDENTITY_SIDECAR).mkdir()
    assert model_identity(ckpt) == first
    assert (ckpt / IDENTITY_SIDECAR).is_dir() and not [p for p in ckpt.iterdir() if p.name.startswith(".v4ray-tmp")]
