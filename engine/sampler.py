"""Sampling on the logits' device, with vLLM's semantics, and one read-back per step (docs/architecture.md §11).

The order per row follows vLLM: logit_bias -> repetition/frequency/presence penalties (`Penalties`, one per
sequence, kept on the device), then greedy argmax or temperature -> top_k -> top_p -> min_p (`sampling_probs`)
-> a draw with the request's generator (`draw`). Reported logprobs are vLLM's default "raw" logprobs:
log_softmax of the model's logits before any of the above. A step's rows are sampled together on the logits'
device (`SamplingBatch`) and read back in one transfer (`read_back`); `sample_token` and `top_logprobs` are the
same path for one row with a host result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .sampling import Logprob, SamplingParams


INVALID_PROBABILITIES = "probability tensor contains either `inf`, `nan` or element < 0"  # torch.multinomial's


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator seeded for a reproducible request, on the device that samples (the logits' device), or None
    (use that device's default generator) when seed is None. `meta` has no random numbers; it stands for an
    accelerator in tests/device_provenance.py, whose data live on the CPU, so its generator is the CPU's."""
    if seed is None:
        return None
    device = torch.device(device)
    generator = torch.Generator(device="cpu" if device.type == "meta" else device)
    generator.manual_seed(seed)
    return generator


class Penalties:
    """One sequence's logit shaping, kept on the logits' device: logit_bias, the repetition penalty over prompt +
    generated tokens (HF/vLLM: l / r where l > 0, l * r otherwise), OpenAI's penalties over generated tokens only
    (l -= frequency_penalty * count + presence_penalty * (count > 0)), and min_tokens' ban of eos and stop ids.

    What it needs from the host (bias ids and values, the prompt's token set, the banned ids) is uploaded once,
    when the request arrives. From then on the generated tokens are counted on the device: each step `count`
    adds the step's chosen token, still on the device, with one index op — no per-step upload of the generated
    ids (that would grow with the output) and no read-back. The price is a [V] int32 count per penalised
    sequence (0.5 MB at V4's vocabulary).
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: list[int], vocab_size: int,
                 eos_token_id: int | None, device: torch.device):
        self.params = params
        self.bias_ids = self.bias_values = self.prompt_mask = self.counts = self.banned = None
        if params.logit_bias:
            outside = [i for i in params.logit_bias if i >= vocab_size]
            if outside:
                raise ValueError(f"logit_bias token ids {outside} are outside the vocabulary [0, {vocab_size})")
            self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long).to(device)
            self.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32).to(device)
        if params.repetition_penalty != 1.0:
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # [V]
            self.prompt_mask[torch.tensor(prompt_token_ids, dtype=torch.long).to(device)] = True
        if params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)  # [V] generated tokens
        banned = list(params.stop_token_ids) + ([] if eos_token_id is None or params.ignore_eos else [eos_token_id])
        banned = [i for i in banned if i < vocab_size]
        if params.min_tokens > 0 and banned:
            self.banned = torch.tensor(banned, dtype=torch.long).to(device)

    @classmethod
    def of(cls, params: SamplingParams, prompt_token_ids: list[int], vocab_size: int, eos_token_id: int | None,
           device: torch.device) -> "Penalties | None":
        """The state a sequence needs, or None when nothing reshapes its logits."""
        p = params
        if (p.logit_bias or p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
                or p.min_tokens > 0):
            return cls(params, prompt_token_ids, vocab_size, eos_token_id, device)
        return None

    def count(self, token_ids: torch.Tensor) -> None:
        """Add generated tokens (ids [N] on the device) to the counts."""
        if self.counts is not None:
            self.counts.index_add_(0, token_ids, torch.ones_like(token_ids, dtype=torch.int32))

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalised logits [V] (the input is not modified): logit_bias first (vLLM v1 order), then the penalties."""
        p = self.params
        logits = logits.clone()  # [V]
        if self.bias_ids is not None:
            logits[self.bias_ids] += self.bias_values
        if p.repetition_penalty != 1.0:
            seen = self.prompt_mask | (self.counts > 0)
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            counts = self.counts.to(logits.dtype)
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def ban(self, logits: torch.Tensor, num_output_tokens: int) -> torch.Tensor:
        """Forbid eos and `stop_token_ids` (logit -inf) while fewer than `min_tokens` tokens were generated."""
        if self.banned is None or num_output_tokens >= self.params.min_tokens:
            return logits
        logits = logits.clone()
        logits[self.banned] = float("-inf")
        return logits

    def apply(self, logits: torch.Tensor, num_output_tokens: int) -> torch.Tensor:
        return self.ban(self.penalise(logits), num_output_tokens)


def apply_penalties(
    logits: torch.Tensor, output_token_ids: list[int], prompt_token_ids: list[int], params: SamplingParams
) -> torch.Tensor:
    """`Penalties.penalise` of one row [V] given its token lists (the engine keeps a `Penalties` per sequence)."""
    penalties = Penalties(params, prompt_token_ids, logits.shape[-1], None, logits.device)
    penalties.count(torch.tensor(output_token_ids, dtype=torch.long).to(logits.device))
    return penalties.penalise(logits)


def apply_min_tokens(
    logits: torch.Tensor, num_output_tokens: int, params: SamplingParams, eos_token_id: int | None
) -> torch.Tensor:
    """`Penalties.ban` of one row [V]: eos and `stop_token_ids` at -inf while fewer than `min_tokens` were made."""
    return Penalties(params, [], logits.shape[-1], eos_token_id, logits.device).ban(logits, num_output_tokens)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled (non-greedy) row draws from, [V] on the logits' device.

    Divide by temperature, keep the top_k logits (ties at the boundary kept), keep the smallest prefix of tokens
    by probability whose mass reaches top_p (always at least one), drop tokens with prob < min_p * max prob.
    """
    logits = logits.float() / params.temperature  # [V]
    vocab_size = logits.shape[-1]
    if 0 < params.top_k < vocab_size:
        kth_largest = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        probs_sorted, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
        mass_before = torch.cumsum(probs_sorted, dim=-1) - probs_sorted  # mass of strictly more likely tokens
        drop_sorted = mass_before >= params.top_p
        drop_sorted[0] = False
        drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)  # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return torch.softmax(logits, dim=-1)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of probs [D, V], each from its generator: tokens [D] and valid [D] (bool).

    This is torch.multinomial(probs[i], 1, generator=generators[i]) bit for bit — torch's own algorithm for one
    sample: argmax(p / q) with q ~ Exp(1) drawn from the generator — without its argument check, which reads the
    device back (`.item()`) or, in newer torch, raises a device-side assert that ends the CUDA context for every
    request. `valid` is that check (probabilities finite, >= 0, not all 0), read back with the tokens, so a bad
    row fails its request alone.
    """
    q = torch.empty_like(probs)  # [D, V]
    for row, generator in zip(q, generators):
        row.exponential_(1, generator=generator)
    tokens = (probs / q).argmax(dim=-1)
    total = probs.sum(dim=-1)  # NaN or inf anywhere in the row shows in its sum
    valid = (total > 0) & (total < math.inf) & (probs.amin(dim=-1) >= 0)
    return tokens, valid


@dataclass
class SampledToken:
    """One row's sampling result on the host: the token, its raw logprob, and when logprobs were asked its rank
    (1 + the number of tokens with a strictly larger logprob) and the row's top-k (logprobs, ids)."""

    token: int
    logprob: float
    rank: int | None = None
    top: tuple[list[float], list[int]] | None = None
    error: str | None = None  # the row's probabilities were invalid (see `draw`)

    def logprobs(self, k: int, decode: Callable[[int], str] | None = None) -> dict[int, Logprob]:
        """vLLM-style logprobs of the position: the top `k` tokens (ranks 1..k) plus the chosen one with its rank."""
        values, ids = self.top or ([], [])
        entries = {i: (v, rank) for rank, (v, i) in enumerate(zip(values[:k], ids[:k]), start=1)}
        if self.token not in entries:
            entries[self.token] = (self.logprob, self.rank)
        return {token_id: Logprob(logprob=value, rank=rank, decoded_token=decode(token_id) if decode else None)
                for token_id, (value, rank) in entries.items()}


def read_back(tokens: torch.Tensor, raw_logprobs: torch.Tensor, k: int | None = None,
              extra: torch.Tensor | None = None, argmax: bool = False) -> tuple[list[SampledToken], list[float]]:
    """Everything the host needs about rows whose tokens [N] were chosen on the device, in ONE transfer.

    raw_logprobs [N, V]: log_softmax of the raw logits. k None: no logprobs asked (the token's logprob still
    travels, for `cumulative_logprob`); else each row's rank and top-k come too. `extra` (any shape) rides along
    and comes back flat. argmax: every token is its row's argmax, so its rank is 1 (not computed: it costs a
    pass over [N, V]). All pieces are packed into one float64 tensor (token ids < 2^53 are exact).
    """
    chosen = raw_logprobs.gather(1, tokens[:, None])  # [N, 1]
    pieces = [tokens, chosen]
    if k is not None:
        k = min(k, raw_logprobs.shape[-1])
        pieces.append(tokens[:0] if argmax else (raw_logprobs > chosen).sum(dim=-1) + 1)  # rank
        if k:
            pieces += list(raw_logprobs.topk(k, dim=-1))  # values, ids [N, k]
    pieces.append(extra if extra is not None else tokens[:0])
    flat = torch.cat([p.reshape(-1).to(torch.float64) for p in pieces]).tolist()  # the one device->host copy
    host, at = [], 0
    for p in pieces:
        host.append(flat[at:at + p.numel()])
        at += p.numel()
    out = [SampledToken(int(t), lp) for t, lp in zip(host[0], host[1])]
    if k is not None:
        for i, row in enumerate(out):
            row.rank = 1 if argmax else int(host[2][i])
            row.top = (host[3][i * k:(i + 1) * k], [int(t) for t in host[4][i * k:(i + 1) * k]]) if k else ([], [])
    return out, host[-1]


class SamplingBatch:
    """The rows one engine step samples — raw logits [S, V] on their device — and all the sampling done on them.

    Sequences add their device work row by row (`greedy` on shaped logits, `draw` from a distribution, `count`
    for penalty state); a row nobody adds takes the argmax of its raw logits. `run` chooses every row's token,
    its raw logprob (and rank and top-k when asked), counts the tokens into penalty state and reads it all back
    with one transfer (`read_back`): nothing before it reads the device, so a step syncs once however many rows
    it samples (docs/architecture.md §11). The per-row ops are device ops queued in order; with a seeded
    generator per row, the same seed draws the same token whatever else is in the batch.
    """

    def __init__(self, logits: torch.Tensor):
        self.logits = logits  # [S, V]
        self._greedy: list[tuple[int, torch.Tensor]] = []  # (row, token [] of the shaped logits)
        self._draw_rows: list[int] = []
        self._probs: list[torch.Tensor] = []
        self._generators: list[torch.Generator | None] = []
        self._counted: list[tuple[int, Penalties]] = []

    def greedy(self, row: int, logits: torch.Tensor) -> None:
        """Row `row` takes the argmax (the first among equal maxima) of its shaped logits [V]."""
        self._greedy.append((row, logits.argmax()))

    def draw(self, row: int, probs: torch.Tensor, generator: torch.Generator | None) -> None:
        """Row `row` draws from probs [V] (`sampling_probs`) with the request's generator."""
        self._draw_rows.append(row)
        self._probs.append(probs)
        self._generators.append(generator)

    def count(self, row: int, penalties: Penalties) -> None:
        """Add row `row`'s chosen token to these penalty counts once it is chosen."""
        self._counted.append((row, penalties))

    def run(self, num_logprobs: int | None = None) -> list[SampledToken]:
        """Choose, count and read back every row (one transfer). num_logprobs: the largest `logprobs` asked by
        any row (None: none asked)."""
        num_rows = self.logits.shape[0]
        if num_rows == 0:
            return []
        valid = None
        if self._probs:
            drawn, valid = draw(torch.stack(self._probs), self._generators)  # [D]
        if self._draw_rows == list(range(num_rows)):
            tokens = drawn
        else:
            tokens = self.logits.argmax(dim=-1)  # [S]
            for row, token in self._greedy:
                tokens[row] = token
            for i, row in enumerate(self._draw_rows):
                tokens[row] = drawn[i]
        for row, penalties in self._counted:
            penalties.count(tokens[row:row + 1])
        results, valid = read_back(tokens, torch.log_softmax(self.logits.float(), dim=-1), num_logprobs, valid,
                                   argmax=not (self._greedy or self._draw_rows))
        for row, ok in zip(self._draw_rows, valid):
            if not ok:
                results[row].error = INVALID_PROBABILITIES
        return results


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One row [V] (penalties already applied) through `SamplingBatch`: greedy argmax, the first index among
    equal maxima, or a draw from `sampling_probs` with `generator`. Raises on invalid probabilities."""
    batch = SamplingBatch(logits[None])
    if params.greedy:
        batch.greedy(0, logits)
    else:
        batch.draw(0, sampling_probs(logits, params), generator)
    result = batch.run()[0]
    if result.error:
        raise RuntimeError(result.error)
    return result.token


def top_logprobs(logits: torch.Tensor, k: int, chosen: int,
                 decode: Callable[[int], str] | None = None) -> dict[int, Logprob]:
    """vLLM-style logprobs of one position from its raw logits [V] (before temperature and penalties): the top
    `k` tokens (ranks 1..k) plus `chosen` with its true rank, 1 + the number of tokens with a strictly larger
    logprob."""
    chosen_ids = torch.tensor([chosen], dtype=torch.long).to(logits.device)
    row = read_back(chosen_ids, torch.log_softmax(logits.float(), dim=-1)[None], k)[0][0]
    return row.logprobs(k, decode)
