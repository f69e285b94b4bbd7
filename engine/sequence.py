"""One generated sequence's bookkeeping: sampling state, detokenization, stop conditions, logprobs.

Plain Python around per-token logits; the same object serves the offline `LLM` and, later, the engine.
"""

from __future__ import annotations

import torch

from .sampling import (SamplingParams, apply_min_tokens, apply_penalties, check_stop, sample_token,
                                  top_logprobs)
from v4ray.model.tokenizer import V4Tokenizer

from .outputs import CompletionOutput


class Sequence:
    """Generated continuation number `index` of one request."""

    def __init__(self, index: int, prompt_token_ids: list[int], params: SamplingParams, tokenizer: V4Tokenizer,
                 generator: torch.Generator | None, max_model_len: int):
        self.index, self.params, self.tokenizer, self.generator = index, params, tokenizer, generator
        self.prompt_token_ids = prompt_token_ids
        self.max_model_len = max_model_len
        self.output_token_ids: list[int] = []
        self.text = ""
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._decoder = tokenizer.incremental_decoder(params.skip_special_tokens)
        self._sent_tokens = self._sent_text = 0  # what earlier DELTA outputs carried

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that reshapes the logits: the batch's argmax is this sequence's token."""
        p = self.params
        return (p.greedy and not p.logit_bias and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
                and p.frequency_penalty == 0.0 and len(self.output_token_ids) >= p.min_tokens)

    def step(self, logits: torch.Tensor, logprobs: torch.Tensor | None = None, token: int | None = None,
             top: tuple[list[float], list[int]] | None = None) -> int:
        """Sample the next token from this position's raw logits [V] (fp32) and update stop state.

        A batched caller may pass this row's log-softmax, for `plain_greedy` sequences its argmax, and its
        top-k logprobs as lists (k >= params.logprobs)."""
        p = self.params
        if token is None:
            shaped = apply_penalties(logits, self.output_token_ids, self.prompt_token_ids, p)
            shaped = apply_min_tokens(shaped, len(self.output_token_ids), p, self.tokenizer.eos_token_id)
            token = sample_token(shaped, p, self.generator)
        self.output_token_ids.append(token)
        raw = torch.log_softmax(logits.float(), dim=-1) if logprobs is None else logprobs
        self.cumulative_logprob += float(raw[token])
        if self.logprobs is not None:
            self.logprobs.append(top_logprobs(logits, p.logprobs, token, self.tokenizer.decode_token, raw, top))
        self._check_finished(token)
        return token

    def _check_finished(self, token: int) -> None:
        p = self.params
        n_out = len(self.output_token_ids)
        if n_out >= p.min_tokens:
            if token == self.tokenizer.eos_token_id and not p.ignore_eos:
                self.finish_reason = "stop"
                return
            if p.stop_token_ids and token in p.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", token
                return
        start = len(self.text)
        self.text += self._decoder.step(token)
        if p.stop and n_out >= p.min_tokens:
            cut = check_stop(self.text, start, p.stop)
            if cut is not None:
                hit = min((s for s in p.stop if self.text.startswith(s, cut)), key=len)
                self.text = self.text[:cut]
                self.finish_reason, self.stop_reason = "stop", hit
                return
        if n_out >= p.max_tokens or len(self.all_token_ids) >= self.max_model_len:
            self.finish_reason = "length"
            self.text += self._decoder.flush()

    def output(self) -> CompletionOutput:
        return CompletionOutput(index=self.index, text=self.text, token_ids=list(self.output_token_ids),
                                cumulative_logprob=self.cumulative_logprob, logprobs=self.logprobs,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason)

    def delta_output(self) -> CompletionOutput:
        """Only what is new since the last call: tokens, their logprobs, and text. While running, the last
        `stop_holdback` characters are held back (a stop string may still begin there and be cut), so the
        concatenated deltas equal the final text."""
        hold = 0 if self.finished else self.params.stop_holdback
        end = max(self._sent_text, len(self.text) - hold)
        text, self._sent_text = self.text[self._sent_text:end], end
        start, self._sent_tokens = self._sent_tokens, len(self.output_token_ids)
        return CompletionOutput(index=self.index, text=text, token_ids=self.output_token_ids[start:],
                                cumulative_logprob=self.cumulative_logprob,
                                logprobs=self.logprobs[start:] if self.logprobs is not None else None,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason)


def prompt_logprobs(logits: torch.Tensor, prompt_token_ids: list[int], k: int, tokenizer: V4Tokenizer):
    """vLLM's prompt_logprobs: None for the first token, then per position the top-k plus the actual token.

    logits [P, V]: row i predicts token i+1."""
    out: list = [None]
    for i in range(1, len(prompt_token_ids)):
        out.append(top_logprobs(logits[i - 1], k, prompt_token_ids[i], tokenizer.decode_token))
    return out
