"""The offline API: `LLM(model=DIR).generate(prompts, SamplingParams(...))`, as vLLM users know it."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence as Seq

import torch

from v4ray.model.config import V4Config
from v4ray.model.kv_cache import DEFAULT_BLOCK_SIZE, PREFIX_UNIT
from v4ray.model.engine_core import EngineCore
from v4ray.model.runner import ModelRunner
from v4ray.model.loader import load_model
from v4ray.model.outputs import RequestOutput
from v4ray.model.sampling import SamplingParams
from v4ray.model.tokenizer import V4Tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
PromptType = str | dict[str, Any]


def resolve_dtype(dtype: str | torch.dtype, cfg: V4Config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        return dtype
    if dtype == "auto":
        return torch.float32 if cfg.extra.get("torch_dtype") == "float32" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    return _DTYPES[dtype]


class LLM:
    """A DeepSeek-V4 model loaded from a checkpoint directory, generating offline in this process.

    dtype: "auto" (the checkpoint's: bfloat16 unless it is stored in float32), "float32" or "bfloat16".
    keep_quantized: keep FP8/FP4 weights in checkpoint format in memory (dequantized per use).
    enable_prefix_caching: reuse cached prompt prefixes (multiples of 128 tokens) through the cluster's
    KVCacheService actor, starting a local Ray if none is running (`address` joins another cluster); each
    output reports `num_cached_tokens`.
    num_expert_shards > 0: run the model as a replica of Ray actors — `num_routers` Router actors (attention,
    gates, cache, each with `kv_cache_bytes` / `max_num_seqs`) and `num_expert_shards` ExpertShard actors
    holding contiguous ranges of the routed experts, exchanging tokens by all-to-all (gloo on CPU, NCCL on
    GPU). A local Ray on 127.0.0.1 is started unless `address` names a cluster. `replica_options` are further
    `ReplicaConfig` fields (resources, timeouts, redundant experts). The layout is checked before any actor is
    placed, and a start that fails releases what it placed. `shutdown()` (or leaving a `with` block) releases the
    actors and placement group; an LLM that is deleted or garbage-collected without it is released too.
    """

    def __init__(self, model: str | Path, dtype: str | torch.dtype = "auto", keep_quantized: bool = False,
                 max_model_len: int | None = None, max_num_batched_tokens: int = 2048,
                 block_size: int = DEFAULT_BLOCK_SIZE, enable_prefix_caching: bool = False,
                 prefix_cache_bytes: int = 1 << 30, address: str | None = None,
                 kv_cache_service: str = "v4ray-kv-cache", kv_cache_bytes: int = 256 << 20,
                 max_num_seqs: int = 64, num_routers: int = 1, num_expert_shards: int = 0,
                 replica_options: dict | None = None):
        path = Path(model)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model={str(model)!r} is not a checkpoint directory (no config.json); create a "
                                    f"tiny one with `v4ray make-tiny {model}`")
        self.config = V4Config.from_file(path)
        self.dtype = resolve_dtype(dtype, self.config)
        self.tokenizer = V4Tokenizer.from_dir(path)
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        prefix_cache = None
        if enable_prefix_caching:
            from v4ray.actors.kv_cache_service import PrefixCacheClient, model_identity, root_key

            from .local_ray import ensure_ray

            ensure_ray(address)
            fmt = "fp32" if self.dtype == torch.float32 else "bf16"
            layout = f"kv={fmt}|unit={PREFIX_UNIT}"
            identity = model_identity(path, dtype=self.dtype, layout=layout)
            prefix_cache = PrefixCacheClient(root_key(identity, layout), budget_bytes=prefix_cache_bytes,
                                             name=kv_cache_service)
        self.prefix_cache = prefix_cache
        self.replica = None
        if num_expert_shards > 0:
            from .local_ray import ensure_ray
            from .replica import Replica, ReplicaConfig, ReplicaEngine

            ensure_ray(address)
            prefix_cfg = ({"root": prefix_cache.root, "budget_bytes": prefix_cache_bytes, "name": kv_cache_service}
                          if prefix_cache is not None else None)
            self.replica = Replica(ReplicaConfig(
                model=str(path), num_routers=num_routers, num_expert_shards=num_expert_shards,
                dtype="float32" if self.dtype == torch.float32 else "bfloat16", kv_cache_bytes=kv_cache_bytes,
                max_num_seqs=max_num_seqs, block_size=block_size, prefix_cache=prefix_cfg,
                max_model_len=self.max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                **(replica_options or {}))).start()
            self.model, self.runner, self.engine = None, self.replica, ReplicaEngine(self.replica)
        else:
            if num_routers != 1:
                raise ValueError("num_routers > 1 needs num_expert_shards >= 1 (a distributed replica)")
            self.model = load_model(path, self.dtype, keep_quantized=keep_quantized, cfg=self.config)
            self.runner = ModelRunner(self.model, kv_cache_bytes, max_num_seqs, block_size,
                                      prefix_cache=prefix_cache)
            self.engine = EngineCore(self.runner, self.tokenizer, self.max_model_len, max_num_batched_tokens,
                                     max_num_seqs, prefix_caching=enable_prefix_caching)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Release a distributed replica's actors and placement group (no-op for a single process)."""
        if self.replica is not None:
            self.replica.shutdown()
            self.replica = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt), prompt
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids, text = list(prompt["prompt_token_ids"]), prompt.get("prompt")
        elif isinstance(prompt, dict) and "prompt" in prompt:
            ids, text = self.tokenizer.encode(prompt["prompt"]), prompt["prompt"]
        else:
            raise TypeError(f"a prompt must be a string or a dict with 'prompt_token_ids' or 'prompt', got {prompt!r}")
        if not ids:
            raise ValueError("prompt_token_ids is empty: a prompt needs at least one token")
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids holds ids outside [0, {self.config.vocab_size}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        return text, ids

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for each prompt; returns one RequestOutput per prompt, in order.

        Every request goes to the engine at once; continuous batching runs them together (chunked prefill
        under `max_num_batched_tokens`, admission by KV capacity, preemption by recomputation)."""
        if not isinstance(prompts, (list, tuple)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        requests = [self._prompt_ids(p) for p in prompts]  # validate all before running any
        ids = []
        try:
            for (text, prompt_ids), sp in zip(requests, params):
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompt_ids, sp, text)
                ids.append(rid)
            final: dict[str, RequestOutput] = {}
            while len(final) < len(ids):
                if not self.engine.has_work():
                    raise RuntimeError(f"the engine stopped with requests {sorted(set(ids) - set(final))} unfinished")
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            if self.replica is None or not self.replica.failed:
                for rid in ids:
                    self.engine.abort(rid)
            raise
        return [final[r] for r in ids]
