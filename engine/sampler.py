"""Sampling on the logits' device, with vLLM's semantics, and one read-back per step (docs/architecture.md §11).

The order per row follows vLLM: logit_bias -> repetition/frequency/presence penalties (`Penalties`, one per
sequence, kept on the device), then greedy argmax or temperature -> top_k -> top_p -> min_p (`sampling_probs`)
-> a draw with the request's generator (`draw`). Reported logprobs are vLLM's default "raw" logprobs:
log_softmax of the model's logits before any of the above. A step's rows are sampled together on the logits'
device (`SamplingBatch`) and read back in one transfer (`read_back`).

Batched: the engine's rows go through the chain together, as tensor ops on [S, V], with each request's parameters
in a small device tensor uploaded when it arrives (`sampling_row`) and stacked per step — no per-row chain of
device ops and no per-step upload. `sampling_probs` and `Penalties.apply` are the same semantics for one row with
host parameters (`sample_token`, and the reference the batched path is tested against, bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .grammar import allowed_mask
from .outputs import FlatLogprobs
from .sampling import Logprob, SamplingParams


INVALID_PROBABILITIES = "probability tensor contains either `inf`, `nan` or element < 0"  # torch.multinomial's
# Columns of a request's parameter row (`sampling_row`), fp32 like the logits they scale.
TEMPERATURE, TOP_K, TOP_P, MIN_P, REPETITION, FREQUENCY, PRESENCE = range(7)


def sampling_row(params: SamplingParams, vocab_size: int) -> torch.Tensor:
    """A request's numeric sampling parameters as one host tensor [7] (the engine uploads it once, when the request
    arrives; a step stacks its rows' into [S, 7]). Each transform's "off" value leaves a row's logits bit for bit
    as they were: temperature 1 for greedy (not used), top_k 0 (also for k >= V), top_p inf (the mass before a token
    is never >= inf, while it can round to >= 1.0), min_p 0, repetition 1, frequency and presence 0. Token ids and
    top_k (< V <= 2^24) are exact in fp32."""
    p = params
    top_k = p.top_k if 0 < p.top_k < vocab_size else 0
    return torch.tensor([1.0 if p.greedy else p.temperature, top_k, p.top_p if p.top_p < 1.0 else math.inf, p.min_p,
                         p.repetition_penalty, p.frequency_penalty, p.presence_penalty], dtype=torch.float32)


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
    sequence (0.5 MB at V4's vocabulary), as much for a logit_bias (kept dense, [V] fp32, so that a batch adds
    every row's bias in one op) and a [V] bool each for the prompt set and the banned ids. A step stacks the
    state of its rows (`apply_rows`): one op per kind of state, whatever the number of rows.
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: list[int], vocab_size: int,
                 eos_token_id: int | None, device: torch.device):
        self.params = params
        self.bias = self.prompt_mask = self.counts = self.banned = None  # each [V] on the device, or None
        if params.logit_bias:
            outside = [i for i in params.logit_bias if i >= vocab_size]
            if outside:
                raise ValueError(f"logit_bias token ids {outside} are outside the vocabulary [0, {vocab_size})")
            bias = torch.zeros(vocab_size, dtype=torch.float32)
            bias[list(params.logit_bias)] = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
            self.bias = bias.to(device)  # dense: a batch adds every row's at once
        if params.repetition_penalty != 1.0:
            prompt_mask = torch.zeros(vocab_size, dtype=torch.bool)
            prompt_mask[prompt_token_ids] = True
            self.prompt_mask = prompt_mask.to(device)
        if params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)  # [V] generated tokens
        banned = list(params.stop_token_ids) + ([] if eos_token_id is None or params.ignore_eos else [eos_token_id])
        banned = [i for i in banned if i < vocab_size]
        if params.min_tokens > 0 and banned:
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[banned] = True
            self.banned = mask.to(device)

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
        if self.bias is not None:
            logits += self.bias
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
        return logits.masked_fill(self.banned, float("-inf"))

    def apply(self, logits: torch.Tensor, num_output_tokens: int) -> torch.Tensor:
        return self.ban(self.penalise(logits), num_output_tokens)

    def banning(self, num_output_tokens: int) -> bool:
        return self.banned is not None and num_output_tokens < self.params.min_tokens

    @staticmethod
    def apply_rows(logits: torch.Tensor, rows: torch.Tensor, penalties: list["Penalties | None"],
                   num_output_tokens: list[int]) -> torch.Tensor:
        """`apply` for a batch: logits [R, V] fp32, rows [R, 7] (`sampling_row`), one state (or None) and output
        length per row. Each kind of state is stacked once ([R, V]; a row without it stacks zeros, which leave
        its logits as they are: + 0, / 1, * 1, - 0) and applied to all rows in one go; a kind no row has costs
        nothing. Bit for bit `apply` row by row."""
        def stacked(tensors: list[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor | None:
            if all(t is None for t in tensors):
                return None
            zeros = logits.new_zeros(logits.shape[-1], dtype=dtype)
            return torch.stack([zeros if t is None else t for t in tensors])  # [R, V]

        bias = stacked([p and p.bias for p in penalties], torch.float32)
        if bias is not None:
            logits = logits + bias
        counts = stacked([p and p.counts for p in penalties], torch.int32)
        if counts is not None:
            prompt_mask = stacked([p and p.prompt_mask for p in penalties], torch.bool)
            if prompt_mask is not None:
                r = rows[:, REPETITION, None]
                seen = prompt_mask | (counts > 0)
                logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
            counts = counts.to(logits.dtype)
            logits = logits - (rows[:, FREQUENCY, None] * counts
                               + rows[:, PRESENCE, None] * (counts > 0).to(logits.dtype))
        banned = stacked([p.banned if p is not None and p.banning(n) else None
                          for p, n in zip(penalties, num_output_tokens)], torch.bool)
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        return logits


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
    """The distribution a sampled (non-greedy) row draws from, [V] on the logits' device, for one row with host
    parameters (`sample_token`); the engine's rows go through `batch_probs` together, bit for bit the same per row.

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


def batch_probs(logits: torch.Tensor, rows: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`sampling_probs` for a batch: logits [D, V], rows [D, 7] on the device (`sampling_row`), params the rows'
    host parameters (they only decide which transforms any row needs). Each transform runs once on [D, V]:
    divide by the per-row temperature; top-k by each row's k-th largest logit, gathered from ONE topk with the
    largest k of the batch; top-p by one sort of the batch; min-p against each row's max. A row that skips a
    transform keeps its values bit for bit (its threshold is -inf / inf / 0), and every op is row-wise, so a row's
    probabilities do not depend on the others' (a NaN row stays its own)."""
    vocab_size = logits.shape[-1]
    logits = logits.float() / rows[:, TEMPERATURE, None]  # [D, V]
    max_k = max((p.top_k for p in params if 0 < p.top_k < vocab_size), default=0)
    if max_k:
        k = rows[:, TOP_K, None].long()  # [D, 1], 0: off
        kth_largest = torch.topk(logits, max_k, dim=-1).values.gather(1, (k - 1).clamp(min=0))
        logits = logits.masked_fill(logits < torch.where(k > 0, kth_largest, float("-inf")), float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        probs_sorted, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
        mass_before = torch.cumsum(probs_sorted, dim=-1) - probs_sorted
        drop_sorted = mass_before >= rows[:, TOP_P, None]  # top_p inf: nothing dropped
        drop_sorted[:, 0] = False
        drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if any(p.min_p > 0.0 for p in params):
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < rows[:, MIN_P, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
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

    def add_logprobs(self, into: FlatLogprobs, k: int, decode: Callable[[int], str] | None = None) -> None:
        """Append this position's vLLM-style logprobs to `into`: the top `k` tokens (ranks 1..k), then the chosen
        one with its rank when it is not among them."""
        values, ids = self.top or ([], [])
        ids, values = ids[:k], values[:k]
        ranks: list[int | None] = list(range(1, len(ids) + 1))
        if self.token not in ids:
            ids, values, ranks = ids + [self.token], values + [self.logprob], ranks + [self.rank]
        into.add(ids, values, ranks, [decode(t) for t in ids] if decode else [None] * len(ids))

    def logprobs(self, k: int, decode: Callable[[int], str] | None = None) -> dict[int, Logprob]:
        """This position's logprobs as vLLM's dict (see `add_logprobs`)."""
        one = FlatLogprobs()
        self.add_logprobs(one, k, decode)
        return one[0]


def greedy_picks(logits: torch.Tensor) -> torch.Tensor:
    """Every row's plain greedy choice as one small tensor: logits [N, V] -> [N, 2] float64 of (the argmax, the
    first among equal maxima; its raw logprob). `SamplingBatch.run` reads it back when no row is shaped and no
    logprobs are asked; the fixed-shape decode step computes it inside its graph (engine/graphs.py), so that a step
    whose every row is plain greedy reads back this and nothing else (`picked_tokens`). Token ids < 2^53 are exact in
    float64."""
    tokens = logits.argmax(dim=-1)
    chosen = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]
    return torch.stack([tokens.to(torch.float64), chosen.to(torch.float64)], dim=1)


def picked_tokens(picks: torch.Tensor) -> list[SampledToken]:
    """`greedy_picks` on the host (the step's one device->host transfer) -> each row's SampledToken."""
    return [SampledToken(int(t), lp) for t, lp in picks.tolist()]


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

    Sequences add their rows with `sample` (their parameters as a device row, `sampling_row`, and penalty state);
    `run` then shapes all those rows together (`Penalties.apply_rows` on [R, V]), takes the argmax of the greedy
    ones and draws the others from `batch_probs` (one chain of tensor ops for the batch, not one per row). A row
    nobody adds takes the argmax of its raw logits; `greedy` / `draw` add a row whose logits or distribution the
    caller shaped itself (one row, host parameters: `sample_token`). `run` chooses every row's token, its raw
    logprob (and rank and top-k when asked), counts the tokens into penalty state and reads it all back with one
    transfer (`read_back`): nothing before it reads the device, so a step syncs once however many rows it samples
    (docs/architecture.md §11). With a seeded generator per row, the same seed draws the same token whatever else
    is in the batch.
    """

    def __init__(self, logits: torch.Tensor):
        self.logits = logits  # [S, V]
        self._greedy: list[tuple[int, torch.Tensor]] = []  # (row, token [] of the caller's shaped logits)
        self._shaped: list[tuple[int, SamplingParams, torch.Tensor, Penalties | None, int]] = []  # via `sample`
        self._draws: list[tuple[int, torch.Tensor | None, torch.Generator | None]] = []  # probs None: `sample`'s
        self._counted: list[tuple[int, Penalties]] = []
        self._bitmask: torch.Tensor | None = None  # [S, words] int32 on the device: grammar-allowed tokens

    def sample(self, row: int, params: SamplingParams, param_row: torch.Tensor, penalties: Penalties | None,
               num_output_tokens: int, generator: torch.Generator | None) -> None:
        """Row `row` is shaped by `penalties` (if any) and, greedy, takes the argmax, or else draws from its
        `batch_probs` with `generator`. param_row [7]: `sampling_row(params)` on the logits' device."""
        self._shaped.append((row, params, param_row, penalties, num_output_tokens))
        if not params.greedy:
            self._draws.append((row, None, generator))
        if penalties is not None and penalties.counts is not None:
            self._counted.append((row, penalties))

    def constrain(self, bitmask: torch.Tensor) -> None:
        """Rows sampled with `sample` choose only among the tokens their row of bitmask [S, words] (int32, on the
        logits' device, 32 tokens per word; `engine/grammar.py`) allows; an unconstrained row's words are all
        ones. Applied to the rows' logits before anything else shapes them, in one op for the batch. Reported
        logprobs stay the raw model's."""
        self._bitmask = bitmask

    def greedy(self, row: int, logits: torch.Tensor) -> None:
        """Row `row` takes the argmax (the first among equal maxima) of its shaped logits [V]."""
        self._greedy.append((row, logits.argmax()))

    def draw(self, row: int, probs: torch.Tensor, generator: torch.Generator | None) -> None:
        """Row `row` draws from probs [V] (`sampling_probs`) with the request's generator."""
        self._draws.append((row, probs, generator))

    def count(self, row: int, penalties: Penalties) -> None:
        """Add row `row`'s chosen token to these penalty counts once it is chosen."""
        self._counted.append((row, penalties))

    def _rows(self, rows: list[int], logits: torch.Tensor | None = None) -> torch.Tensor:
        """Those rows of logits (default: the batch's), stacked [len(rows), V]; no copy when they are all rows."""
        logits = self.logits if logits is None else logits
        return logits if rows == list(range(logits.shape[0])) else torch.stack([logits[r] for r in rows])

    def _shape(self) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor | None]:
        """The `sample` rows: [(row, token [])] of the greedy ones and probs [D, V] of the drawing ones."""
        if not self._shaped:
            return [], None
        rows, params, param_rows, penalties, num_out = map(list, zip(*self._shaped))
        logits = self._rows(rows).float()  # [R, V]
        if self._bitmask is not None:
            logits = logits.masked_fill(~allowed_mask(self._rows(rows, self._bitmask), logits.shape[-1]),
                                        float("-inf"))
        param_rows = torch.stack(param_rows)  # [R, 7]
        if any(p is not None for p in penalties):
            logits = Penalties.apply_rows(logits, param_rows, penalties, num_out)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        tokens = self._rows(greedy, logits).argmax(dim=-1) if greedy else None
        drawn = [i for i, p in enumerate(params) if not p.greedy]
        probs = None
        if drawn:
            probs = batch_probs(self._rows(drawn, logits), self._rows(drawn, param_rows),
                                [params[i] for i in drawn])
        return [(rows[i], tokens[j]) for j, i in enumerate(greedy)], probs

    def run(self, num_logprobs: int | None = None) -> list[SampledToken]:
        """Choose, count and read back every row (one transfer). num_logprobs: the largest `logprobs` asked by
        any row (None: none asked)."""
        num_rows = self.logits.shape[0]
        if num_rows == 0:
            return []
        if not (self._shaped or self._greedy or self._draws or self._counted) and num_logprobs is None:
            return picked_tokens(greedy_picks(self.logits))  # every row plain greedy, as a decode step's graph does
        greedy, shaped_probs = self._shape()
        greedy += self._greedy
        draw_rows = [row for row, _, _ in self._draws]
        valid = None
        if self._draws:
            if all(p is None for _, p, _ in self._draws):
                probs = shaped_probs
            else:  # rows of both kinds: in the order they were added (the default generator's order)
                shaped = iter(shaped_probs if shaped_probs is not None else [])
                probs = torch.stack([next(shaped) if p is None else p for _, p, _ in self._draws])
            drawn, valid = draw(probs, [g for _, _, g in self._draws])  # [D]
        if draw_rows == list(range(num_rows)):
            tokens = drawn
        elif not greedy and not draw_rows:  # every row plain greedy: the batch's argmax as it is
            tokens = self.logits.argmax(dim=-1)
        else:  # one stack of per-row views (no kernel per row)
            chosen = dict(greedy) | {row: drawn[i] for i, row in enumerate(draw_rows)}
            argmax = self.logits.argmax(dim=-1) if len(chosen) < num_rows else None  # [S], the plain rows
            tokens = torch.stack([chosen[row] if row in chosen else argmax[row] for row in range(num_rows)])
        for row, penalties in self._counted:
            penalties.count(tokens[row:row + 1])
        results, valid = read_back(tokens, torch.log_softmax(self.logits.float(), dim=-1), num_logprobs, valid,
                                   argmax=not (greedy or draw_rows))
        for row, ok in zip(draw_rows, valid):
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
