"""Paged KV pools: byte formats, measured bytes against hand arithmetic, capacity, `v4ray plan kv`."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from v4ray.model.config import load_preset
from v4ray.model.kv_cache import CacheFullError, PagedKVCache, StepBatch
from v4ray.model.kv_format import capacity, kv_bytes, pack_index, pack_main, unpack_index, unpack_main
from v4ray.model.loader import load_model

from conftest import SHARED_REFERENCE, parity_prompt, rel_err


def _plan(model: str, dtype: str) -> str:
    r = subprocess.run([sys.executable, "-m", "v4ray.cli", "plan", "kv", "--model", model, "--kv-dtype",
                        dtype], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("name,dtype,per_token,v32,ratio", [
    ("deepseek-v4-flash", "fp8", "3,850", "48,068", "8.0%"),
    ("deepseek-v4-pro", "fp8", "5,511", "48,068", "11.5%"),
    ("deepseek-v4-flash", "bf16", "6,880", "85,888", "8.0%"),
    ("deepseek-v4-pro", "bf16", "9,848", "85,888", "11.5%"),
])
def test_plan_kv_prints_the_published_numbers(name, dtype, per_token, v32, ratio):
    ref = SHARED_REFERENCE / f"{name}.config.json"
    out = _plan(str(ref) if ref.exists() else name, dtype)
    line = next(l for l in out.splitlines() if l.startswith("bytes per context token")).split()
    assert line[-2:] == [per_token, v32]
    assert next(l for l in out.splitlines() if l.startswith("ratio to V3.2")).split()[-2] == ratio


def test_pool_bytes_equal_hand_arithmetic():
    """v4-tiny: d 128 (rope 32), dI 64, window 128, layers SWA, CSA/4, HCA/128, CSA/4."""
    cfg = load_preset("v4-tiny")
    blocks, slots = 5, 3
    # fp8: main entry 96 e4m3 + 32 bf16 (64 B) + 2 scales = 162 -> 168 B; indexer key 64 + 4 = 68 B.
    # per 256-token block: 2 CSA layers x 64 x (168 + 68) + 1 HCA layer x 2 x 168
    # per slot: 4 window rings x 128 x 168; CSA rings 8 rows x (kv+gate) x 256 x 4 B + indexer 8 x 2 x 128 x 4 B;
    # HCA ring 128 rows x 2 x 128 x 4 B.
    hand = {
        "fp8": blocks * (2 * 64 * (168 + 68) + 2 * 168) + slots * (4 * 128 * 168 + 2 * (8 * 2 * 256 * 4 + 8 * 2 * 128 * 4)
                                                             + 128 * 2 * 128 * 4),
        "bf16": blocks * (2 * 64 * (256 + 128) + 2 * 256) + slots * (4 * 128 * 256 + 2 * (8 * 2 * 256 * 4 + 8 * 2 * 128 * 4)
                                                                + 128 * 2 * 128 * 4),
        "fp32": blocks * (2 * 64 * (512 + 256) + 2 * 512) + slots * (4 * 128 * 512 + 2 * (8 * 2 * 256 * 4 + 8 * 2 * 128 * 4)
                                                                + 128 * 2 * 128 * 4),
    }
    for fmt, want in hand.items():
        kb = kv_bytes(cfg, fmt)
        assert blocks * kb.per_block + slots * kb.fixed_per_seq == want
        cache = PagedKVCache(cfg, blocks, slots, kv_format=fmt)  # plus one scratch block and slot (decode padding)
        assert cache.nbytes == want + kb.per_block + kb.fixed_per_seq, fmt
        # bytes per cached token: per block / 256 tokens = 2 * (main + idx) / 4 + main / 128
        main, idx = {"fp8": (168, 68), "bf16": (256, 128), "fp32": (512, 256)}[fmt]
        assert kb.per_token == 2 * (main + idx) / 4 + main / 128


def test_fp8_entry_roundtrip():
    x = torch.randn(50, 512) * torch.logspace(-2, 1, 512)
    y = unpack_main(pack_main(x, 64), 512, 64, torch.float32)
    assert pack_main(x, 64).shape == (50, 584)
    assert torch.equal(y[:, 448:], x[:, 448:].bfloat16().float())          # rope dims stay bf16
    blocks = x[:, :448].view(50, 7, 64).abs().amax(-1, keepdim=True)
    assert ((y[:, :448] - x[:, :448]).view(50, 7, 64).abs() <= blocks * 2 ** -3).all()  # e4m3: 3 mantissa bits
    k = torch.randn(30, 128)
    assert pack_index(k).shape == (30, 132)
    assert ((unpack_index(pack_index(k), torch.float32) - k).abs() <= k.abs().amax(-1, keepdim=True) * 2 ** -3).all()


def test_fp8_kv_decodes_close_to_bf16(tiny_ckpt):
    model = load_model(tiny_ckpt("v4-tiny", dtype="bf16", confident=True), torch.bfloat16)
    ids, prefill = parity_prompt(300), 260
    out = {}
    for fmt in ("bf16", "fp8"):  # a prefill, then decode steps that read the packed window ring and entries
        cache = PagedKVCache(model.cfg, 2, 1, dtype=torch.bfloat16, kv_format=fmt)
        seq = cache.allocate(300)
        logits = [model.step(ids[:prefill], StepBatch.build(cache, [seq], [prefill]), torch.arange(prefill))]
        for t in ids[prefill:]:
            logits.append(model.step(t[None], StepBatch.build(cache, [seq], [1])))
        out[fmt] = torch.cat(logits)
    assert (out["fp8"].argmax(-1) == out["bf16"].argmax(-1)).float().mean() >= 0.95
    assert rel_err(out["fp8"], out["bf16"]).mean() < 0.05


def test_capacity_matches_admission():
    cfg = load_preset("v4-tiny")
    kb = kv_bytes(cfg, "bf16")
    budget = 3 * kb.fixed_per_seq + 7 * kb.per_block
    cap = capacity(cfg, budget, "bf16", seq_len=600)  # 600 tokens = 3 blocks
    assert cap.max_seqs == budget // (3 * kb.per_block + kb.fixed_per_seq) == 2
    scratch = kb.fixed_per_seq + kb.per_block  # the cache's scratch slot and block (decode padding writes there)
    cache = PagedKVCache.from_budget(cfg, budget + scratch, max_seqs=3, dtype=torch.bfloat16)
    assert cache.blocks.num == 7 and cache.nbytes <= budget + scratch
    seqs = [cache.allocate(600), cache.allocate(600)]
    assert not cache.can_allocate(600) and cache.can_allocate(256)
    with pytest.raises(CacheFullError):
        cache.allocate(600)
    assert cache.blocks.num_free == 1 and cache.slots.num_free == 1  # the refused request took nothing
    for s in seqs:
        cache.free(s)
    with pytest.raises(ValueError, match="fixed state"):
        PagedKVCache.from_budget(cfg, kb.fixed_per_seq, max_seqs=2)


def test_mixed_workload_returns_every_block(tiny_ckpt):
    model = load_model(tiny_ckpt("v4-tiny-pro"), torch.float32)
    cache = PagedKVCache(model.cfg, num_blocks=12, num_slots=4, block_size=256)
    rng = random.Random(0)
    live, finished = {}, 0
    for step in range(40):
        if len(live) < 4 and rng.random() < 0.5:
            n = rng.randint(1, 300)
            if cache.can_allocate(n + 20):
                seq = cache.allocate(n)
                model.step(parity_prompt(n, seed=step), StepBatch.build(cache, [seq], [n]))
                live[id(seq)] = (seq, rng.randint(1, 20))
        if live:
            seqs = [s for s, _ in live.values()]
            for s in seqs:
                cache.append(s, 1)
            model.step(torch.full((len(seqs),), 20), StepBatch.build(cache, seqs, [1] * len(seqs)))
            for key, (s, left) in list(live.items()):
                if left <= 1:
                    cache.free(s)
                    del live[key]
                    finished += 1
                else:
                    live[key] = (s, left - 1)
    for s, _ in live.values():
        cache.free(s)
    assert finished >= 3
    assert cache.blocks.num_free == 12 and cache.slots.num_free == 4
