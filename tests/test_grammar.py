"""Grammar-constrained decoding in the engine (engine/grammar.py): the batched mask against its bit-by-bit
definition, constrained and unconstrained rows sampled together, JSON schemas and DSML tool-call grammars on the
tiny model at temperature 1.0, thinking mode's late start, the compile cache, and grammars that do not compile."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from v4ray.engine.core import EngineCore
from v4ray.engine.grammar import GrammarBackend, allowed_mask
from v4ray.engine.runner import ModelRunner
from v4ray.engine.sampler import SamplingBatch
from v4ray.engine.sampling import SamplingParamError, SamplingParams, StructuredOutput
from v4ray.model.chat import dsml_calls, parse_completion, parse_tool_calls, tool_call_grammar
from v4ray.model.loader import load_model
from v4ray.model.tokenizer import V4Tokenizer

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "maxLength": 10}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "required": ["a", "b"], "properties": {
            "a": {"type": "integer", "minimum": -100, "maximum": 100},
            "b": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}}}}},
    {"type": "function", "function": {"name": "ping"}},
]


@pytest.fixture(scope="module")
def core(tiny_ckpt):
    ckpt = tiny_ckpt()
    model = load_model(ckpt, torch.float32)
    return EngineCore(ModelRunner(model, 64 << 20, 16), V4Tokenizer.from_dir(ckpt), 4096, 1024, 16)


def _run(core, requests):
    """requests: {rid: (prompt text, SamplingParams)} -> {rid: finished RequestOutput}."""
    for rid, (prompt, params) in requests.items():
        core.add_request(rid, core.tokenizer.encode(prompt), params)
    done = {}
    while core.has_work():
        for out in core.step():
            if out.finished:
                done[out.request_id] = out
    return done


def test_allowed_mask_is_the_bitmask_bit_by_bit():
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(1 << 31), 1 << 31, (5, 9), generator=gen, dtype=torch.int64).to(torch.int32)
    vocab = 9 * 32 - 7                                   # the last word is partly past the vocabulary
    allowed = allowed_mask(bitmask, vocab)
    expect = [[bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1) for t in range(vocab)] for r in range(5)]
    assert allowed.tolist() == expect


def test_constrained_rows_choose_allowed_tokens_and_leave_other_rows_bit_for_bit():
    """A batch of 6 rows, 3 constrained: those draw only allowed tokens; the others draw exactly what a batch
    without any constraint draws (same seeds), and every row's reported logprob is the raw model's."""
    from v4ray.engine.sampler import sampling_row

    vocab = 300
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, vocab, generator=gen) * 3
    params = SamplingParams(temperature=1.0, seed=7)
    row = sampling_row(params, vocab)
    allowed_ids = [[5, 17, 250], [0], [100, 101, 102, 103]]
    bitmask = torch.full((6, (vocab + 31) // 32), -1, dtype=torch.int32)
    for r, ids in zip((0, 2, 4), allowed_ids):
        bitmask[r] = 0
        for t in ids:
            bitmask[r, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)

    def run(constrain):
        batch = SamplingBatch(logits)
        for r in range(6):
            g = torch.Generator().manual_seed(100 + r)
            batch.sample(r, params, row, None, 0, g)
        if constrain:
            batch.constrain(bitmask)
        return batch.run(2)

    free, bound = run(False), run(True)
    for r, ids in zip((0, 2, 4), allowed_ids):
        assert bound[r].token in ids
    for r in (1, 3, 5):
        assert bound[r].token == free[r].token and bound[r].logprob == free[r].logprob
    raw = torch.log_softmax(logits, dim=-1)
    for r in range(6):
        assert bound[r].logprob == pytest.approx(raw[r, bound[r].token].item(), abs=0)


def test_json_schema_outputs_validate_at_temperature_1(core):
    """Eight seeded samples of a schema with bounded strings, bounded integers and an enum array, each its own
    matcher in one batch (n=2 shares a request): every completion parses and validates, and ends with eos."""
    so = StructuredOutput("json_schema", json.dumps(PERSON))
    done = _run(core, {f"j{i}": ("Describe someone as JSON.", SamplingParams(n=2, max_tokens=256, temperature=1.0,
                                                                            seed=i, structured=so))
                       for i in range(4)})
    texts = [c.text for out in done.values() for c in out.outputs]
    assert len(texts) == 8 and all(c.finish_reason == "stop" for out in done.values() for c in out.outputs)
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 1                       # seeds differ, and the grammar leaves room to differ


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(core):
    """A request's tokens do not depend on a constrained neighbour (greedy and seeded)."""
    plain = {"g": ("The weather today", SamplingParams(max_tokens=12, temperature=0)),
             "s": ("The weather today", SamplingParams(max_tokens=12, temperature=1.0, seed=3))}
    alone = _run(core, plain)
    mixed = _run(core, {**plain, "c": ("x", SamplingParams(max_tokens=64, temperature=1.0, seed=1,
                                                            structured=StructuredOutput("json_object")))})
    for rid in plain:
        assert mixed[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids
    assert isinstance(json.loads(mixed["c"].outputs[0].text), dict) or mixed["c"].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_call_grammar_forces_valid_calls(core, parallel):
    """tool_choice required: each completion is exactly a DSML block whose calls name declared tools with
    arguments that validate against their schemas; without parallel calls, exactly one call. With parallel calls
    the random model may keep calling until max_tokens: then the calls it completed are checked."""
    so = StructuredOutput("grammar", tool_call_grammar(TOOLS, parallel=parallel), param="tools")
    done = _run(core, {f"t{i}": ("Use a tool.", SamplingParams(max_tokens=400, temperature=1.0, seed=i,
                                                               structured=so)) for i in range(4)})
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}
    for out in done.values():
        c = out.outputs[0]
        text = c.text
        if parallel and c.finish_reason == "length":
            text = text[:text.rindex("</｜DSML｜invoke>")] + "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
        else:
            assert c.finish_reason == "stop", c.text
        reasoning, content, block = parse_completion(text, thinking=False)
        assert content == "" and block is not None
        calls = parse_tool_calls(block)
        assert calls and (parallel or len(calls) == 1)
        for name, args in calls:
            jsonschema.validate(args, schemas[name])


def test_named_tool_choice_and_the_encoder_agree_with_the_grammar(core):
    """The grammar accepts what `dsml_calls` renders (the format the model was trained on), and refuses a call
    to another tool when one is named."""
    backend = core.grammars
    tok = core.tokenizer
    calls = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": -3, "b": [True]}), ("ping", {})]
    for parallel in (True, False):
        for call in ([calls[0]], calls) if parallel else ([calls[1]],):
            m = backend.matcher(StructuredOutput("grammar", tool_call_grammar(TOOLS, parallel=parallel)))
            ids = tok.encode("\n\n" + dsml_calls(call), add_bos=False) + [tok.eos_token_id]
            assert m.consume_tokens(ids) and m.is_stopped(), m.get_error()
    named = backend.matcher(StructuredOutput("grammar", tool_call_grammar(TOOLS, name="add")))
    ok = tok.encode("\n\n" + dsml_calls([calls[1]]), add_bos=False)
    other = tok.encode("\n\n" + dsml_calls([calls[0]]), add_bos=False)
    assert named.deep_copy().consume_tokens(ok)
    assert not named.consume_tokens(other)


def test_thinking_mode_constrains_only_after_the_end_of_reasoning(core):
    """after_token_id: `</think>` (forced first here by a logit bias) is allowed while the grammar waits; the
    output after it is the JSON. Were the grammar active from the start, `</think>` could never be chosen."""
    end_think = core.tokenizer.token_id("</think>")
    so = StructuredOutput("json_schema", json.dumps(PERSON), after_token_id=end_think)
    done = _run(core, {"k": ("Think, then answer.", SamplingParams(max_tokens=256, temperature=1.0, seed=5,
                                                                  logit_bias={end_think: 100}, structured=so,
                                                                  skip_special_tokens=False))})
    c = done["k"].outputs[0]
    assert c.token_ids[0] == end_think and c.text.startswith("</think>")
    jsonschema.validate(json.loads(c.text[len("</think>"):]), PERSON)


def test_compiled_grammars_are_cached_and_bad_grammars_name_the_field(core):
    backend = core.grammars
    before = backend.num_compiled
    schema = json.dumps({"type": "object", "properties": {"only": {"type": "boolean"}}, "required": ["only"]})
    for _ in range(3):
        backend.matcher(StructuredOutput("json_schema", schema))
    assert backend.num_compiled == before + 1
    with pytest.raises(SamplingParamError) as e:
        core.add_request("bad", [1, 2, 3], SamplingParams(structured=StructuredOutput(
            "json_schema", json.dumps({"type": "string", "pattern": "(unclosed"}),
            param="response_format.json_schema.schema")))
    assert e.value.param == "response_format.json_schema.schema" and "bad" not in core.requests
    with pytest.raises(SamplingParamError) as e:
        SamplingParams(ignore_eos=True, structured=StructuredOutput("json_object"))
    assert e.value.param == "ignore_eos"


def test_backend_masks_tokens_outside_the_tokenizer_and_the_pool_agrees_with_serial(tiny_ckpt):
    """The model's vocabulary is wider than the tiny tokenizer's (ids past it decode to nothing): a grammar never
    allows them. The thread-pool backend (GPU hosts) and the serial one (CPU hosts) give the same masks and
    verdicts along a walk through a schema."""
    tok = V4Tokenizer.from_dir(tiny_ckpt())
    backends = [GrammarBackend(tok.to_json(), 512, tok.eos_token_id, parallel=p) for p in (True, False)]
    m = backends[0].matcher(StructuredOutput("grammar", 'start: /[a-z]+/'))
    allowed = allowed_mask(backends[0].fill([(m, 0)], 1), 512)[0]
    assert allowed[tok.encode("q", add_bos=False)[0]] and not allowed[tok.vocab_size:].any()

    so = StructuredOutput("json_schema", json.dumps(PERSON))
    text = json.dumps({"name": "Ada", "age": 36, "tags": ["a", "c"]})
    matchers = [[b.matcher(so) for _ in range(3)] for b in backends]
    for token in tok.encode(text, add_bos=False) + [tok.eos_token_id]:
        masks = [b.fill([(m, row) for row, m in zip((0, 2, 3), ms)], 4) for b, ms in zip(backends, matchers)]
        assert torch.equal(masks[0], masks[1]) and (masks[0][1] == -1).all()
        verdicts = [b.advance(ms, [token, token, 2]) for b, ms in zip(backends, matchers)]  # row 3: a wrong token
        assert verdicts[0] == verdicts[1]
        assert verdicts[0][:2] == [True, True]
        matchers = [[ms[0], ms[1], b.matcher(so)] for b, ms in zip(backends, matchers)]
    assert all(m.is_stopped() for ms in matchers for m in ms[:2])
