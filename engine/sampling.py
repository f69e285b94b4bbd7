"""What a request asks of sampling, with vLLM's semantics: `SamplingParams` (validated at the edge, each error
naming its field), output kinds, logprob entries and stop strings. The sampling itself — penalties, the draw, the
one read-back per step — is `engine/sampler.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GREEDY_TEMPERATURE_EPS = 1e-5  # vLLM's _SAMPLING_EPS: below this temperature, sampling is argmax
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's logit_bias value limit
# Bounds that keep every intermediate of sampling finite in fp32 for any finite model logits (|l| < 1e4):
# l / temperature, l * r and l / r stay below 1e9. vLLM accepts any positive value and can then produce inf/NaN
# probabilities (e.g. repetition_penalty 1e-39); OpenAI's own range for temperature is [0, 2].
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_PENALTY = 2.0  # presence / frequency penalties, OpenAI's range [-2, 2]
MAX_TOP_K = 1 << 31
MAX_SEED = (1 << 64) - 1  # torch.Generator seeds are unsigned 64-bit
MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, MAX_STOP_LEN = 16, 256, 256
MAX_LOGIT_BIAS_ENTRIES = 1024


class SamplingParamError(ValueError):
    """An invalid sampling parameter; `param` names the field (the OpenAI error's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class RequestOutputKind:
    """What the engine emits for a request each step (vLLM's names): the whole output so far, only what is new
    since the last emission (streaming: traffic linear in the output), or one output when it finishes."""

    CUMULATIVE, DELTA, FINAL_ONLY = "cumulative", "delta", "final_only"
    ALL = (CUMULATIVE, DELTA, FINAL_ONLY)


STRUCTURED_KINDS = ("json_schema", "json_object", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match (enforced token by token, `engine/grammar.py`). kind: "json_schema"
    (spec: the schema as JSON text), "json_object" (any JSON object; spec unused) or "grammar" (spec: a Lark
    grammar in llguidance's dialect). param: the request field it came from, which a 400 names when it cannot be
    enforced. after_token_id: the constraint starts once this token was generated (thinking mode: `</think>`);
    None: from the first token."""

    kind: str
    spec: str = ""
    param: str = "response_format"
    after_token_id: int | None = None

    def __post_init__(self):
        if self.kind not in STRUCTURED_KINDS:
            raise SamplingParamError(self.param, f"structured output kind must be one of {STRUCTURED_KINDS}, "
                                                 f"got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise SamplingParamError(self.param, f"{self.param}: the grammar or schema must be text")


@dataclass
class SamplingParams:
    """Per-request sampling settings; field names and defaults follow vLLM / the OpenAI API.

    Every value is checked once, here, against finite bounds (module constants above), so that sampling
    cannot fail for a request that was accepted. `top_k` 0 or -1 disables top-k; `stop` is normalised to a
    list; `logprobs` / `prompt_logprobs` are the number of top alternatives to report per token (None = do not
    report). `output_kind` chooses cumulative, delta or final-only outputs (`RequestOutputKind`).
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
    output_kind: str = RequestOutputKind.CUMULATIVE
    # Logprob.decoded_token of every reported entry, decoded in the engine's step. The HTTP server renders token
    # strings itself and turns this off: 21 decodes per token at logprobs=20, made and shipped for nothing.
    decode_logprobs: bool = True
    structured: StructuredOutput | None = None  # grammar-constrained output (JSON schema, JSON object, Lark)

    def __post_init__(self) -> None:
        _check_int("n", self.n, minimum=1, maximum=1024)
        _check_int("max_tokens", self.max_tokens, minimum=1, maximum=1 << 30)
        _check_int("min_tokens", self.min_tokens, minimum=0, maximum=self.max_tokens)
        self.temperature = _check_number("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        self.top_p = _check_number("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0:
            raise SamplingParamError("top_p", "top_p must be in (0, 1], got 0 (use temperature 0 for greedy)")
        _check_int("top_k", self.top_k, minimum=-1, maximum=MAX_TOP_K)
        self.min_p = _check_number("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        self.stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(self.stop, (list, tuple, type(None))):
            raise SamplingParamError("stop", f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop or [])
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamError("stop", f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop or len(stop) > MAX_STOP_LEN:
                raise SamplingParamError("stop", f"stop strings must be non-empty strings of at most {MAX_STOP_LEN} "
                                                 f"characters, got {stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple, type(None))):
            raise SamplingParamError("stop_token_ids", f"stop_token_ids must be a list of token ids, "
                                                       f"got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamError("stop_token_ids", f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, minimum=0, maximum=MAX_TOP_K)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0, maximum=MAX_LOGPROBS)
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, _check_number(name, getattr(self, name), -MAX_PENALTY, MAX_PENALTY))
        self.repetition_penalty = _check_number("repetition_penalty", self.repetition_penalty,
                                                MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamError(name, f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise SamplingParamError("structured", f"structured must be a StructuredOutput, "
                                                       f"got {self.structured!r}")
            # The grammar ends the output with eos once it is complete: eos cannot be banned or ignored.
            for name in ("ignore_eos", "min_tokens"):
                if getattr(self, name):
                    raise SamplingParamError(name, f"{name} cannot be combined with a structured output "
                                                   f"({self.structured.param}): the grammar decides where it ends")
        if self.output_kind not in RequestOutputKind.ALL:
            raise SamplingParamError("output_kind", f"output_kind must be one of {RequestOutputKind.ALL}, "
                                                    f"got {self.output_kind!r}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0 or below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def stop_holdback(self) -> int:
        """Characters of text held back while streaming: the longest stop string could still begin there."""
        return max((len(s) for s in self.stop), default=1) - 1


def _check_int(name: str, value: object, minimum: int, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SamplingParamError(name, f"{name} must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise SamplingParamError(name, f"{name} must be in [{minimum}, {maximum}], got {value}")


def _check_number(name: str, value: object, minimum: float, maximum: float) -> float:
    """A finite int or float in [minimum, maximum], returned as float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SamplingParamError(name, f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        raise SamplingParamError(name, f"{name} must be in [{minimum}, {maximum}], got {value}") from None
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise SamplingParamError(name, f"{name} must be a finite number in [{minimum}, {maximum}], got {value}")
    return value


def _normalise_logit_bias(logit_bias: dict | None) -> dict[int, float] | None:
    """JSON gives string keys ("50256": -100); accept them and return {int id: float bias}."""
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, dict):
        raise SamplingParamError("logit_bias", f"logit_bias must be a dict of token id -> bias, "
                                               f"got {type(logit_bias).__name__}")
    if len(logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise SamplingParamError("logit_bias", f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries")
    normalised = {}
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise SamplingParamError("logit_bias", f"logit_bias keys must be token ids, got {key!r}") from None
        if not 0 <= token_id < MAX_TOP_K:
            raise SamplingParamError("logit_bias", f"logit_bias token ids must be in [0, {MAX_TOP_K}), got {key!r}")
        normalised[token_id] = _check_number("logit_bias", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
    return normalised


@dataclass
class Logprob:
    """One entry of a logprobs dict, as vLLM: log-probability, 1-based rank, and the token's text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def check_stop(text: str, new_text_start: int, stop: list[str]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None.

    Only matches that end at or after `new_text_start` are new, so each stop string s is searched from
    max(0, new_text_start - len(s) + 1). The caller truncates `text` at the returned index, dropping the
    stop string itself (vLLM's default, include_stop_str_in_output=False).
    """
    cuts = [text.find(s, max(0, new_text_start - len(s) + 1)) for s in stop]
    found = [cut for cut in cuts if cut >= 0]
    return min(found) if found else None
