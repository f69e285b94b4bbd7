"""OpenAI API request validation and response shapes (completions, chat completions), as plain functions.

Every invalid field becomes an `APIError` with status 400 and `param` naming it, in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from v4ray.model.chat import (CALLS_START, END_THINK, INVOKE_CLOSE, INVOKE_OPEN, PARAM, REASONING_EFFORTS,
                              ChatFormatError, ToolCallParseError, param_value, parse_completion, parse_tool_calls,
                              render_chat, tool_call_grammar)
from v4ray.engine.json_input import JSONInputError, loads_strict, lone_surrogate_path, printable
from v4ray.engine.outputs import RequestOutput
from v4ray.engine.grammar import check_grammar
from v4ray.engine.sampling import SamplingParamError, SamplingParams, StructuredOutput
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
                                 "chat_template_kwargs", "tools", "tool_choice", "parallel_tool_calls",
                                 "reasoning_effort", "functions", "response_format"}
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for function names
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
    tools: list[dict] | None = None      # the request's function tools, when their calls are parsed from the output
    parallel_tool_calls: bool = True
    forced_tools: bool = False           # tool_choice 'required' or named: the output is a DSML block (grammar)
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
        tools, tool_choice = parse_tools(body)
        effort = _typed(body, "reasoning_effort", str, None)
        if effort is not None and effort not in REASONING_EFFORTS:
            raise bad("reasoning_effort", f"reasoning_effort must be one of {list(REASONING_EFFORTS)}; only 'max' "
                                          f"changes the prompt (in thinking mode)")
        response_format = parse_response_format(body)
        try:
            text = render_chat(body.get("messages"), thinking=thinking, tools=tools, reasoning_effort=effort,
                               response_format=response_format)
        except ChatFormatError as e:
            raise bad(e.param, str(e))
        parsed_tools = tools if tools and tool_choice != "none" else None
        parallel = bool(_typed(body, "parallel_tool_calls", bool, True))
        structured = structured_output(tools, tool_choice, parallel, response_format, thinking, tokenizer)
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
            skip_special_tokens=bool(_typed(body, "skip_special_tokens", bool, True)),
            structured=structured if kind == "chat" else None)
    except SamplingParamError as e:
        raise bad(e.param, str(e))
    if params.logit_bias and any(t >= tokenizer.vocab_size for t in params.logit_bias):
        raise bad("logit_bias", f"logit_bias token ids must be below {tokenizer.vocab_size}")
    if params.stop_token_ids and any(not isinstance(t, int) or t < 0 for t in params.stop_token_ids):
        raise bad("stop_token_ids", "'stop_token_ids' must be non-negative integers")
    if body.get("functions") not in (None, []):
        raise bad("functions", "'functions' is OpenAI's deprecated form: send 'tools' "
                               "([{'type': 'function', 'function': {...}}]) instead")
    out = Parsed(kind, ids, text, params, bool(_typed(body, "stream", bool, False)),
                 bool(stream_options.get("include_usage", False)), bool(_typed(body, "echo", bool, False)),
                 thinking, chat_logprobs)
    if kind == "chat":
        out.tools, out.parallel_tool_calls = parsed_tools, parallel
        out.forced_tools = bool(tools) and tool_choice not in ("auto", "none")
    return out


def parse_tools(body: dict) -> tuple[list[dict] | None, str]:
    """`tools` (OpenAI function tools) and `tool_choice` -> (the tools, the choice: 'auto', 'none', 'required' or
    the name of the one function to call)."""
    tools = body.get("tools")
    if tools in (None, []):
        tools = None
    elif not isinstance(tools, list):
        raise bad("tools", "'tools' must be a list of {'type': 'function', 'function': {'name': ..., "
                           "'description': ..., 'parameters': {JSON schema}}}")
    else:
        names = set()
        for i, t in enumerate(tools):
            at = f"tools[{i}]"
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
                raise bad(at, "each tool must be {'type': 'function', 'function': {...}}")
            fn = t["function"]
            unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
            if unknown:
                raise bad(f"{at}.function.{unknown[0]}", f"unknown function field(s) {unknown}")
            if not isinstance(fn.get("name"), str) or not TOOL_NAME.match(fn["name"]):
                raise bad(f"{at}.function.name", "a function name is 1-64 letters, digits, '_' or '-'")
            if fn["name"] in names:
                raise bad(f"{at}.function.name", f"function {fn['name']!r} is declared twice")
            names.add(fn["name"])
            if "description" in fn and not isinstance(fn["description"], str):
                raise bad(f"{at}.function.description", "a function description must be a string")
            if "parameters" in fn:
                if not isinstance(fn["parameters"], dict):
                    raise bad(f"{at}.function.parameters", "function parameters must be a JSON schema object")
                problem = schema_problem(fn["parameters"])
                if problem:
                    raise bad(f"{at}.function.parameters", f"function parameters are not a valid JSON schema: "
                                                           f"{problem}")
    choice = body.get("tool_choice", "auto" if tools else "none")
    if choice in ("auto", "none"):
        return tools, choice
    if choice == "required" or isinstance(choice, dict):
        if not tools:
            raise bad("tool_choice", "tool_choice asks for a tool call but 'tools' is empty")
        if isinstance(choice, dict):
            fn = choice.get("function")
            if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or fn["name"] not in names:
                raise bad("tool_choice", f"tool_choice must name one of the declared functions {sorted(names)}")
            return tools, fn["name"]
        return tools, "required"
    raise bad("tool_choice", "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', "
                             "'function': {'name': ...}}")


RESPONSE_FORMAT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for json_schema.name


def parse_response_format(body: dict) -> dict | None:
    """`response_format`: None for plain text, else the validated {'type': 'json_object'} or {'type':
    'json_schema', 'json_schema': {'name', 'schema', 'description'?, 'strict'?}} (as it goes into the prompt)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format.type", "response_format must be {'type': 'text'}, {'type': 'json_object'} or "
                                          "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}")
    allowed = {"type", "json_schema"} if rf["type"] == "json_schema" else {"type"}
    unknown = sorted(set(rf) - allowed)
    if unknown:
        raise bad(f"response_format.{unknown[0]}", f"unknown response_format field(s) {unknown}")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return rf
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise bad("response_format.json_schema", "a json_schema response format needs 'json_schema': {'name': ..., "
                                                 "'schema': {JSON schema}}")
    unknown = sorted(set(js) - {"name", "schema", "description", "strict"})
    if unknown:
        raise bad(f"response_format.json_schema.{unknown[0]}", f"unknown json_schema field(s) {unknown}")
    if not isinstance(js.get("name"), str) or not RESPONSE_FORMAT_NAME.match(js["name"]):
        raise bad("response_format.json_schema.name", "json_schema.name is required: 1-64 letters, digits, '_' or '-'")
    if not isinstance(js.get("schema"), dict):
        raise bad("response_format.json_schema.schema", "json_schema.schema must be a JSON schema object")
    for key, kind in (("description", str), ("strict", bool)):
        if key in js and not isinstance(js[key], kind):
            raise bad(f"response_format.json_schema.{key}", f"json_schema.{key} must be a {kind.__name__}")
    return rf


def structured_output(tools: list[dict] | None, tool_choice: str, parallel: bool, response_format: dict | None,
                      thinking: bool, tokenizer: V4Tokenizer) -> StructuredOutput | None:
    """What the grammar enforces for a chat request: a forced tool call (tool_choice 'required' or a function's
    name: the DSML block, `tool_call_grammar`), else the response format; in thinking mode from `</think>` on.
    A grammar the library cannot compile is a 400 naming its field."""
    if tools and tool_choice not in ("auto", "none"):
        name = None if tool_choice == "required" else tool_choice
        kind, spec, param = "grammar", tool_call_grammar(tools, name, parallel), "tools"
    elif response_format is not None and response_format["type"] == "json_object":
        kind, spec, param = "json_object", "", "response_format"
    elif response_format is not None:
        kind, spec = "json_schema", json.dumps(response_format["json_schema"]["schema"])
        param = "response_format.json_schema.schema"
    else:
        return None
    after = tokenizer.token_id(END_THINK) if thinking else None
    if thinking and after is None:
        raise bad(param, f"structured output in thinking mode needs {END_THINK!r} to be one token of this tokenizer; "
                         f"turn thinking off")
    structured = StructuredOutput(kind, spec, param, after)
    try:
        check_grammar(structured)
    except SamplingParamError as e:
        raise bad(e.param, str(e))
    return structured


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


def schema_problem(schema: dict) -> str | None:
    """Why `schema` is not a valid JSON schema (its own metaschema's verdict), or None."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return e.message[:300]
    return None


def arguments_problem(args: dict, schema: dict | None) -> str | None:
    """Why a call's arguments fail its function's parameters schema, or None (no schema: anything goes)."""
    import jsonschema

    if not schema:
        return None
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(args))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where + ': ' if where else ''}{error.message[:300]}"


def call_id(request_id: str, index: int, k: int) -> str:
    """The id of call k of choice `index` (the same streamed and not)."""
    return f"call_{request_id[:12]}_{index}_{k}"


def tool_calls_of(block: str | None, tools: list[dict] | None, parallel: bool, request_id: str,
                  index: int = 0) -> tuple[list[dict] | None, str | None]:
    """A completion's DSML block -> (OpenAI tool_calls, None), or (None, why) when it does not parse, calls an
    undeclared function or passes arguments its parameters schema rejects: the block then stays in the content,
    reported, never turned into a made-up call."""
    if block is None or not tools:
        return None, None
    try:
        calls = parse_tool_calls(block)
    except ToolCallParseError as e:
        return None, str(e)
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in tools}
    unknown = [name for name, _ in calls if name not in schemas]
    if unknown:
        return None, f"call to undeclared function(s) {unknown}"
    for name, args in calls:
        problem = arguments_problem(args, schemas[name])
        if problem:
            return None, f"the arguments of {name!r} do not match its parameters: {problem}"
    if not parallel:
        calls = calls[:1]
    return [{"id": call_id(request_id, index, k), "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
            for k, (name, args) in enumerate(calls)], None




class ToolCallStream:
    """OpenAI `delta.tool_calls` entries of a forced call's DSML block while it is generated (the grammar fixes
    its structure, so every complete piece can go out at once): a call's id and name when its invoke opens, then
    one argument fragment per complete parameter and the closing brace. The fragments of a call join to exactly
    the non-streamed `arguments` (json.dumps of the arguments), and the ids are the non-streamed ones."""

    def __init__(self, request_id: str, index: int):
        self.request_id, self.index = request_id, index
        self.pos = 0          # how much of the content has been turned into deltas
        self.calls = 0        # invokes opened so far
        self.params = 0       # parameters of the open invoke sent so far

    def feed(self, content: str) -> list[dict]:
        """The entries that the content so far completes (content: the whole completion's content)."""
        out = []
        while True:
            rest = content[self.pos:]
            if self.pos == 0:
                if not rest.startswith(CALLS_START + "\n"):
                    return out
                self.pos = len(CALLS_START) + 1
            elif m := INVOKE_OPEN.match(rest):
                k, self.calls, self.params = self.calls, self.calls + 1, 0
                out.append({"index": k, "id": call_id(self.request_id, self.index, k), "type": "function",
                            "function": {"name": m.group(1), "arguments": ""}})
                self.pos += m.end()
            elif m := PARAM.match(rest):
                name, is_string, raw = m.groups()
                value = param_value(is_string, raw)
                piece = f"{'{' if self.params == 0 else ', '}{json.dumps(name, ensure_ascii=False)}: " \
                        f"{json.dumps(value, ensure_ascii=False)}"
                out.append({"index": self.calls - 1, "function": {"arguments": piece}})
                self.params += 1
                self.pos += m.end()
            elif rest.startswith(INVOKE_CLOSE):
                out.append({"index": self.calls - 1, "function": {"arguments": "}" if self.params else "{}"}})
                self.pos += len(INVOKE_CLOSE)
            elif rest.startswith("\n"):   # between calls, before the block's close, or an empty parameter list
                self.pos += 1
            else:
                return out


def chat_message(text: str, thinking: bool, p: "Parsed | None" = None, index: int = 0) -> tuple[dict, bool]:
    """-> (the assistant message, whether it carries tool calls)."""
    reasoning, content, block = parse_completion(text, thinking)
    msg = {"role": "assistant", "content": content}
    if thinking:
        msg["reasoning_content"] = reasoning
    calls, _ = tool_calls_of(block, p.tools if p else None, p.parallel_tool_calls if p else True,
                             p.request_id if p else "", index)
    if calls:
        msg["content"] = content or None
        msg["tool_calls"] = calls
    elif block is not None:
        msg["content"] = content + "\n\n" + block   # not a valid call: the text as generated
    return msg, bool(calls)


def final_body(p: Parsed, out: RequestOutput, model: str, tokenizer: V4Tokenizer) -> dict:
    created = int(time.time())
    if p.kind == "chat":
        choices = []
        for c in out.outputs:
            msg, called = chat_message(c.text, p.thinking, p, c.index)
            choices.append({"index": c.index, "message": msg,
                            "logprobs": chat_logprobs(c, tokenizer, p.params.logprobs or 0) if p.chat_logprobs
                            else None,
                            "finish_reason": "tool_calls" if called and c.finish_reason == "stop" else c.finish_reason})
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
