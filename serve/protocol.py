"""OpenAI API request validation and response shapes (completions, chat completions), as plain functions.

Every invalid field becomes an `APIError` with status 400 and `param` naming it, in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from v4ray.model.chat import ChatFormatError, render_chat, split_reasoning
from v4ray.engine.json_input import JSONInputError, loads_strict, lone_surrogate_path, printable
from v4ray.engine.outputs import RequestOutput
from v4ray.engine.sampling import SamplingParamError, SamplingParams
from v4ray.model.tokenizer import V4Tokenizer


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        message, param = printable(message), None if param is None else printable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400: strict JSON (`engine/json_input.py`: UTF-8, nesting, no NaN) whose
    strings are all valid Unicode (the 400 names the field holding a lone surrogate)."""
    try:
        body = loads_strict(raw)
    except JSONInputError as e:
        raise APIError(400, f"request body: {e}", code=e.code) from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    bad = lone_surrogate_path(body)
    if bad is not None:
        raise APIError(400, f"'{bad}' holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode",
                       param=bad or None, code="invalid_encoding")
    return body


# Fields each endpoint takes. Anything else is refused with a 400 naming it (vLLM's behaviour), except the
# fields listed in IGNORED_FIELDS, which OpenAI clients send routinely and which change nothing here.
SAMPLING_FIELDS = {"model", "n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "min_tokens", "seed", "stop",
                   "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty",
                   "logit_bias", "skip_special_tokens", "stream", "stream_options"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo", "logprobs"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                                 "chat_template_kwargs", "tools", "tool_choice", "functions", "response_format"}
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier"}
TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens"}
DETOKENIZE_FIELDS = {"model", "tokens"}


def check_fields(body: dict, allowed: set[str]) -> None:
    """A 400 naming the first field of `body` outside `allowed`."""
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise bad(unknown[0], f"unknown field(s) {unknown}: not supported by this endpoint; remove them "
                              f"(supported: {sorted(allowed)})")


def _typed(body: dict, name: str, types, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad(name, f"'{name}' must be of type {types}, got a boolean")
    if not isinstance(v, types):
        raise bad(name, f"'{name}' has the wrong type: got {type(v).__name__}")
    return v


@dataclass
class Parsed:
    kind: str                      # "completion" | "chat"
    prompt_ids: list[int]
    prompt_text: str
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    thinking: bool = False
    chat_logprobs: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])


def parse_request(kind: str, body: dict, tokenizer: V4Tokenizer, max_model_len: int, max_n: int,
                  model_name: str, max_output_entries: int | None = None) -> Parsed:
    """Validate one completions/chat body. `max_output_entries` caps n x (logprobs + 1) x max_tokens: the
    size of what one request may make the server produce and send."""
    check_fields(body, (CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS) | IGNORED_FIELDS)
    model = body.get("model")
    if model is None:
        raise bad("model", "'model' is required")
    if model != model_name:
        raise APIError(404, f"model {model!r} does not exist; this server serves {model_name!r}", param="model",
                       code="model_not_found", type_="invalid_request_error")
    thinking = False
    if kind == "chat":
        kwargs = _typed(body, "chat_template_kwargs", dict, {})
        for key in kwargs:
            if key not in ("thinking", "enable_thinking"):
                raise bad(f"chat_template_kwargs.{key}", f"unknown chat_template_kwargs key {key!r} "
                                                         f"(supported: 'thinking', 'enable_thinking')")
            if not isinstance(kwargs[key], bool):
                raise bad(f"chat_template_kwargs.{key}", f"chat_template_kwargs.{key} must be a boolean")
        thinking = bool(kwargs.get("thinking", kwargs.get("enable_thinking", False)))
        try:
            text = render_chat(body.get("messages"), thinking=thinking)
        except ChatFormatError as e:
            raise bad(e.param, str(e))
        ids = tokenizer.encode(text, add_bos=False)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids, text = list(prompt), tokenizer.decode(prompt, skip_special_tokens=False)
            if any(not 0 <= t < tokenizer.vocab_size for t in ids):
                raise bad("prompt", f"token ids must be in [0, {tokenizer.vocab_size})")
        elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            text = prompt[0]
            ids = tokenizer.encode(text)
        elif isinstance(prompt, str):
            text = prompt
            ids = tokenizer.encode(text)
        else:
            raise bad("prompt", "'prompt' must be a non-empty string, a list of one string, or a list of token ids")
        if not text and len(ids) <= 1:
            raise bad("prompt", "'prompt' is empty")
    if len(ids) >= max_model_len:
        raise bad("messages" if kind == "chat" else "prompt",
                  f"the prompt has {len(ids)} tokens; this model's context is {max_model_len} tokens")
    room = max_model_len - len(ids)
    mt_name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _typed(body, mt_name, int, 16 if kind == "completion" else room)
    if max_tokens <= 0:
        raise bad(mt_name, f"'{mt_name}' must be at least 1, got {max_tokens}")
    if max_tokens > room:
        raise bad(mt_name, f"'{mt_name}' is {max_tokens} but only {room} tokens remain in the {max_model_len}-token "
                           f"context after the {len(ids)}-token prompt")
    n = _typed(body, "n", int, 1)
    if not 1 <= n <= max_n:
        raise bad("n", f"'n' must be between 1 and {max_n}, got {n}")
    logprobs, chat_logprobs = None, False
    if kind == "chat":
        chat_logprobs = bool(_typed(body, "logprobs", bool, False))
        top = _typed(body, "top_logprobs", int, 0)
        if not 0 <= top <= 20:
            raise bad("top_logprobs", f"'top_logprobs' must be between 0 and 20, got {top}")
        if top and not chat_logprobs:
            raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        logprobs = top if chat_logprobs else None
    else:
        logprobs = _typed(body, "logprobs", int, None)
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise bad("logprobs", f"'logprobs' must be between 0 and 20, got {logprobs}")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str)
                                                                                          for s in stop))):
        raise bad("stop", "'stop' must be a string or a list of strings")
    if isinstance(stop, list) and len(stop) > 4:
        raise bad("stop", "'stop' may hold at most 4 sequences")
    stream_options = _typed(body, "stream_options", dict, {})
    for key, value in stream_options.items():
        if key not in ("include_usage", "continuous_usage_stats"):
            raise bad(f"stream_options.{key}", f"unknown stream_options key {key!r} (supported: 'include_usage')")
        if not isinstance(value, bool):
            raise bad(f"stream_options.{key}", f"stream_options.{key} must be a boolean")
    if max_output_entries is not None and n * ((logprobs or 0) + 1) * max_tokens > max_output_entries:
        raise bad("logprobs" if logprobs else mt_name,
                  f"n x (logprobs + 1) x {mt_name} = {n} x {(logprobs or 0) + 1} x {max_tokens} = "
                  f"{n * ((logprobs or 0) + 1) * max_tokens} exceeds this server's max_output_entries "
                  f"({max_output_entries}); lower n, logprobs or {mt_name}")
    try:
        params = SamplingParams(
            n=n, max_tokens=max_tokens, min_tokens=_typed(body, "min_tokens", int, 0),
            temperature=_typed(body, "temperature", (int, float), 1.0),
            top_p=_typed(body, "top_p", (int, float), 1.0), top_k=_typed(body, "top_k", int, 0),
            min_p=_typed(body, "min_p", (int, float), 0.0), seed=_typed(body, "seed", int, None),
            stop=stop, stop_token_ids=_typed(body, "stop_token_ids", list, None),
            ignore_eos=bool(_typed(body, "ignore_eos", bool, False)), logprobs=logprobs,
            presence_penalty=_typed(body, "presence_penalty", (int, float), 0.0),
            frequency_penalty=_typed(body, "frequency_penalty", (int, float), 0.0),
            repetition_penalty=_typed(body, "repetition_penalty", (int, float), 1.0),
            logit_bias=_typed(body, "logit_bias", dict, None),
            skip_special_tokens=bool(_typed(body, "skip_special_tokens", bool, True)))
    except SamplingParamError as e:
        raise bad(e.param, str(e))
    if params.logit_bias and any(t >= tokenizer.vocab_size for t in params.logit_bias):
        raise bad("logit_bias", f"logit_bias token ids must be below {tokenizer.vocab_size}")
    if params.stop_token_ids and any(not isinstance(t, int) or t < 0 for t in params.stop_token_ids):
        raise bad("stop_token_ids", "'stop_token_ids' must be non-negative integers")
    for name in ("tools", "tool_choice", "functions", "response_format"):
        if body.get(name) not in (None, [], {}, "none", "auto") or (name == "response_format" and body.get(name)
                                                                   not in (None, {"type": "text"})):
            raise bad(name, f"'{name}' is not supported yet (tool calls and structured output are out of scope)")
    return Parsed(kind, ids, text, params, bool(_typed(body, "stream", bool, False)),
                  bool(stream_options.get("include_usage", False)), bool(_typed(body, "echo", bool, False)),
                  thinking, chat_logprobs)


# ---- responses -------------------------------------------------------------------------------------------

def usage(out: RequestOutput) -> dict:
    return usage_counts(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs), out.num_cached_tokens)


def usage_counts(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


def _positions(c) -> Iterator[tuple[int, list[tuple[int, float, int | None]]]]:
    """(chosen token, [(token id, logprob, rank), ...]) per position of a completion's logprobs (FlatLogprobs)."""
    for i, tok in enumerate(c.token_ids):
        yield tok, [(t, lp, r) for t, lp, r, _ in c.logprobs.entries(i)]


def completion_logprobs(c, tokenizer: V4Tokenizer, text_offset: int = 0) -> dict | None:
    if c.logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    at = text_offset
    decode = tokenizer.decode_token
    for tok, entries in _positions(c):
        s = decode(tok)
        tokens.append(s), offsets.append(at)
        lps.append(next(lp for t, lp, _ in entries if t == tok))
        tops.append({decode(t): lp for t, lp, _ in entries})
        at += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(c, tokenizer: V4Tokenizer, top: int) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    decode = tokenizer.decode_token
    for tok, entries in _positions(c):
        s = decode(tok)
        ranked = sorted(entries, key=lambda e: e[2] or 0)[:top]
        content.append({"token": s, "logprob": next(lp for t, lp, _ in entries if t == tok), "bytes": list(s.encode()),
                        "top_logprobs": [{"token": decode(t), "logprob": lp, "bytes": list(decode(t).encode())}
                                         for t, lp, _ in ranked]})
    return {"content": content}


def chat_message(text: str, thinking: bool) -> dict:
    if thinking:
        reasoning, content = split_reasoning(text)
        return {"role": "assistant", "content": content, "reasoning_content": reasoning}
    return {"role": "assistant", "content": text}


def final_body(p: Parsed, out: RequestOutput, model: str, tokenizer: V4Tokenizer) -> dict:
    created = int(time.time())
    if p.kind == "chat":
        choices = [{"index": c.index, "message": chat_message(c.text, p.thinking),
                    "logprobs": chat_logprobs(c, tokenizer, p.params.logprobs or 0) if p.chat_logprobs else None,
                    "finish_reason": c.finish_reason} for c in out.outputs]
        return {"id": f"chatcmpl-{p.request_id}", "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": usage(out)}
    prefix = p.prompt_text if p.echo else ""
    choices = [{"index": c.index, "text": prefix + c.text,
                "logprobs": completion_logprobs(c, tokenizer, len(prefix)) if p.params.logprobs is not None else None,
                "finish_reason": c.finish_reason} for c in out.outputs]
    return {"id": f"cmpl-{p.request_id}", "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(out)}


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
