"""One generated sequence's bookkeeping: its sampling state, detokenization, stop conditions, logprobs.

Two halves per step: `sample` adds the sequence's device work to the step's `SamplingBatch` (nothing is read
back), and `append` takes the chosen token, read back with the whole batch's, and does the Python work:
stop checks, detokenization, logprobs.
"""

from __future__ import annotations

import torch

from .sampler import Penalties, SampledToken, SamplingBatch, read_back
from .sampling import SamplingParams, check_stop
from v4ray.model.tokenizer import V4Tokenizer

from .outputs import CompletionOutput, FlatLogprobs


class Sequence:
    """Generated continuation number `index` of one request."""

    def __init__(self, index: int, prompt_token_ids: list[int], params: SamplingParams, tokenizer: V4Tokenizer,
                 generator: torch.Generator | None, max_model_len: int, penalties: Penalties | None,
                 param_row: torch.Tensor, grammar=None):
        """generator: the request's (shared by its n sequences), on the logits' device. penalties: this
        sequence's device state when its logits are reshaped (`Penalties.of`). param_row: the request's
        `sampling_row` on the logits' device, uploaded when the request arrived (shared by its n sequences).
        grammar: this sequence's llguidance matcher when its output is constrained (`engine/grammar.py`); it
        follows the output from `params.structured.after_token_id` on (from the start when that is None)."""
        self.index, self.params, self.tokenizer, self.generator = index, params, tokenizer, generator
        self.param_row = param_row
        self.prompt_token_ids, self.penalties = prompt_token_ids, penalties
        self.max_model_len = max_model_len
        self.output_token_ids: list[int] = []
        self.text = ""
        self.cumulative_logprob = 0.0
        self.logprobs: FlatLogprobs | None = FlatLogprobs() if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._decoder = tokenizer.incremental_decoder(params.skip_special_tokens)
        self._sent_tokens = self._sent_text = 0  # what earlier DELTA outputs carried
        self.grammar = grammar
        self._grammar_waits = grammar is not None and params.structured.after_token_id is not None

    @property
    def constrained(self) -> bool:
        """The grammar decides this sequence's next token (the engine fills its mask and advances it)."""
        return self.grammar is not None and not self._grammar_waits

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without building the whole list: a decode step reads one token
        per sequence, and a long context's whole list costs milliseconds to build (1M tokens: ~3.5 ms here)."""
        prompt, output = self.prompt_token_ids, self.output_token_ids
        n = len(prompt)
        if start >= n:
            return output[start - n:stop - n]
        if stop <= n:
            return prompt[start:stop]
        return prompt[start:] + output[:stop - n]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that reshapes the logits: the batch's argmax is this sequence's token."""
        p = self.params
        return (p.greedy and not self.constrained and not p.logit_bias and p.repetition_penalty == 1.0
                and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
                and len(self.output_token_ids) >= p.min_tokens)

    def sample(self, batch: SamplingBatch, row: int) -> None:
        """Add this sequence's device work for row `row` of the step's batch (raw logits); reads nothing back."""
        if self.plain_greedy:
            return  # the batch's argmax of the raw logits (nothing to count: no penalties)
        batch.sample(row, self.params, self.param_row, self.penalties, len(self.output_token_ids), self.generator)

    def append(self, sampled: SampledToken) -> int:
        """Take the token chosen for this sequence (host values) and update logprobs and stop state."""
        if sampled.error:
            raise RuntimeError(sampled.error)
        token = sampled.token
        if self._grammar_waits and token == self.params.structured.after_token_id:
            self._grammar_waits = False  # the grammar starts with the next token
        self.output_token_ids.append(token)
        self.cumulative_logprob += sampled.logprob
        if self.logprobs is not None:
            sampled.add_logprobs(self.logprobs, self.params.logprobs,
                                  self.tokenizer.decode_token if self.params.decode_logprobs else None)
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
        if n_out >= p.max_tokens or len(self.prompt_token_ids) + n_out >= self.max_model_len:
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


def prompt_logprobs(logits: torch.Tensor, prompt_token_ids: list[int], targets: torch.Tensor | None, k: int,
                    tokenizer: V4Tokenizer):
    """vLLM's prompt_logprobs: None for the first token, then per position the top-k plus the actual token.

    logits [P, V]: row i predicts token i+1. targets: prompt_token_ids[1:] on the logits' device (the engine
    uploads them when the request arrives; None for a one-token prompt). All positions come back in one transfer
    (`read_back`): prefill only, the one extra transfer of the step in which the prompt completes."""
    if len(prompt_token_ids) < 2:
        return [None]
    raw = torch.log_softmax(logits[:len(prompt_token_ids) - 1].float(), dim=-1)  # [P-1, V]
    rows, _ = read_back(targets, raw, k)
    return [None] + [row.logprobs(k, tokenizer.decode_token) for row in rows]
