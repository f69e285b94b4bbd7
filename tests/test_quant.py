"""FP8 / FP4 checkpoint formats: dequantization against transformers, loading, and in-memory bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from v4ray.kernels.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8
from v4ray.model.loader import Checkpoint, load_model
from v4ray.model.v4 import Linear

from conftest import load_reference, parity_prompt, reference_logits, rel_err
from test_parity import PARITY_RTOL


def _tf_dequant(q: torch.Tensor, scale_u8: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(hf_quantizer=None)._dequantize_one(q, scale_u8.view(torch.float8_e8m0fnu),
                                                           output_dtype=torch.float32)


@pytest.mark.parametrize("name", ["layers.1.attn.wq_b", "layers.1.attn.wo_a", "layers.2.ffn.shared_experts.w2",
                                  "layers.1.attn.indexer.wq_b", "layers.3.ffn.experts.5.w1",
                                  "layers.0.ffn.experts.0.w2"])
def test_dequantization_equals_transformers(tiny_ckpt, name):
    ckpt = Checkpoint(tiny_ckpt("v4-tiny", dtype="fp4-experts"))
    t = ckpt.read([f"{name}.weight", f"{name}.scale"])
    q, s = t[f"{name}.weight"], t[f"{name}.scale"]
    ours = dequant_fp4(q, s) if ".experts." in name and "shared" not in name else dequant_fp8(q, s)
    assert q.dtype == (torch.int8 if ".experts." in name and "shared" not in name else torch.float8_e4m3fn)
    assert torch.equal(ours, _tf_dequant(q, s))


@pytest.mark.parametrize("dtype", ["fp8", "fp4-experts"])
def test_quantized_checkpoint_logits_equal_transformers(tiny_ckpt, dtype):
    ckpt = tiny_ckpt("v4-tiny", dtype=dtype)
    ids = parity_prompt(200)
    ours = load_model(ckpt, torch.float32)(ids)
    ref = reference_logits(load_reference(ckpt), ids)  # transformers' own CPU dequantization
    assert rel_err(ours, ref).max() <= PARITY_RTOL


def _file_tensor_bytes(ckpt_dir: Path) -> dict[str, int]:
    """Payload bytes of each tensor, read from the safetensors headers (not through the loader)."""
    out = {}
    for f in ckpt_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                out[k] = v["data_offsets"][1] - v["data_offsets"][0]
    return out


def test_kept_quantized_tensors_occupy_their_checkpoint_bytes(tiny_ckpt):
    ckpt = tiny_ckpt("v4-tiny", dtype="fp4-experts")
    on_disk = _file_tensor_bytes(ckpt)
    kept = load_model(ckpt, torch.bfloat16, keep_quantized=True)
    deq = load_model(ckpt, torch.bfloat16)
    kept_bytes = disk_bytes = deq_bytes = 0
    fmts = set()
    for (name, lin), (_, lin_deq) in zip(kept.named_modules(), deq.named_modules()):
        if isinstance(lin, Linear) and lin.fmt is not None:
            fmts.add(lin.fmt)
            kept_bytes += lin.weight.nbytes + lin.scale.nbytes
            disk_bytes += on_disk[f"{name}.weight"] + on_disk[f"{name}.scale"]
            deq_bytes += lin_deq.weight.nbytes
    assert fmts == {"fp8", "fp4"}
    assert kept_bytes == disk_bytes
    print(f"quantized linears: {kept_bytes} B kept vs {deq_bytes} B dequantized to bf16")
    assert deq_bytes > 1.7 * kept_bytes
    ids = parity_prompt(64)
    assert torch.equal(kept(ids), deq(ids))  # dequantize-per-use computes the very same weights


def test_quantizers_roundtrip():
    w = torch.randn(200, 256) * torch.logspace(-3, 1, 256)  # spans many exponents
    q, s = quant_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 2)
    assert ((dequant_fp8(q, s) - w).abs() <= w.abs().amax() * 2 ** -4).all()
    q4, s4 = quant_fp4(w)
    assert q4.shape == (200, 128) and s4.shape == (200, 8)
    exact = dequant_fp4(q4, s4)
    q4b, s4b = quant_fp4(exact)  # FP4 values re-quantize to themselves
    assert torch.equal(dequant_fp4(q4b, s4b), exact)
