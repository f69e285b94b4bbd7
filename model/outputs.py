"""Request outputs in vLLM's shape (`RequestOutput.outputs[i].token_ids`, `.text`, `.logprobs`, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import Logprob

# Per position: token id -> Logprob. Prompt logprobs start with None (the first token has no prediction).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" (EOS, stop string or stop token) or "length"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it, if any


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0
