"""Strict JSON for request input (HTTP bodies, batch-scoring rows), checked before anything else reads it:
valid UTF-8, nesting at most MAX_JSON_DEPTH (measured before parsing, so a 100k-deep body never reaches the
recursive parser), no NaN/Infinity literals, and strings that are valid Unicode (JSON's "\\ud800" escapes decode
to lone surrogates, which the tokenizer and every encoder reject)."""

from __future__ import annotations

import json
import re

MAX_JSON_DEPTH = 64  # nesting of objects/arrays; chat content parts need 5, real batch rows fewer than 10

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: linear time, no backtracking blow-up
_BRACKET = re.compile(rb"[\[\]{}]")


class JSONInputError(ValueError):
    """Input that is not strict JSON; `code` is "invalid_encoding" or "invalid_json" (OpenAI error codes)."""

    def __init__(self, message: str, code: str = "invalid_json"):
        super().__init__(message)
        self.code = code


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', raw)):
        depth += 1 if m.group() in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def loads_strict(raw: bytes):
    """Parse `raw` under the rules above; JSONInputError otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONInputError(f"not valid UTF-8 (byte {e.start})", "invalid_encoding") from None
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise JSONInputError(f"JSON nested {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, NaN/Infinity, int digit limits
        raise JSONInputError(f"not valid JSON: {e}") from None


def lone_surrogate_path(value, path: str = "") -> str | None:
    """The path (`messages[0].content`, a key's path for a bad key) of the first string in `value` that is not
    valid Unicode, or None. Iterative, so any depth is fine."""
    stack = [(value, path)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            if not _encodable(v):
                return at
        elif isinstance(v, dict):
            for k, item in v.items():
                where = f"{at}.{k}" if at else str(k)
                if not _encodable(k):
                    return printable(where)
                stack.append((item, where))
        elif isinstance(v, list):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(v))
    return None


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(s: str) -> str:
    """`s` made encodable: a client's lone surrogates (echoed in a field path or message) become escapes."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")
