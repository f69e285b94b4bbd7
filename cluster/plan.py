"""Planning arithmetic for users: `v4ray plan kv` (KV bytes per token and per sequence, against V3.2)."""

from __future__ import annotations

from v4ray.model.config import CSA, HCA, SWA, V4Config
from v4ray.model.kv_format import kv_bytes, v32_bytes_per_token


def plan_kv(cfg: V4Config, context: int, fmt: str, block_size: int | None = None) -> dict:
    """KV-cache arithmetic of one model at one context length, side by side with DeepSeek-V3.2."""
    if context < 1:
        raise ValueError(f"context must be >= 1 token, got {context}")
    kb = kv_bytes(cfg, fmt, block_size)
    v32 = v32_bytes_per_token(fmt)
    per_token = round(kb.per_token)
    return {
        "model": cfg.name,
        "layers": {"total": cfg.num_hidden_layers, "swa": cfg.layer_types.count(SWA),
                   "csa": cfg.layer_types.count(CSA), "hca": cfg.layer_types.count(HCA)},
        "kv_dtype": fmt,
        "block_size": kb.block_size,
        "context": context,
        "bytes_per_token": per_token,
        "bytes_per_token_exact": kb.per_token,
        "fixed_bytes_per_sequence": kb.fixed_per_seq,
        "swa_ring_bytes_per_sequence": kb.swa_per_seq,
        "compressor_state_bytes_per_sequence": kb.compressor_state_per_seq,
        "sequence_bytes": kb.sequence_bytes(context),
        "v32_bytes_per_token": v32,
        "v32_sequence_bytes": v32 * context,
        "ratio_to_v32": kb.per_token / v32,
    }


def format_plan_kv(p: dict) -> str:
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"
    L = p["layers"]
    rows = [
        f"model {p['model']}: {L['total']} layers ({L['swa']} SWA, {L['csa']} CSA, {L['hca']} HCA), "
        f"KV dtype {p['kv_dtype']}, {p['block_size']}-token blocks",
        f"{'':34}{'V4 (this model)':>20}{'DeepSeek-V3.2':>20}",
        f"{'bytes per context token':34}{p['bytes_per_token']:>20,}{p['v32_bytes_per_token']:>20,}",
        f"{'ratio to V3.2':34}{p['ratio_to_v32'] * 100:>19.1f}%{'100.0%':>20}",
        f"{'fixed bytes per sequence':34}{p['fixed_bytes_per_sequence']:>20,}{0:>20,}",
        f"{'  sliding-window rings':34}{p['swa_ring_bytes_per_sequence']:>20,}",
        f"{'  compressor state (fp32)':34}{p['compressor_state_bytes_per_sequence']:>20,}",
        f"{'one sequence of ' + format(p['context'], ',') + ' tokens':34}{p['sequence_bytes']:>20,}"
        f"{p['v32_sequence_bytes']:>20,}",
        f"{'':34}{gib(p['sequence_bytes']):>20}{gib(p['v32_sequence_bytes']):>20}",
    ]
    return "\n".join(rows)
