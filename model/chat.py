"""DeepSeek-V4's chat encoding (the `encoding_dsv4` format DeepSeek ships beside the weights), written from its
rules (docs/architecture.md §14 lists them with the tests that pin each one):

* BOS, then each message in order. A system (or the first system's tools and response format, as "## Tools" and
  "## Response Format" sections) is raw text with no role token; a user or developer turn is `<｜User｜>` + text;
  an assistant turn is its kept reasoning + `</think>`, its content, its tool calls as a DSML block, then EOS.
* After a user or developer turn that an assistant turn (or the generation) follows: `<｜Assistant｜>` and
  `<think>` in thinking mode, `</think>` in chat mode. In thinking mode, reasoning before the last user turn is
  dropped (and those turns open with `</think>`) unless tools are present anywhere.
* There is no tool role: tool results join the user turn that follows (or a turn of their own) as
  `<tool_result>...</tool_result>` blocks in the order of the calls, blocks of one turn joined by a blank line;
  consecutive user messages join one turn the same way.
* `reasoning_effort: "max"` in thinking mode puts a fixed instruction right after BOS.

`parse_completion` reads a completion back: reasoning up to the first `</think>` (thinking mode), content up to a
DSML tool-calls block, and the calls in it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
DSML = "｜DSML｜"
CALLS_OPEN, CALLS_CLOSE = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"
CALLS_START = "\n\n" + CALLS_OPEN          # where content ends and a completion's tool calls begin
ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("max", "high", "medium", "low", "minimal", "none")

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")

TOOLS_HEAD = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    f'"{CALLS_OPEN}" block like the following:\n\n'
    f"{CALLS_OPEN}\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f"{CALLS_CLOSE}\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, '
    'arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n")
TOOLS_TAIL = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
RESPONSE_FORMAT_HEAD = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


class ChatFormatError(ValueError):
    """A malformed message; `param` names the offending field (OpenAI's error shape)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def message_text(content, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text is supported
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError("only text content parts ({'type': 'text', 'text': ...}) are supported",
                                      f"{param}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatFormatError("message content must be a string or a list of text parts", param)


# ---- tool calls as DSML -------------------------------------------------------------------------------------

PARAM_CLOSE, INVOKE_CLOSE = f"</{DSML}parameter>", f"</{DSML}invoke>"
INVOKE_OPEN = re.compile(rf'<{DSML}invoke name="([^"]*)">\n')
PARAM = re.compile(rf'<{DSML}parameter name="([^"]*)" string="(true|false)">(.*?){PARAM_CLOSE}', re.S)


def invoke_open(name: str) -> str:
    return f'<{DSML}invoke name="{name}">\n'


def param_open(name: str, as_text: bool) -> str:
    return f'<{DSML}parameter name="{name}" string="{"true" if as_text else "false"}">'


def param_value(is_string: str, raw: str):
    """A parameter's value: string="true" text as it is, anything else JSON (ValueError when it is not)."""
    return raw if is_string == "true" else json.loads(raw)


def dsml_calls(calls: list[tuple[str, dict]]) -> str:
    """[(name, arguments)] -> the DSML tool-calls block: strings as they are (string="true"), anything else as
    JSON (string="false"); one parameter per line, one invoke per call."""
    invokes = []
    for name, args in calls:
        params = "\n".join(param_open(k, isinstance(v, str)) + (v if isinstance(v, str) else _json(v)) + PARAM_CLOSE
                           for k, v in args.items())
        invokes.append(f"{invoke_open(name)}{params}\n{INVOKE_CLOSE}")
    return f"{CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{CALLS_CLOSE}"


def _call_arguments(arguments, param: str) -> dict:
    """An OpenAI tool call's `arguments` (a JSON object as a string) -> dict. A string that is not JSON is kept
    whole as one string parameter `arguments`, as the reference encoder does; JSON that is not an object is an
    error."""
    if isinstance(arguments, dict):
        return {"arguments": arguments}
    if not isinstance(arguments, str):
        raise ChatFormatError("tool call arguments must be a JSON object encoded as a string", param)
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"arguments": arguments}
    if not isinstance(value, dict):
        raise ChatFormatError("tool call arguments must be a JSON object", param)
    return value


# ---- messages -> prompt -------------------------------------------------------------------------------------

@dataclass
class _Turn:
    role: str                           # system | developer | user | assistant
    text: str = ""                      # system/developer/assistant content; a user turn's is in `blocks`
    blocks: list | None = None          # user turn: [("text", str) | ("tool_result", call_id, str)]
    reasoning: str = ""
    calls: list | None = None           # assistant: [(id, name, arguments dict)]
    tools: list | None = None           # system/developer: function schemas
    response_format: dict | None = None


def _turns(messages, param: str = "messages") -> list[_Turn]:
    """Validate OpenAI messages and merge them the V4 way: tool results and consecutive user messages into one
    user turn; tool results sorted by the order of the calls of the assistant turn before them."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list", param)
    turns: list[_Turn] = []
    order: dict[str, int] = {}          # call id -> position, from the latest assistant turn with calls
    for i, m in enumerate(messages):
        at = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise ChatFormatError("each message must be an object with 'role' and 'content'", at)
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"role must be one of {list(ROLES)}, got {role!r}", f"{at}.role")
        if role != "assistant" and "content" not in m:
            raise ChatFormatError("message has no content", f"{at}.content")
        content = m.get("content")
        if role == "tool" and isinstance(content, list):    # a tool result's text parts are separate paragraphs
            content = "\n\n".join(message_text([p], f"{at}.content") for p in content)
        text = message_text(content, f"{at}.content")
        last = turns[-1] if turns else None
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ChatFormatError("a tool message needs the tool_call_id of the call it answers",
                                      f"{at}.tool_call_id")
            block = ("tool_result", call_id, text)
            if last is not None and last.role == "user":
                last.blocks.append(block)
            else:
                turns.append(_Turn("user", blocks=[block]))
        elif role == "user":
            if last is not None and last.role == "user":
                last.blocks.append(("text", text))
            else:
                turns.append(_Turn("user", blocks=[("text", text)]))
        elif role == "assistant":
            calls = []
            if not isinstance(m.get("tool_calls") or [], list):
                raise ChatFormatError("tool_calls must be a list", f"{at}.tool_calls")
            for j, c in enumerate(m.get("tool_calls") or []):
                cp = f"{at}.tool_calls[{j}]"
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise ChatFormatError("a tool call needs function.name and function.arguments", cp)
                if not isinstance(c.get("id", ""), str):
                    raise ChatFormatError("a tool call's id must be a string", f"{cp}.id")
                calls.append((c.get("id") or "", fn["name"], _call_arguments(fn.get("arguments", "{}"),
                                                                             f"{cp}.function.arguments")))
            if calls:
                order = {cid: k for k, (cid, _, _) in enumerate(calls) if cid}
            reasoning = m.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise ChatFormatError("reasoning_content must be a string", f"{at}.reasoning_content")
            turns.append(_Turn("assistant", text=text, reasoning=reasoning or "", calls=calls))
        elif role == "developer" and not text:
            raise ChatFormatError("a developer message needs content", f"{at}.content")
        else:
            turns.append(_Turn(role, text=text))
        if role in ("tool", "user") and order:   # tool results in the order of the calls they answer
            blocks = turns[-1].blocks
            slots = [k for k, b in enumerate(blocks) if b[0] == "tool_result"]
            ordered = sorted((blocks[k] for k in slots), key=lambda b: order.get(b[1], 0))
            for k, b in zip(slots, ordered):
                blocks[k] = b
    return turns


def _user_text(turn: _Turn) -> str:
    return "\n\n".join(b[1] if b[0] == "text" else f"<tool_result>{b[2]}</tool_result>" for b in turn.blocks)


def render_chat(messages, thinking: bool = False, tools: list | None = None, response_format: dict | None = None,
                reasoning_effort: str | None = None, drop_thinking: bool = True, generation: bool = True) -> str:
    """OpenAI-style messages -> the V4 prompt text. `tools` (OpenAI function tools, already validated) and
    `response_format` go into the first system message (an empty one is added when there is none). generation:
    the prompt ends with the open assistant turn the model completes, so the last message must be a user turn (or
    tool results); False renders a finished conversation (a prefix to cache, a training example). drop_thinking:
    in thinking mode, drop the reasoning of turns before the last user turn (the model's own convention)."""
    turns = _turns(messages)
    if generation and turns[-1].role not in ("user", "developer"):
        raise ChatFormatError("the last message must be from the user (or a tool result)",
                              f"messages[{len(messages) - 1}].role")
    if tools or response_format:
        if turns[0].role != "system":
            turns.insert(0, _Turn("system"))
        turns[0].tools = [t["function"] for t in tools] if tools else None
        turns[0].response_format = response_format or None
    keep_reasoning = not thinking or not drop_thinking or any(t.tools for t in turns)   # tools: all keep theirs
    users = [k for k, t in enumerate(turns) if t.role in ("user", "developer")]
    last_user = users[-1] if users else -1
    if thinking and not keep_reasoning:    # earlier developer turns go; earlier assistant turns lose reasoning
        turns = [t for k, t in enumerate(turns) if k >= last_user or t.role != "developer"]
        users = [k for k, t in enumerate(turns) if t.role in ("user", "developer")]
        last_user = users[-1] if users else -1
    out = [BOS]
    if thinking and reasoning_effort == "max":
        out.append(REASONING_EFFORT_MAX)
    for k, t in enumerate(turns):
        if t.role == "system":
            out.append(t.text)
        elif t.role in ("user", "developer"):
            out.append(USER + (_user_text(t) if t.role == "user" else t.text))
        else:
            if thinking and (keep_reasoning or k > last_user):
                out.append(t.reasoning + END_THINK)
            out.append(t.text)
            if t.calls:
                out.append("\n\n" + dsml_calls([(name, args) for _, name, args in t.calls]))
            out.append(EOS)
        if t.tools:
            out.append("\n\n" + TOOLS_HEAD + "\n".join(_json(f) for f in t.tools) + TOOLS_TAIL)
        if t.response_format:
            out.append("\n\n" + RESPONSE_FORMAT_HEAD + _json(t.response_format))
        following = turns[k + 1].role if k + 1 < len(turns) else "assistant"   # the generation follows the last
        if t.role in ("user", "developer") and following == "assistant":
            out.append(ASSISTANT + (THINK if thinking and (keep_reasoning or k >= last_user) else END_THINK))
    return "".join(out)


# ---- the grammar of a forced tool call ----------------------------------------------------------------------

# JSON that constrained output writes (response formats, string="false" parameters; llguidance's options): no free
# whitespace (a model that may emit any amount of it can loop in it until max_tokens, leaving JSON that does not
# parse), and the separators OpenAI's models and json.dumps use.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lark(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Lark string literal (JSON escapes)


def tool_call_grammar(tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
    """The Lark grammar (llguidance's dialect) of a completion that is only a DSML tool-calls block, as
    `dsml_calls` writes it after empty content: one call (or, with `parallel`, one or more) to `name` or to any
    of `tools` (OpenAI function tools). Each call's parameters follow the function's JSON schema: its properties
    in schema order, the required ones always and the others optionally; a string property as text
    (string="true", up to its maxLength, or one of its enum values), anything else as JSON that matches the
    property's schema (string="false")."""
    nl = _lark("\n")
    rules, invokes = [], []
    for t, fn in enumerate(tool["function"] for tool in tools):
        if name is not None and fn["name"] != name:
            continue
        schema = fn.get("parameters") or {}
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        items = []
        for k, (prop, sub) in enumerate(props.items()):
            sub = sub if isinstance(sub, dict) else {}
            rule, value = f"p_{t}_{k}", f"v_{t}_{k}"
            enum = sub.get("enum")
            as_text = sub.get("type") == "string" or bool(enum and all(isinstance(v, str) for v in enum))
            head, close = _lark(param_open(prop, as_text)), PARAM_CLOSE
            if as_text and not enum:   # text up to the parameter's close tag (lazy: the first close ends it)
                limit = sub.get("maxLength")
                length = f"{{0,{limit}}}" if isinstance(limit, int) and not isinstance(limit, bool) else "*"
                rules += [f"{rule}: {head} {value} {nl}", f"{value}[suffix={_lark(close)}]: /(?s:.{length})/"]
            else:
                rules.append(f"{rule}: {head} {value} {_lark(close)} {nl}")
                if as_text:
                    rules.append(f"{value}: " + " | ".join(_lark(v) for v in enum))
                else:
                    value_schema = json.dumps({**sub, "x-guidance": JSON_STYLE}, ensure_ascii=False)
                    rules.append(f"{value}: %json {value_schema}")
            items.append(rule if prop in required else f"{rule}?")
        body = " ".join(items)
        if not required & set(props):   # no parameter given: the block has an empty line
            body = f"({body} | {nl})" if items else nl
        rules.append(f"invoke_{t}: {_lark(invoke_open(fn['name']))} {body} {_lark(INVOKE_CLOSE)}")
        invokes.append(f"invoke_{t}")
    if not invokes:
        raise ValueError(f"no tool named {name!r}")
    # Literals are lexemes and the lexer does not backtrack: none may be a prefix of another that can follow at the
    # same place, so the newline before the close is a lexeme of its own, like the one between calls.
    calls = f"invoke ({nl} invoke)*" if parallel else "invoke"
    start = f"start: {_lark(CALLS_START + chr(10))} {calls} {nl} {_lark(CALLS_CLOSE)}"
    return "\n".join([start, "invoke: " + " | ".join(invokes), *rules]) + "\n"


# ---- completion -> message ----------------------------------------------------------------------------------

_INVOKE = re.compile(rf'<{DSML}invoke name="([^"]*)">\n(.*?)\n?{INVOKE_CLOSE}', re.S)


class ToolCallParseError(ValueError):
    """A DSML tool-calls block that does not parse; the message says where."""


def parse_tool_calls(block: str) -> list[tuple[str, dict]]:
    """The text of a DSML tool-calls block (from `<｜DSML｜tool_calls>` to its close) -> [(name, arguments)].
    string="false" values must be JSON."""
    if not block.startswith(CALLS_OPEN) or not block.rstrip().endswith(CALLS_CLOSE):
        raise ToolCallParseError("the tool-calls block is not closed")
    body = block[len(CALLS_OPEN):block.rstrip().rindex(CALLS_CLOSE)]
    calls, end = [], 0
    for m in _INVOKE.finditer(body):
        if body[end:m.start()].strip():
            raise ToolCallParseError(f"unexpected text between invokes: {body[end:m.start()][:80]!r}")
        end = m.end()
        args: dict = {}
        pend = 0
        for p in PARAM.finditer(m.group(2)):
            if m.group(2)[pend:p.start()].strip():
                raise ToolCallParseError(f"unexpected text in invoke {m.group(1)!r}")
            pend = p.end()
            name, is_string, raw = p.groups()
            if name in args:
                raise ToolCallParseError(f"parameter {name!r} given twice in invoke {m.group(1)!r}")
            try:
                args[name] = param_value(is_string, raw)
            except ValueError:
                raise ToolCallParseError(f"parameter {name!r} of {m.group(1)!r} is marked JSON but is not: "
                                         f"{raw[:80]!r}") from None
        if m.group(2)[pend:].strip():
            raise ToolCallParseError(f"unexpected text in invoke {m.group(1)!r}")
        calls.append((m.group(1), args))
    if body[end:].strip() or not calls:
        raise ToolCallParseError("no well-formed invoke in the tool-calls block")
    return calls


def parse_completion(text: str, thinking: bool) -> tuple[str | None, str, str | None]:
    """A completion's text (what follows the prompt's open assistant turn, EOS removed) -> (reasoning_content or
    None in chat mode, content, the DSML tool-calls block or None). Reasoning is everything before the first
    `</think>` (all of it while that has not appeared); content ends where a tool-calls block starts."""
    reasoning = None
    if thinking:
        reasoning, content = split_reasoning(text)
    else:
        content = text
    at = content.find(CALLS_START)
    if at < 0:
        return reasoning, content, None
    return reasoning, content[:at], content[at + 2:]


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Thinking-mode output -> (reasoning_content, content); all reasoning while `</think>` has not appeared."""
    if END_THINK in text:
        reasoning, _, content = text.partition(END_THINK)
        return reasoning, content
    return text, ""
