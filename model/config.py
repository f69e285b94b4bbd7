"""DeepSeek-V4 model configuration: read HF `config.json` (both forms), derive the layer schedule, validate.

Two spellings of the attention schedule exist in the wild (docs/v4_model.md §1.2):

* the real checkpoints' `compress_ratios`: one int per layer (plus one per MTP layer), 0 = sliding window
  only, 4 = CSA (compressed sparse attention, with the Lightning Indexer), 128 = HCA (heavily compressed);
* transformers' `layer_types` (`sliding_attention` / `compressed_sparse_attention` /
  `heavily_compressed_attention`) plus `compress_rates` {type: rate}, which allows other rates (tiny models).

`V4Config` keeps one normalised form: `layer_types` and `compress_ratios` per decoder layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SWA, CSA, HCA)
_OFFICIAL_RATIO_TO_TYPE = {0: SWA, 4: CSA, 128: HCA}
EXPERT_DTYPES = ("bf16", "fp8", "fp4")


class ConfigError(ValueError):
    """A config field is missing or invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE extension, applied only to layers with a compressor (docs/v4_model.md §2.2)."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class V4Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    layer_types: tuple[str, ...]
    compress_ratios: tuple[int, ...]  # per decoder layer; 0 for sliding-window-only layers
    rope_theta: float
    compress_rope_theta: float
    yarn: YarnScaling | None
    max_position_embeddings: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_hash_layers: int
    routed_scaling_factor: float
    swiglu_limit: float
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    num_nextn_predict_layers: int = 0
    norm_topk_prob: bool = True
    scoring_func: str = "sqrtsoftplus"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # Checkpoint storage format: FP8 e4m3 with ue8m0 128x128 block scales for dense linears (or none),
    # and the routed experts' dtype ("fp4" = e2m1 packed two per byte with per-32 ue8m0 scales).
    weight_quant: str | None = None
    expert_dtype: str = "bf16"
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived schedule -------------------------------------------------------------------------------
    @property
    def compress_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t != SWA]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def schedule(self) -> str:
        """Compact human-readable schedule, e.g. 'SWA SWA CSA/4 HCA/128 ...' with hash layers marked '#'."""
        short = {SWA: "SWA", CSA: "CSA", HCA: "HCA"}
        out = []
        for i, (t, r) in enumerate(zip(self.layer_types, self.compress_ratios)):
            s = short[t] + (f"/{r}" if r else "")
            out.append(s + ("#" if self.is_hash_layer(i) else ""))
        return " ".join(out)

    # ---- (de)serialisation ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "") -> "V4Config":
        return _from_hf_dict(d, name)

    @classmethod
    def from_file(cls, path: str | Path) -> "V4Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}: pass a checkpoint directory or a config.json file")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return _from_hf_dict(d, name=str(path.parent if path.name == "config.json" else path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` this checkpoint ships: loadable by transformers and by this project.

        Writes transformers' `layer_types` + `compress_rates` (which allow any rate) and, when every rate is
        an official one (0/4/128), also the official `compress_ratios` list (with the MTP entries).
        """
        rates = {}
        for t, r in zip(self.layer_types, self.compress_ratios):
            if t != SWA:
                if rates.setdefault(t, r) != r:
                    raise ConfigError(
                        f"layer_types: all {t} layers must share one rate to be written as a HF config "
                        f"(found {rates[t]} and {r})")
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "compress_rates": {CSA: rates.get(CSA, 4), HCA: rates.get(HCA, 128)},
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hash_layers": self.num_hash_layers,
            "scoring_func": self.scoring_func,
            "topk_method": "noaux_tc",
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "swiglu_limit": self.swiglu_limit,
            "hidden_act": "silu",
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.rms_norm_eps,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
            "attention_bias": False,
        }
        if all(r in _OFFICIAL_RATIO_TO_TYPE for r in self.compress_ratios):
            d["compress_ratios"] = list(self.compress_ratios) + [0] * self.num_nextn_predict_layers
        if self.yarn is not None:
            d["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.yarn)}
        if self.weight_quant == "fp8":
            d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                        "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
            if self.expert_dtype == "fp4":
                d["expert_dtype"] = "fp4"
        return d

    def replace(self, **changes) -> "V4Config":
        new = dataclasses.replace(self, **changes)
        _validate(new)
        return new


# ---- parsing -------------------------------------------------------------------------------------------

def _req(d: dict, key: str, typ=int):
    if key not in d or d[key] is None:
        raise ConfigError(f"config field '{key}' is missing: DeepSeek-V4 configs must set it")
    v = d[key]
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise ConfigError(f"config field '{key}' must be an integer, got {v!r}")
    if typ is float and not isinstance(v, (int, float)):
        raise ConfigError(f"config field '{key}' must be a number, got {v!r}")
    return typ(v)


def _schedule(d: dict, n_layers: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    layer_types = d.get("layer_types")
    ratios = d.get("compress_ratios")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) < n_layers:
            raise ConfigError(f"config field 'layer_types' must list one type per layer ({n_layers}), "
                              f"got {layer_types!r}")
        layer_types = list(layer_types[:n_layers])
        bad = [t for t in layer_types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"config field 'layer_types' has unknown entries {bad}; allowed: {LAYER_TYPES}")
        rates = {CSA: 4, HCA: 128, **(d.get("compress_rates") or {})}
        for key, t in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
            if d.get(key) is not None:
                rates[t] = d[key]
        derived = [0 if t == SWA else int(rates[t]) for t in layer_types]
        if ratios is not None and list(ratios[:n_layers]) != derived:
            raise ConfigError(f"config fields 'compress_ratios' {list(ratios[:n_layers])} and 'layer_types' + "
                              f"'compress_rates' {derived} disagree: keep one of them")
        return tuple(layer_types), tuple(derived)
    if ratios is None:
        raise ConfigError("config needs 'compress_ratios' (one entry per layer: 0 = sliding window, 4 = CSA, "
                          "128 = HCA) or 'layer_types' + 'compress_rates'; transformers' default schedule does "
                          "not match the real checkpoints, so v4ray never guesses it")
    if not isinstance(ratios, list) or len(ratios) < n_layers:
        raise ConfigError(f"config field 'compress_ratios' must have at least num_hidden_layers={n_layers} "
                          f"entries (the real checkpoints add one per MTP layer), got {ratios!r}")
    bad = [r for r in ratios[:n_layers] if r not in _OFFICIAL_RATIO_TO_TYPE]
    if bad:
        raise ConfigError(f"config field 'compress_ratios' holds {bad}; the official form allows only 0, 4 and "
                          f"128 — for other rates use 'layer_types' + 'compress_rates'")
    return tuple(_OFFICIAL_RATIO_TO_TYPE[r] for r in ratios[:n_layers]), tuple(int(r) for r in ratios[:n_layers])


def _rope(d: dict) -> tuple[float, float, YarnScaling | None]:
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("compress"), dict):  # transformers' nested form
        main, comp = rp.get("main") or {}, rp["compress"]
        theta = float(main.get("rope_theta", d.get("rope_theta", 10000.0)))
        ctheta = float(comp.get("rope_theta", d.get("compress_rope_theta", 160000.0)))
        scaling = comp if comp.get("rope_type", comp.get("type")) == "yarn" else None
    else:
        theta = float(d.get("rope_theta", 10000.0))
        ctheta = float(d.get("compress_rope_theta", 160000.0))
        scaling = d.get("rope_scaling") or (rp if isinstance(rp, dict) else None)
        if scaling and scaling.get("rope_type", scaling.get("type")) != "yarn":
            raise ConfigError(f"config field 'rope_scaling' must be of type 'yarn' for DeepSeek-V4, got {scaling!r}")
    yarn = None
    if scaling:
        if scaling.get("attention_factor") not in (None, 1.0, 1):
            raise ConfigError("config field 'rope_scaling.attention_factor' must be 1.0: V4 applies no YaRN mscale")
        yarn = YarnScaling(
            factor=float(scaling.get("factor", 16.0)),
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 65536)),
            beta_fast=float(scaling.get("beta_fast") or 32.0),
            beta_slow=float(scaling.get("beta_slow") or 1.0))
    return theta, ctheta, yarn


def _from_hf_dict(d: dict[str, Any], name: str = "") -> V4Config:
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
    mt = d.get("model_type")
    if mt != "deepseek_v4":
        raise ConfigError(f"config field 'model_type' is {mt!r}; v4ray serves only 'deepseek_v4' checkpoints")
    n = _req(d, "num_hidden_layers")
    layer_types, ratios = _schedule(d, n)
    head_dim = _req(d, "head_dim")
    if d.get("qk_rope_head_dim") is not None:
        rope_dim = _req(d, "qk_rope_head_dim")
    elif d.get("partial_rotary_factor") is not None:
        rope_dim = int(head_dim * float(d["partial_rotary_factor"]))
    else:
        rope_dim = 64
    theta, ctheta, yarn = _rope(d)
    if "num_hash_layers" in d:
        n_hash = _req(d, "num_hash_layers")
    elif d.get("mlp_layer_types") is not None:
        mlt = list(d["mlp_layer_types"])[:n]
        n_hash = sum(1 for t in mlt if t == "hash_moe")
        if mlt[:n_hash] != ["hash_moe"] * n_hash:
            raise ConfigError("config field 'mlp_layer_types': hash_moe layers must come first")
    else:
        n_hash = 3
    qc = d.get("quantization_config") or {}
    weight_quant = None
    if qc:
        if qc.get("quant_method") != "fp8" or qc.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"config field 'quantization_config' {qc!r} is not supported: v4ray reads FP8 e4m3 "
                              f"checkpoints with ue8m0 128x128 block scales")
        if list(qc.get("weight_block_size", [128, 128])) != [128, 128]:
            raise ConfigError("config field 'quantization_config.weight_block_size' must be [128, 128]")
        weight_quant = "fp8"
    expert_dtype = d.get("expert_dtype") or qc.get("expert_dtype") or ("fp8" if weight_quant else "bf16")
    if expert_dtype not in EXPERT_DTYPES:
        raise ConfigError(f"config field 'expert_dtype' is {expert_dtype!r}; allowed: {EXPERT_DTYPES}")
    eos = d.get("eos_token_id", 1)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if int(d.get("num_key_value_heads", 1)) != 1:
        raise ConfigError("config field 'num_key_value_heads' must be 1: V4 attention is shared-KV MQA")
    if d.get("tie_word_embeddings"):
        raise ConfigError("config field 'tie_word_embeddings' must be false for DeepSeek-V4")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config field 'hidden_act' must be 'silu', got {d.get('hidden_act')!r}")
    cfg = V4Config(
        vocab_size=_req(d, "vocab_size"), hidden_size=_req(d, "hidden_size"), num_hidden_layers=n,
        num_attention_heads=_req(d, "num_attention_heads"), head_dim=head_dim, qk_rope_head_dim=rope_dim,
        q_lora_rank=_req(d, "q_lora_rank"), o_groups=_req(d, "o_groups"), o_lora_rank=_req(d, "o_lora_rank"),
        sliding_window=_req(d, "sliding_window"), layer_types=layer_types, compress_ratios=ratios,
        rope_theta=theta, compress_rope_theta=ctheta, yarn=yarn,
        max_position_embeddings=int(d.get("max_position_embeddings", 1048576)),
        index_n_heads=_req(d, "index_n_heads"), index_head_dim=_req(d, "index_head_dim"),
        index_topk=_req(d, "index_topk"), n_routed_experts=_req(d, "n_routed_experts"),
        n_shared_experts=int(d.get("n_shared_experts", 1)), num_experts_per_tok=_req(d, "num_experts_per_tok"),
        moe_intermediate_size=_req(d, "moe_intermediate_size"), num_hash_layers=n_hash,
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        swiglu_limit=float(d.get("swiglu_limit", 10.0)), hc_mult=_req(d, "hc_mult"),
        hc_sinkhorn_iters=int(d.get("hc_sinkhorn_iters", 20)), hc_eps=float(d.get("hc_eps", 1e-6)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        num_nextn_predict_layers=int(d.get("num_nextn_predict_layers", 0)),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)), scoring_func=d.get("scoring_func", "sqrtsoftplus"),
        bos_token_id=d.get("bos_token_id", 0), eos_token_id=eos,
        weight_quant=weight_quant, expert_dtype=expert_dtype, name=name, extra=dict(d))
    _validate(cfg)
    return cfg


def _validate(c: V4Config) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
              "o_groups", "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
              "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "hc_mult"):
        need(getattr(c, f) > 0, f"config field '{f}' must be positive, got {getattr(c, f)}")
    need(c.qk_rope_head_dim % 2 == 0 and 0 < c.qk_rope_head_dim <= c.head_dim,
         f"config field 'qk_rope_head_dim' ({c.qk_rope_head_dim}) must be even and at most head_dim ({c.head_dim})")
    need(c.qk_rope_head_dim <= c.index_head_dim,
         f"config field 'index_head_dim' ({c.index_head_dim}) must be at least qk_rope_head_dim "
         f"({c.qk_rope_head_dim}): the indexer ropes its last qk_rope_head_dim dims")
    need(c.num_attention_heads % c.o_groups == 0,
         f"config field 'o_groups' ({c.o_groups}) must divide num_attention_heads ({c.num_attention_heads})")
    need(c.num_experts_per_tok <= c.n_routed_experts,
         f"config field 'num_experts_per_tok' ({c.num_experts_per_tok}) exceeds n_routed_experts "
         f"({c.n_routed_experts})")
    need(0 <= c.num_hash_layers <= c.num_hidden_layers,
         f"config field 'num_hash_layers' ({c.num_hash_layers}) must be within [0, num_hidden_layers]")
    need(c.n_shared_experts == 1, f"config field 'n_shared_experts' must be 1, got {c.n_shared_experts}")
    need(c.scoring_func == "sqrtsoftplus",
         f"config field 'scoring_func' is {c.scoring_func!r}; DeepSeek-V4 routes with 'sqrtsoftplus'")
    need(c.hc_sinkhorn_iters >= 1, f"config field 'hc_sinkhorn_iters' must be >= 1, got {c.hc_sinkhorn_iters}")
    need(len(c.layer_types) == c.num_hidden_layers == len(c.compress_ratios),
         "config: one layer type and compress ratio per layer")
    for i, (t, r) in enumerate(zip(c.layer_types, c.compress_ratios)):
        need((t == SWA) == (r == 0), f"config: layer {i} is {t} with compress ratio {r}")
        need(r >= 0, f"config: layer {i} has negative compress ratio {r}")
    for t, r in zip(c.layer_types, c.compress_ratios):
        if t == CSA:
            need(r >= 2, f"config field 'compress_rates': the CSA rate must be at least 2, got {r}")
    need(c.expert_dtype in EXPERT_DTYPES, f"config field 'expert_dtype' must be one of {EXPERT_DTYPES}")


# ---- presets -------------------------------------------------------------------------------------------

def preset_names() -> list[str]:
    files = resources.files("v4ray.model").joinpath("presets")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))


def preset_dict(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(names)}")
    return json.loads(resources.files("v4ray.model").joinpath("presets", f"{name}.json").read_text())


def load_preset(name: str) -> V4Config:
    return _from_hf_dict(preset_dict(name), name=name)


def resolve_config(model: str | Path) -> V4Config:
    """A preset name, a checkpoint directory, or a config.json path -> V4Config."""
    p = Path(model)
    if p.exists():
        return V4Config.from_file(p)
    if str(model) in preset_names():
        return load_preset(str(model))
    raise ConfigError(f"{model!r} is neither a checkpoint directory, a config.json, nor a preset "
                      f"({', '.join(preset_names())})")


def yarn_inv_freq(rope_dim: int, theta: float, yarn: YarnScaling | None):
    """Inverse frequencies of V4's interleaved RoPE; YaRN-blended when `yarn` is given (no mscale)."""
    import torch

    pos_freqs = theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    if yarn is None:
        return 1.0 / pos_freqs

    def corr_dim(rotations: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low = max(math.floor(corr_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(corr_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 -> original frequency (fast dims), 0 -> interpolated by `factor` (slow dims)
    return (1.0 / (yarn.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
