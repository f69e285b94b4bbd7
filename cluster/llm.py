"""The offline API: `LLM(model=DIR).generate(prompts, SamplingParams(...))`, as vLLM users know it."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence as Seq

import torch

from v4ray.engine.build import checkpoint_dir, dtype_name, resolve_dtype
from v4ray.engine.config import EngineConfig
from v4ray.engine.outputs import RequestOutput
from v4ray.engine.sampling import SamplingParams
from v4ray.model.config import V4Config
from v4ray.model.tokenizer import V4Tokenizer

from .build import build_engine, engine_device

PromptType = str | dict[str, Any]


class LLM:
    """A DeepSeek-V4 model loaded from a checkpoint directory, generating offline (vLLM's `LLM`).

    `engine_args` are EngineConfig fields (`v4ray.engine.config`, which documents each and holds the defaults):
    dtype ("auto", "float32", "bfloat16"), device ("auto", "cpu", "cuda", "cuda:N"), kv_cache_dtype ("auto",
    "fp8", "bf16", "fp32"), gpus_per_router / gpus_per_shard (GPUs each Router / ExpertShard actor reserves; the
    ranks then run on CUDA), keep_quantized, kv_cache_bytes, block_size, max_num_seqs,
    max_num_batched_tokens, max_model_len, enable_prefix_caching (reuse cached prompt prefixes through the
    cluster's KVCacheService actor; each output reports `num_cached_tokens`), prefix_cache_bytes,
    kv_cache_service, num_routers / num_expert_shards (> 0: a replica of Router and ExpertShard actors exchanging
    tokens by all-to-all) and collective_timeout_s. A local Ray on 127.0.0.1 is started when one is needed and
    none runs (`address` joins a cluster). `replica_options` are further ReplicaConfig fields (resources,
    placement strategy, timeouts, redundant experts). The layout is checked before any actor is placed, and a
    start that fails releases what it placed. `shutdown()` (or leaving a `with` block) releases the actors and
    placement group; an LLM that is deleted or garbage-collected without it is released too.
    """

    def __init__(self, model: str | Path, address: str | None = None, replica_options: dict | None = None,
                 **engine_args):
        if isinstance(engine_args.get("dtype"), torch.dtype):
            engine_args["dtype"] = dtype_name(engine_args["dtype"])
        config = EngineConfig(model=str(model), **engine_args)
        path = checkpoint_dir(config)
        self.config = V4Config.from_file(path)
        self.dtype = resolve_dtype(config.dtype, self.config, engine_device(config))
        self.tokenizer = V4Tokenizer.from_dir(path)
        self.max_model_len = config.max_model_len or self.config.max_position_embeddings
        self.engine = build_engine(config, address, replica_options)
        self.replica = getattr(self.engine, "replica", None)
        self.runner = self.engine.runner if self.replica is None else None
        self.model = self.runner.model if self.runner is not None else None
        self.prefix_cache = self.runner.prefix_cache if self.runner is not None else None
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
