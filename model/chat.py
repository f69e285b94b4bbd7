"""The DeepSeek-V4 chat format (as in the V3.1/V4 model repositories' chat template): BOS, the system prompt,
then `<｜User｜>` / `<｜Assistant｜>` turns; a finished assistant turn ends with EOS. Thinking mode opens the
assistant turn with `<think>` and the model writes its reasoning before `</think>`; non-thinking mode (the
default) opens it with `</think>` directly. Tiny checkpoints carry the same special tokens.
"""

from __future__ import annotations

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A malformed message; `param` names the offending field (OpenAI's error shape)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def message_text(content, param: str) -> str:
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


def render_chat(messages, thinking: bool = False) -> str:
    """OpenAI-style messages -> the prompt text, ending with an open assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list", "messages")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError("each message must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"role must be one of {list(ROLES)} (tool calls are not supported), got {role!r}",
                                  f"messages[{i}].role")
        if "content" not in m:
            raise ChatFormatError("message has no content", f"messages[{i}].content")
        text = message_text(m["content"], f"messages[{i}].content")
        if role == "system":
            if turns:
                raise ChatFormatError("system messages must come before the conversation", f"messages[{i}].role")
            system.append(text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ChatFormatError("the last message must be from the user", f"messages[{len(messages) - 1}].role")
    out = [BOS, "\n\n".join(system)]
    for role, text in turns:
        out.append(USER + text if role == "user" else ASSISTANT + END_THINK + text + EOS)
    out.append(ASSISTANT + (THINK if thinking else END_THINK))
    return "".join(out)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Thinking-mode output -> (reasoning_content, content); all reasoning while `</think>` has not appeared."""
    if END_THINK in text:
        reasoning, _, content = text.partition(END_THINK)
        return reasoning, content
    return text, ""
