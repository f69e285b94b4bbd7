"""Config parsing: both schedule spellings, presets equal the real configs, validation errors name the field."""

from __future__ import annotations

import json

import pytest

from v4ray.model.config import CSA, HCA, SWA, ConfigError, V4Config, load_preset, preset_dict

from conftest import SHARED_REFERENCE


@pytest.mark.parametrize("name", ["deepseek-v4-flash", "deepseek-v4-pro"])
def test_presets_equal_shared_reference(name):
    ref = SHARED_REFERENCE / f"{name}.config.json"
    if not ref.exists():
        pytest.skip(f"{ref} is absent on this machine (the presets ship in the package)")
    assert preset_dict(name) == json.loads(ref.read_text())


def test_real_schedules():
    flash, pro = load_preset("deepseek-v4-flash"), load_preset("deepseek-v4-pro")
    assert [flash.layer_types.count(t) for t in (SWA, CSA, HCA)] == [2, 21, 20]
    assert [pro.layer_types.count(t) for t in (SWA, CSA, HCA)] == [0, 30, 31]
    assert flash.layer_types[:4] == (SWA, SWA, CSA, HCA) and pro.layer_types[:3] == (HCA, HCA, CSA)
    assert flash.num_hash_layers == pro.num_hash_layers == 3
    assert flash.expert_dtype == "fp4" and flash.weight_quant == "fp8"
    assert flash.yarn.factor == 16 and flash.compress_rope_theta == 160000


@pytest.mark.parametrize("name", ["deepseek-v4-flash", "deepseek-v4-pro", "v4-tiny", "v4-tiny-rates", "v4-tiny-pro"])
def test_transformers_reads_the_same_schedule(name):
    """What we write is what transformers derives (it must never fall back to its default layer_types)."""
    from transformers import DeepseekV4Config

    cfg = load_preset(name)
    tf = DeepseekV4Config(**cfg.to_hf_dict())
    assert tuple(tf.layer_types) == cfg.layer_types
    assert [tf.compress_rates.get(t, 0) for t in tf.layer_types] == list(cfg.compress_ratios)
    assert tf.mlp_layer_types.count("hash_moe") == cfg.num_hash_layers
    assert tf.qk_rope_head_dim == cfg.qk_rope_head_dim
    assert V4Config.from_dict(cfg.to_hf_dict()) == cfg.replace(name="")


def test_transformers_saved_form_parses(tmp_path):
    from transformers import DeepseekV4Config

    cfg = load_preset("v4-tiny-rates")
    DeepseekV4Config(**cfg.to_hf_dict()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved and "compress_ratios" not in saved
    assert V4Config.from_file(tmp_path).replace(name="") == cfg.replace(name="")


BAD = [
    ({"model_type": "llama"}, "'model_type' is 'llama'"),
    ({"hidden_size": None}, "'hidden_size' is missing"),
    ({"compress_ratios": [0, 4, 64, 4, 0], "layer_types": None}, "allows only 0, 4 and 128"),
    ({"compress_ratios": [0, 4], "layer_types": None}, "at least num_hidden_layers=4"),
    ({"layer_types": ["sliding_attention"] * 3 + ["dense"]}, "unknown entries \\['dense'\\]"),
    ({"o_groups": 3}, "'o_groups' \\(3\\) must divide"),
    ({"num_experts_per_tok": 9}, "'num_experts_per_tok' \\(9\\) exceeds"),
    ({"scoring_func": "softmax"}, "'scoring_func'"),
    ({"qk_rope_head_dim": 7}, "'qk_rope_head_dim' \\(7\\) must be even"),
    ({"num_key_value_heads": 2}, "'num_key_value_heads' must be 1"),
    ({"hidden_size": "big"}, "'hidden_size' must be an integer"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_invalid_configs_name_the_field(change, message):
    d = load_preset("v4-tiny").to_hf_dict()
    d.pop("layer_types")  # the official form: compress_ratios alone
    d.update(change)
    if d.get("layer_types") is None:
        d.pop("layer_types", None)
    with pytest.raises(ConfigError, match=message):
        V4Config.from_dict(d)


def test_missing_schedule_is_refused():
    d = load_preset("v4-tiny").to_hf_dict()
    d.pop("layer_types"), d.pop("compress_ratios")
    with pytest.raises(ConfigError, match="never guesses"):
        V4Config.from_dict(d)
