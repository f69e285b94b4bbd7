"""Sampling with vLLM's semantics: `SamplingParams`, logit penalties, one-token sampling, logprobs, stop strings.

Pure torch and Python, one sequence at a time ([V] logits). The order per step follows vLLM:
logit_bias -> repetition/frequency/presence penalties (`apply_penalties`), then greedy argmax or
temperature -> top_k -> top_p -> min_p -> multinomial (`sample_token`). Reported logprobs are vLLM's default
"raw" logprobs: log_softmax of the model's logits before any of the above (`top_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

GREEDY_TEMPERATURE_EPS = 1e-5  # vLLM's _SAMPLING_EPS: below this temperature, sampling is argmax
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's logit_bias value limit


@dataclass
class SamplingParams:
    """Per-request sampling settings; field names, defaults and ranges follow vLLM / the OpenAI API.

    `top_k` 0 or -1 disables top-k; `stop` is normalised to a list; `logprobs` / `prompt_logprobs` are the
    number of top alternatives to report per token (None = do not report).
    """

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, minimum=-1)
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=-(2**63))
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r} in {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, minimum=0)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0, maximum=MAX_LOGPROBS)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name))
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0 or below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_number(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")


def _normalise_logit_bias(logit_bias: dict | None) -> dict[int, float] | None:
    """JSON gives string keys ("50256": -100); accept them and return {int id: float bias}."""
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(logit_bias).__name__}")
    normalised = {}
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        _check_number("logit_bias", bias)
        if token_id < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must map ids >= 0 to biases in [-100, 100], got {key!r}: {bias}")
        normalised[token_id] = float(bias)
    return normalised


@dataclass
class Logprob:
    """One entry of a logprobs dict, as vLLM: log-probability, 1-based rank, and the token's text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator seeded for a reproducible request, or None (use torch's global RNG) when seed is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def apply_penalties(
    logits: torch.Tensor, output_token_ids: list[int], prompt_token_ids: list[int], params: SamplingParams
) -> torch.Tensor:
    """Return penalised logits [V] (the input is not modified).

    logit_bias is added first (vLLM v1 order); then the repetition penalty r over prompt + generated tokens
    (HF/vLLM: l / r where l > 0, l * r otherwise); then OpenAI's penalties over generated tokens only:
    l -= frequency_penalty * count + presence_penalty * (count > 0).
    """
    vocab_size = logits.shape[-1]
    logits = logits.clone()  # [V]
    if params.logit_bias:
        outside = [i for i in params.logit_bias if i >= vocab_size]
        if outside:
            raise ValueError(f"logit_bias token ids {outside} are outside the vocabulary [0, {vocab_size})")
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    output_ids = torch.tensor(output_token_ids, dtype=torch.long, device=logits.device)
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab_size, dtype=torch.bool, device=logits.device)
        seen[torch.tensor(prompt_token_ids, dtype=torch.long, device=logits.device)] = True
        seen[output_ids] = True
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        counts = torch.bincount(output_ids, minlength=vocab_size).to(logits.dtype)  # [V]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_min_tokens(
    logits: torch.Tensor, num_output_tokens: int, params: SamplingParams, eos_token_id: int | None
) -> torch.Tensor:
    """Forbid eos and `stop_token_ids` (logit -inf) while fewer than `min_tokens` tokens were generated."""
    if num_output_tokens >= params.min_tokens:
        return logits
    banned = list(params.stop_token_ids) + ([] if eos_token_id is None or params.ignore_eos else [eos_token_id])
    logits = logits.clone()
    logits[[i for i in banned if i < logits.shape[-1]]] = float("-inf")
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token from (penalised) logits [V].

    Greedy: argmax, the first index among equal maxima. Otherwise divide by temperature, keep the top_k
    logits (ties at the boundary kept), keep the smallest prefix of tokens by probability whose mass
    reaches top_p (always at least one), drop tokens with prob < min_p * max prob, and draw with
    `torch.multinomial` from `generator`.
    """
    if params.greedy:
        return int(torch.argmax(logits))
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
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(
    logits: torch.Tensor, k: int, chosen: int, decode: Callable[[int], str] | None = None
) -> dict[int, Logprob]:
    """vLLM-style logprobs of one position: the top `k` tokens (ranks 1..k) plus `chosen` with its true rank.

    Computed from the raw model logits [V] (before temperature and penalties). The rank of `chosen`
    is 1 + the number of tokens with a strictly larger logprob.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [V]
    values, indices = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    entries = {int(i): (float(v), rank) for rank, (v, i) in enumerate(zip(values.tolist(), indices.tolist()), start=1)}
    if chosen not in entries:
        chosen_logprob = logprobs[chosen]
        entries[chosen] = (float(chosen_logprob), int((logprobs > chosen_logprob).sum()) + 1)
    return {
        token_id: Logprob(logprob=value, rank=rank, decoded_token=decode(token_id) if decode else None)
        for token_id, (value, rank) in entries.items()
    }


def check_stop(text: str, new_text_start: int, stop: list[str]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None.

    Only matches that end at or after `new_text_start` are new, so each stop string s is searched from
    max(0, new_text_start - len(s) + 1). The caller truncates `text` at the returned index, dropping the
    stop string itself (vLLM's default, include_stop_str_in_output=False).
    """
    cuts = [text.find(s, max(0, new_text_start - len(s) + 1)) for s in stop]
    found = [cut for cut in cuts if cut >= 0]
    return min(found) if found else None
