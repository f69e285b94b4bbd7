"""Building the in-process engine core from an EngineConfig: the one place a dtype string becomes a dtype and the
block size and context limit take their derived defaults. Used by `cluster.build.build_engine` (single-process)
and by every Router of a distributed replica (with its own model, whose routed experts are remote)."""

from __future__ import annotations

from pathlib import Path

import torch

from v4ray.model.config import V4Config
from v4ray.model.kv_format import default_block_size
from v4ray.model.loader import load_model
from v4ray.model.tokenizer import V4Tokenizer

from .config import EngineConfig
from .core import EngineCore
from .runner import ModelRunner

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto": this process's first visible GPU (Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned, so that is
    the actor's own GPU), else the CPU. An explicit "cuda" without a visible GPU is an error that says so."""
    if isinstance(device, torch.device):
        spec = str(device)
    else:
        spec = device.strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={spec!r} but this process sees no GPU (torch.cuda.is_available() is False; "
                               "under Ray, reserve one with gpus_per_router/gpus_per_shard); use device=auto or cpu")
        if dev.index is None:
            dev = torch.device("cuda", 0)
        if dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device={spec!r} but this process sees {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return dev


def select_device(spec: str | torch.device) -> torch.device:
    """This process's device (`resolve_device`), made the current CUDA device when it is one, so that anything
    allocated without an explicit device (NCCL's communicator included) lands on it. Called once per actor —
    Router, ExpertShard, V4Server — before its process group forms (docs/architecture.md §11)."""
    device = resolve_device(spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def resolve_dtype(dtype: str | torch.dtype, cfg: V4Config, device: torch.device | None = None) -> torch.dtype:
    """"auto" is bfloat16 on a GPU; on the CPU the checkpoint's dtype (bfloat16 unless it is stored in float32)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        return dtype
    if dtype == "auto":
        if device is not None and device.type == "cuda":
            return torch.bfloat16
        return torch.float32 if cfg.extra.get("torch_dtype") == "float32" else torch.bfloat16
    aliases = {"fp32": "float32", "bf16": "bfloat16"}
    if aliases.get(dtype, dtype) not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    return _DTYPES[aliases.get(dtype, dtype)]


def kv_format(kv_cache_dtype: str) -> str | None:
    """EngineConfig.kv_cache_dtype -> PagedKVCache's storage format; None ("auto"): the compute dtype's."""
    return None if kv_cache_dtype == "auto" else kv_cache_dtype


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in _DTYPES.items() if d == dtype)


def checkpoint_dir(config: EngineConfig) -> Path:
    path = Path(config.model)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model={config.model!r} is not a checkpoint directory (no config.json); create a "
                                f"tiny one with `v4ray make-tiny {config.model}`")
    return path


def build_engine_core(config: EngineConfig, model=None, prefix_cache=None, lockstep: bool = False) -> EngineCore:
    """The engine core of `config` in this process. `model`: an already loaded model (a Router's, without its
    routed experts); `prefix_cache`: a PrefixCacheClient; `lockstep`: this core is one rank of a replica."""
    path = checkpoint_dir(config)
    cfg = model.cfg if model is not None else V4Config.from_file(path)
    if model is None:
        device = resolve_device(config.device)
        model = load_model(path, resolve_dtype(config.dtype, cfg, device), keep_quantized=config.keep_quantized,
                           cfg=cfg, device=device)
    max_model_len = config.max_model_len or cfg.max_position_embeddings
    runner = ModelRunner(model, config.kv_cache_bytes, config.max_num_seqs,
                         config.block_size or default_block_size(cfg), kv_format=kv_format(config.kv_cache_dtype),
                         prefix_cache=prefix_cache, decode_step="eager" if config.enforce_eager else "compiled",
                         max_model_len=max_model_len)
    return EngineCore(runner, V4Tokenizer.from_dir(path), max_model_len,
                      config.max_num_batched_tokens, config.max_num_seqs, prefix_caching=prefix_cache is not None,
                      lockstep=lockstep, config=config, max_step_rows=config.max_step_rows)
