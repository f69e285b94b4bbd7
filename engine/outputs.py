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
    # Set when this request failed inside the engine (e.g. sampling raised); other requests are unaffected.
    error: str | None = None


def merge_delta(into: RequestOutput, delta: RequestOutput) -> RequestOutput:
    """Append a DELTA output to an earlier one of the same request (in place; returns `into`).

    Used where a reader fell behind (several deltas coalesce into one) and by readers that need the whole
    output at the end (non-streaming responses)."""
    by_index = {c.index: c for c in into.outputs}
    for d in delta.outputs:
        c = by_index.get(d.index)
        if c is None:
            c = CompletionOutput(d.index, "", [], logprobs=[] if d.logprobs is not None else None)
            into.outputs.append(c)
            by_index[d.index] = c
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None:  # extend in place: merging k deltas costs O(total), not O(k * total)
            if c.logprobs is None:
                c.logprobs = []
            c.logprobs.extend(d.logprobs)
        c.cumulative_logprob = d.cumulative_logprob
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    into.outputs.sort(key=lambda c: c.index)
    if delta.prompt_logprobs is not None:
        into.prompt_logprobs = delta.prompt_logprobs
    if delta.prompt_token_ids and not into.prompt_token_ids:
        into.prompt, into.prompt_token_ids = delta.prompt, delta.prompt_token_ids
    into.finished, into.error = delta.finished, delta.error
    into.num_cached_tokens = max(into.num_cached_tokens, delta.num_cached_tokens)
    return into
