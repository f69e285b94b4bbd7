"""The offline API: `LLM(model=DIR).generate(prompts, SamplingParams(...))`, as vLLM users know it."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence as Seq

import torch

from v4ray.model.config import V4Config
from v4ray.model.loader import load_model
from v4ray.model.sampling import SamplingParams, make_generator
from v4ray.model.tokenizer import V4Tokenizer

from .outputs import RequestOutput
from .sequence import Sequence, prompt_logprobs

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
    """

    def __init__(self, model: str | Path, dtype: str | torch.dtype = "auto", keep_quantized: bool = False,
                 max_model_len: int | None = None):
        path = Path(model)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model={str(model)!r} is not a checkpoint directory (no config.json); create a "
                                    f"tiny one with `v4ray make-tiny {model}`")
        self.config = V4Config.from_file(path)
        self.dtype = resolve_dtype(dtype, self.config)
        self.model = load_model(path, self.dtype, keep_quantized=keep_quantized, cfg=self.config)
        self.tokenizer = V4Tokenizer.from_dir(path)
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self._ids = itertools.count()

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
        """Generate for each prompt; returns one RequestOutput per prompt, in order."""
        if not isinstance(prompts, (list, tuple)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        requests = [self._prompt_ids(p) for p in prompts]  # validate all before running any
        return [self._generate_one(text, ids, sp) for (text, ids), sp in zip(requests, params)]

    def _generate_one(self, text: str | None, ids: list[int], params: SamplingParams) -> RequestOutput:
        generator = make_generator(params.seed)
        logits = self.model(torch.tensor(ids))  # [P, V]: one full forward, no cache
        out = RequestOutput(request_id=str(next(self._ids)), prompt=text, prompt_token_ids=ids,
                            prompt_logprobs=(prompt_logprobs(logits, ids, params.prompt_logprobs, self.tokenizer)
                                             if params.prompt_logprobs is not None else None))
        for i in range(params.n):
            seq = Sequence(i, ids, params, self.tokenizer, generator, self.max_model_len)
            last = logits[-1]
            while True:
                seq.step(last)
                if seq.finished:
                    break
                last = self.model(torch.tensor(seq.all_token_ids))[-1]  # full recomputation
            out.outputs.append(seq.output())
        return out
