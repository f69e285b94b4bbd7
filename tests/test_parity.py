"""The V4 forward against transformers' independent DeepseekV4ForCausalLM (fp32, same checkpoint files)."""

from __future__ import annotations

import pytest
import torch

import v4ray.model.v4 as v4
from v4ray.model.config import CSA, HCA, SWA
from v4ray.model.loader import load_model

from conftest import PARITY_PRESETS, PARITY_PROMPT_LEN, load_reference, parity_prompt, reference_logits, rel_err

# fp32 parity bound (the acceptance): max|Δ| / max|ref| per position. Both sides compute the same math
# in fp32 with different summation orders; observed errors are ~1e-6.
PARITY_RTOL = 1e-4
# A greedy divergence counts only at a genuine tie: the reference's top-2 logit gap below this.
TIE_GAP = 1e-3
# A mutation must move the logits at least this far (100x the parity bound) to prove the check sensitive.
MUTATION_MIN = 100 * PARITY_RTOL


def test_parity_suite_covers_the_architecture():
    """Together the parity configs cover every layer type, hash and routed MoE, several rates, hc 2 and 4."""
    from v4ray.model.config import load_preset

    cfgs = [load_preset(p) for p in PARITY_PRESETS]
    kinds = {t for c in cfgs for t in c.layer_types}
    assert kinds == {SWA, CSA, HCA}
    assert {c.hc_mult for c in cfgs} >= {2, 4}
    assert any(c.num_hash_layers > 0 for c in cfgs)
    assert any(c.num_hash_layers < c.num_hidden_layers for c in cfgs)
    rates = {(t, r) for c in cfgs for t, r in zip(c.layer_types, c.compress_ratios) if t != SWA}
    assert len({r for t, r in rates if t == CSA}) >= 2 and len({r for t, r in rates if t == HCA}) >= 3
    for c in cfgs:  # every compressed layer closes several windows within the parity prompt
        for t, r in zip(c.layer_types, c.compress_ratios):
            if t != SWA:
                assert PARITY_PROMPT_LEN // r >= 2
            if t == CSA:  # index_topk below the visible entries
                assert PARITY_PROMPT_LEN // r > c.index_topk


@pytest.fixture
def indexer_spy(monkeypatch):
    """Records (indices, selectable counts) of every indexer call; the real function still computes them."""
    calls = []
    real = v4.indexer_topk

    def spy(q, keys, weights, lo, hi, topk):
        idx = real(q, keys, weights, lo, hi, topk)
        calls.append((idx, hi - lo))
        return idx

    monkeypatch.setattr(v4, "indexer_topk", spy)
    return calls


@pytest.mark.parametrize("preset", PARITY_PRESETS)
def test_prefill_logits_match_transformers(tiny_ckpt, preset, indexer_spy):
    ckpt = tiny_ckpt(preset)
    ids = parity_prompt()
    model = load_model(ckpt, torch.float32)
    ours = model(ids)
    ref = reference_logits(load_reference(ckpt), ids)
    err = rel_err(ours, ref)
    assert err.max() <= PARITY_RTOL, f"{preset}: worst position {int(err.argmax())} rel err {float(err.max()):.2e}"
    cfg = model.cfg
    if CSA in cfg.layer_types:  # the indexer really pruned visible entries for late queries
        assert indexer_spy, "CSA layers must call the indexer"
        for idx, visible in indexer_spy:
            kept = (idx >= 0).sum(-1)
            assert (kept == visible.clamp(max=cfg.index_topk)).all()
            assert (visible > kept).any()


@pytest.mark.parametrize("preset", ["v4-tiny", "v4-tiny-pro"])
def test_greedy_matches_transformers_full_recomputation(tiny_ckpt, preset):
    from v4ray import LLM, SamplingParams

    ckpt = tiny_ckpt(preset)
    prompt = parity_prompt(200, seed=3).tolist()
    llm = LLM(model=ckpt, dtype="float32")
    ours = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    ours = ours[0].outputs[0].token_ids
    assert len(ours) == 32
    ref = load_reference(ckpt)
    seq = list(prompt)
    for step, token in enumerate(ours):
        logits = reference_logits(ref, torch.tensor(seq))[-1]
        top2 = logits.topk(2)
        want = int(top2.indices[0])
        if token != want:
            gap = float(top2.values[0] - top2.values[1])
            assert gap < TIE_GAP and token in top2.indices.tolist(), \
                f"step {step}: v4ray {token} vs transformers {want} with top-2 gap {gap:.2e}"
            break  # after a genuine tie the continuations legitimately differ
        seq.append(token)


MUTATIONS = {
    "attn_sink": lambda name: name.endswith("attn_sink"),
    "correction_bias": lambda name: name.endswith("gate.bias"),
    "tid2eid": lambda name: name.endswith("tid2eid"),
    "position_bias": lambda name: name.endswith(".ape"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutations_move_logits_far_beyond_tolerance(tiny_ckpt, mutation):
    ckpt = tiny_ckpt("v4-tiny")
    ids = parity_prompt()
    base = load_model(ckpt, torch.float32)(ids)
    model = load_model(ckpt, torch.float32)
    hit = 0
    for name, buf in list(model.named_buffers()):
        if MUTATIONS[mutation](name):
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = torch.zeros_like(buf)
            hit += 1
    assert hit, f"{mutation}: the tiny model has no such tensor"
    assert rel_err(model(ids), base).max() > MUTATION_MIN


def test_a_csa_prefill_group_skips_the_indexer_only_where_it_would_keep_every_entry(tiny_ckpt):
    """`Attention._attend_cached` attends a CSA prefill group as an HCA one (every visible entry) when no query sees
    more entries than the indexer keeps (`EntryLayout.most` <= index_topk): the indexer's bias is then exactly the
    all-visible one. With one query seeing more, the indexer drops entries and the bias differs."""
    model = load_model(tiny_ckpt("v4-tiny"), torch.float32)
    attn = next(b.attn for b in model.layers if b.attn.indexer is not None)
    c, k = model.cfg, model.cfg.index_topk
    g = torch.Generator().manual_seed(3)
    T, E = 12, 3 * k
    u, c_q = torch.randn(T, c.hidden_size, generator=g), torch.randn(T, c.q_lora_rank, generator=g)
    keys = torch.randn(E, c.index_head_dim, generator=g)
    positions = torch.arange(T) * 7
    lo = torch.randint(0, E - k - 3, (T,), generator=g)   # every [lo, hi) inside the E entries
    for most in (k, k + 3):
        hi = lo + torch.randint(1, k + 1, (T,), generator=g)
        hi[0] = lo[0] + most
        visible = torch.arange(E)[None, :]
        all_visible = torch.zeros(T, E).masked_fill((visible < lo[:, None]) | (visible >= hi[:, None]), float("-inf"))
        bias = attn.indexer_bias(keys, u, c_q, *v4.rope_cos_sin(positions, attn.inv_freq), lo, hi)
        assert torch.equal(bias, all_visible) == (most <= k), most
