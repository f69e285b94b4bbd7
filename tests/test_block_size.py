"""The default KV block size follows the config: the smallest multiple of lcm(128, every compression rate) that
is >= 256. A config with an HCA rate of 24 (valid in transformers) loads with the default and matches it."""

from __future__ import annotations

import pytest
import torch

from v4ray.model.config import HCA, V4Config, load_preset
from v4ray.model.kv_format import default_block_size

from conftest import load_reference, parity_prompt, reference_logits, rel_err
from test_parity import PARITY_RTOL, TIE_GAP


def _with_hca_rate(rate: int) -> V4Config:
    d = load_preset("v4-tiny").to_hf_dict()
    d.pop("compress_ratios")
    d["compress_rates"] = {**d["compress_rates"], HCA: rate}
    return V4Config.from_dict(d, name=f"v4-tiny-hca{rate}")


@pytest.mark.parametrize("rates, want", [((4, 128), 256), ((4, 24), 384), ((8, 32), 256), ((4, 96), 384),
                                          ((16, 4), 256), ((), 256)])
def test_default_block_size_rule(rates, want):
    cfg = load_preset("v4-tiny")
    layers = tuple(rates) or (0,)
    cfg = V4Config(**{**cfg.__dict__, "num_hidden_layers": len(layers), "compress_ratios": layers,
                      "layer_types": tuple("sliding_attention" if r == 0 else "compressed_sparse_attention"
                                           for r in layers)})
    assert default_block_size(cfg) == want


@pytest.fixture(scope="module")
def hca24_ckpt(tmp_path_factory):
    from v4ray.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("hca24"), cfg=_with_hca_rate(24), dtype="fp32", seed=3)


def test_rates_4_and_24_load_with_the_default_block_size_and_match_transformers(hca24_ckpt):
    from v4ray import LLM, SamplingParams

    llm = LLM(model=hca24_ckpt, dtype="float32")
    assert sorted(set(llm.config.compress_ratios) - {0}) == [4, 24]
    assert llm.engine.runner.cache.block_size == 384
    ref = load_reference(hca24_ckpt)
    ids = parity_prompt(300, seed=5)
    err = rel_err(llm.model(ids), reference_logits(ref, ids))
    assert err.max() <= PARITY_RTOL
    # incremental decode through the paged cache (entries of rate 24 straddle 256-token boundaries)
    prompt = ids[:260].tolist()
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    seq = list(prompt)
    for token in out[0].outputs[0].token_ids:
        logits = reference_logits(ref, torch.tensor(seq))[-1]
        top2 = logits.topk(2)
        if token != int(top2.indices[0]):
            assert float(top2.values[0] - top2.values[1]) < TIE_GAP and token in top2.indices.tolist()
            break
        seq.append(token)
