"""DeepSeek-V4's chat encoding (model/chat.py): golden prompts whose expected strings were derived from the
reference encoder's rules (tests/data/chat_v4_golden.json: each case names the rule it checks), the parser of
completions, and malformed messages as errors naming the field."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from v4ray.model.chat import (BOS, CALLS_START, EOS, ChatFormatError, ToolCallParseError, dsml_calls,
                              parse_completion, parse_tool_calls, render_chat)

GOLDEN = json.loads((REPO / "tests" / "data" / "chat_v4_golden.json").read_text())


@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_golden_prompt(case):
    kwargs = {k: case[k] for k in ("tools", "response_format", "reasoning_effort", "drop_thinking", "generation")
              if k in case}
    assert render_chat(case["messages"], thinking=case["thinking"], **kwargs) == case["expected"], case["rule"]


def test_at_least_twelve_goldens_cover_tools_results_reasoning_and_effort():
    assert len(GOLDEN) >= 12
    text = " ".join(c["expected"] for c in GOLDEN)
    for marker in ("<tool_result>", "## Tools", "## Response Format", "Reasoning Effort", "<think>", "</think>",
                   CALLS_START.strip()):
        assert marker in text, marker


@pytest.mark.parametrize("args", [
    {"city": "北京", "days": 3},
    {"q": "a \"quoted\"\nmulti-line string", "n": None, "flags": [True, False], "nested": {"x": [1.5, {"y": "z"}]}},
    {},
])
def test_tool_calls_round_trip_through_dsml(args):
    block = dsml_calls([("lookup", args), ("other", {"k": "v"})])
    assert parse_tool_calls(block) == [("lookup", args), ("other", {"k": "v"})]
    reasoning, content, calls = parse_completion("thinking it over</think>Let me check." + "\n\n" + block,
                                                 thinking=True)
    assert (reasoning, content, calls) == ("thinking it over", "Let me check.", block)


def test_completion_parse_modes():
    assert parse_completion("plain answer", thinking=False) == (None, "plain answer", None)
    assert parse_completion("still thinking", thinking=True) == ("still thinking", "", None)
    assert parse_completion("r</think>a</think>b", thinking=True) == ("r", "a</think>b", None)


@pytest.mark.parametrize("block,why", [
    ("<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n", "not closed"),
    ("<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>", "no well-formed invoke"),
    ("<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"false\">{oops"
     "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>", "marked JSON but is not"),
    ("<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"true\">1"
     "</｜DSML｜parameter>\n<｜DSML｜parameter name=\"a\" string=\"true\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
     "</｜DSML｜tool_calls>", "given twice"),
])
def test_malformed_tool_calls_are_reported_not_invented(block, why):
    with pytest.raises(ToolCallParseError, match=why):
        parse_tool_calls(block)


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "messages[1].role"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}], "messages[1].tool_call_id"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
      {"role": "user", "content": "y"}], "messages[1].tool_calls[0]"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f",
                                                                                        "arguments": "[1]"}}]},
      {"role": "user", "content": "y"}], "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "developer", "content": ""}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
])
def test_malformed_messages_name_the_field(messages, param):
    with pytest.raises(ChatFormatError) as e:
        render_chat(messages)
    assert e.value.param == param


def test_a_finished_turn_ends_with_eos_and_the_prompt_opens_the_next():
    text = render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}])
    assert text.startswith(BOS) and f"b{EOS}" in text and text.endswith("<｜Assistant｜></think>")


def test_the_api_turns_a_dsml_completion_into_tool_calls_and_streams_them_held_back():
    """serve/protocol.py: a completion ending in a valid DSML block answers with tool_calls (ids, JSON-string
    arguments) and finish_reason tool_calls; an undeclared function or a malformed block stays text. The stream
    never shows any part of the block as content, whatever the chunking."""
    from v4ray.serve.deployments import OpenAIIngress
    from v4ray.serve.protocol import Parsed, chat_message

    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    p = Parsed("chat", [1], "", None, tools=tools, request_id="abc123")
    args = {"q": "x", "n": 2}
    text = "Let me look." + "\n\n" + dsml_calls([("lookup", args)])
    msg, called = chat_message(text, False, p)
    assert called and msg["content"] == "Let me look."
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "lookup" and json.loads(call["function"]["arguments"]) == args
    wrong = "hi\n\n" + dsml_calls([("other", {})])
    assert chat_message(wrong, False, p) == ({"role": "assistant", "content": wrong}, False)
    typed = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}]
    pt = Parsed("chat", [1], "", None, tools=typed, request_id="abc123")
    assert chat_message(text, False, pt)[1]                      # {"q": "x", "n": 2} matches
    mistyped = "\n\n" + dsml_calls([("lookup", {"n": "two"})])  # arguments its schema rejects: stays text
    assert chat_message(mistyped, False, pt) == ({"role": "assistant", "content": mistyped}, False)

    for step in (1, 3, 7, len(text)):            # every chunking shows the same content, never the block
        shown, before = "", ""
        for k in range(0, len(text), step):
            piece = text[k:k + step]
            delta = OpenAIIngress._chat_delta(p, before, piece, finished=k + step >= len(text))
            shown += delta.get("content", "")
            before += piece
        assert shown == "Let me look.", (step, shown)
    shown, before = "", ""
    for k in range(0, len(wrong), 5):            # not a valid call: all of it arrives as text by the end
        piece = wrong[k:k + 5]
        shown += OpenAIIngress._chat_delta(p, before, piece, finished=k + 5 >= len(wrong)).get("content", "")
        before += piece
    assert shown == wrong


@pytest.mark.parametrize("step", [1, 5, 17, 10_000])
def test_forced_calls_stream_piece_by_piece_and_join_to_the_final_calls(step):
    """serve/protocol.py ToolCallStream: under a forced tool call, the stream sends each call's id and name as its
    invoke opens, then an argument fragment per parameter and the closing brace; whatever the chunking, the
    fragments join to exactly the non-streamed calls."""
    from v4ray.serve.protocol import ToolCallStream, tool_calls_of

    tools = [{"type": "function", "function": {"name": n}} for n in ("lookup", "ping", "add")]
    calls = [("lookup", {"q": "x </y>\nz", "n": 2, "deep": {"a": [1, None, "é"]}}), ("ping", {}), ("add", {"a": -1})]
    text = "\n\n" + dsml_calls(calls)
    expect, _ = tool_calls_of(text[2:], tools, True, "req123456789abc", 1)
    stream, got, order = ToolCallStream("req123456789abc", 1), {}, []
    for k in range(0, len(text), step):
        for d in stream.feed(text[:k + step]):
            order.append((d["index"], "id" in d))
            c = got.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in d:
                assert c["id"] is None and c["arguments"] == ""              # the name comes first, once
                c["id"], c["name"] = d["id"], d["function"]["name"]
            c["arguments"] += d["function"]["arguments"]
    assert [(c["id"], c["name"], c["arguments"]) for _, c in sorted(got.items())] == \
        [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in expect]
    assert sum(1 for i, is_name in order if i == 0 and not is_name) == 4       # 3 parameters and the brace
