"""Tiny random-weight DeepSeek-V4 checkpoints in the official format (`v4ray make-tiny`).

Deterministic from a seed: each tensor draws from its own generator seeded by (seed, tensor name). Values
that a fresh model would leave at zero — `tid2eid`, the routing correction bias, attention sinks, compressor
position biases, mHC biases — are random, so tests exercise those paths. Shards: one file of dense tensors,
then one file per group of routed experts across all layers, so an expert shard can be proven to read only
its own files.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

from v4ray.kernels.quant import quant_fp4, quant_fp8

from .config import V4Config, load_preset
from .v4 import Linear, V4Model, checkpoint_name

DTYPES = ("fp32", "bf16", "fp8", "fp4-experts")
# Linears that DeepSeek stores in FP8 (docs/v4_model.md §5.2); compressor, indexer weights_proj, gate, embed and
# head stay BF16.
_FP8_LINEARS = (".attn.wq_a", ".attn.wq_b", ".attn.wkv", ".attn.wo_a", ".attn.wo_b", ".indexer.wq_b",
                ".shared_experts.w1", ".shared_experts.w2", ".shared_experts.w3")


def _gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _random_tensor(name: str, shape: tuple[int, ...], cfg: V4Config, seed: int) -> torch.Tensor:
    g = _gen(seed, name)

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std + mean

    if name.endswith("tid2eid"):  # distinct experts per token
        return torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                            for _ in range(shape[0])])
    if name.endswith("norm.weight"):
        return normal(0.1, 1.0)
    if name.endswith("attn_sink"):
        return normal(1.0)
    if name.endswith(".ape"):
        return normal(0.5)
    if name.endswith("gate.bias"):
        return normal(0.3)
    if name.endswith(("_base",)):
        return normal(0.5)
    if name.endswith(("_scale",)) and "hc_" in name:
        return torch.rand(shape, generator=g) + 0.5
    if name.endswith("_fn"):
        return normal(0.5 / math.sqrt(shape[1]))
    if name == "embed.weight":
        return normal(1.0)
    if name.endswith((".wo_b.weight", ".w2.weight")):
        # Residual-branch output projections scaled by 1/sqrt(2 L) (GPT-2's init): each sub-layer nudges the
        # residual streams instead of replacing them, as in trained deep networks. Without it a random V4 is
        # chaotic: a 1e-3 relative input perturbation flips ~3 % of greedy tokens.
        return normal(1.0 / math.sqrt(shape[-1] * 2 * cfg.num_hidden_layers))
    return normal(1.0 / math.sqrt(shape[-1]))  # linear weights [out, in]


def tiny_tensor(name: str, shape: tuple[int, ...], cfg: V4Config, seed: int, confident: bool = False) -> torch.Tensor:
    """The value `make_tiny` stores under checkpoint name `name`, before its storage format (see `confident` there).
    Needs only torch, so `bench/gpu_acceptance.py` builds the same model in memory on a machine without safetensors."""
    t = _random_tensor(name, shape, cfg, seed)
    if confident and name == "head.weight":
        embed = _random_tensor("embed.weight", shape, cfg, seed)
        successor = torch.randperm(cfg.vocab_size, generator=_gen(seed, "bigram"))
        t = 0.5 * t + 0.4 * embed[successor] / math.sqrt(cfg.hidden_size)
    return t


def make_tiny(out_dir: str | Path, preset: str = "v4-tiny", dtype: str = "bf16", seed: int = 0,
              experts_per_file: int = 2, cfg: V4Config | None = None, confident: bool = False,
              distinct_experts: int | None = None) -> Path:
    """Write a random V4 checkpoint (config.json, sharded safetensors + index, tokenizer.json) to out_dir.

    confident: give the LM head a bigram component (head row of token j close to the embedding of a fixed
    predecessor of j), so next-token distributions are peaked like a trained model's instead of flat. A flat
    random model's top-2 logit gaps are so small that one bf16 rounding of the final hidden state already
    flips ~1 % of greedy tokens; precision comparisons (bf16 vs fp32) need the peaked variant.

    distinct_experts: routed expert e of a layer stores the values of expert e % distinct_experts (drawn and
    quantized once), so a checkpoint at real dimensions is written in minutes (`bench/load.py`); every expert
    still has its own tensors in the files. None: every expert is drawn on its own.
    """
    from safetensors.torch import save_file

    from .loader import INDEX_FILE
    from .tokenizer import build_byte_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    cfg = cfg or load_preset(preset)
    if dtype in ("fp8", "fp4-experts"):
        cfg = cfg.replace(weight_quant="fp8", expert_dtype="fp4" if dtype == "fp4-experts" else "fp8")
    else:
        cfg = cfg.replace(weight_quant=None, expert_dtype="bf16")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = torch.float32 if dtype == "fp32" else torch.bfloat16
    model = V4Model(cfg)  # meta tensors: names and shapes only
    linear_names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear)}

    shards: dict[str, dict[str, torch.Tensor]] = {}
    drawn: dict[str, dict[str, torch.Tensor]] = {}  # distinct_experts: source name -> its stored tensors
    n_groups = -(-cfg.n_routed_experts // experts_per_file)
    for mod_name, buf in model.state_dict().items():  # persistent buffers: what a checkpoint holds
        if mod_name.endswith(".scale") and mod_name[: -len("scale")] + "weight" in linear_names:
            continue
        name = checkpoint_name(mod_name)
        expert = ".ffn.experts." in name
        group = int(name.split(".ffn.experts.")[1].split(".")[0]) // experts_per_file if expert else -1
        shard = shards.setdefault(f"g{group}", {})
        base = name[: -len(".weight")]
        source = name
        if expert and distinct_experts:
            layer, rest = name.split(".ffn.experts.")
            e, w = rest.split(".", 1)
            source = f"{layer}.ffn.experts.{int(e) % distinct_experts}.{w}"
            if source in drawn:  # an earlier expert's values, stored again under this expert's names
                shard.update({base + sfx: v.clone() for sfx, v in drawn[source].items()})
                continue
        t = tiny_tensor(source, tuple(buf.shape), cfg, seed, confident)
        if mod_name in linear_names and expert and dtype == "fp4-experts":
            shard[name], scale = quant_fp4(t)
            shard[base + ".scale"] = scale.view(torch.float8_e8m0fnu)
        elif mod_name in linear_names and dtype in ("fp8", "fp4-experts") and (expert or base.endswith(_FP8_LINEARS)):
            shard[name], scale = quant_fp8(t)
            shard[base + ".scale"] = scale.view(torch.float8_e8m0fnu)
        elif t.dtype == torch.long:
            shard[name] = t
        elif name.endswith(("_fn", "_base", "_scale", "attn_sink", ".ape", "gate.bias")):
            shard[name] = t.float()
        else:
            shard[name] = t.to(store)
        if expert and distinct_experts:
            drawn[source] = {sfx: shard[base + sfx] for sfx in (".weight", ".scale") if base + sfx in shard}

    order = ["g-1"] + [f"g{i}" for i in range(n_groups)]
    total = len(order)
    weight_map = {}
    for i, key in enumerate(order, 1):
        fname = f"model-{i:05d}-of-{total:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shards[key].items()}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shards[key]})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                             indent=2))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "float32" if dtype == "fp32" else "bfloat16"
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    build_byte_tokenizer(out)
    return out


def expert_files(ckpt_dir: str | Path) -> dict[str, set[int]]:
    """Shard file -> the routed expert ids whose tensors it holds (empty for dense-only files)."""
    from .loader import INDEX_FILE

    wm = json.loads((Path(ckpt_dir) / INDEX_FILE).read_text())["weight_map"]
    out: dict[str, set[int]] = {}
    for name, fname in wm.items():
        ids = out.setdefault(fname, set())
        if ".ffn.experts." in name:
            ids.add(int(name.split(".ffn.experts.")[1].split(".")[0]))
        else:
            ids.add(-1)
    return out
