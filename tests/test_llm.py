"""The offline API (`LLM`, `SamplingParams`) and the `v4ray` CLI, on a real tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from v4ray import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(model=tiny_ckpt("v4-tiny-swa", dtype="fp32", confident=True), dtype="float32")


def test_generate_string_and_token_prompts(llm):
    greedy = SamplingParams(max_tokens=8, temperature=0)
    a, b = llm.generate(["Hello", {"prompt_token_ids": llm.tokenizer.encode("Hello")}], greedy)
    assert a.prompt == "Hello" and a.prompt_token_ids == b.prompt_token_ids == llm.tokenizer.encode("Hello")
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(a.outputs[0].token_ids) == 8
    assert a.outputs[0].finish_reason == "length"
    assert a.outputs[0].text == llm.tokenizer.decode(a.outputs[0].token_ids)


def test_prompt_logprobs_and_logprobs(llm):
    ids = llm.tokenizer.encode("The quick brown fox")
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=4, temperature=0, logprobs=3,
                                                                prompt_logprobs=2))[0]
    full = torch.log_softmax(llm.model(torch.tensor(ids)), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert ids[pos] in entry and len(entry) <= 3
        assert entry[ids[pos]].logprob == pytest.approx(float(full[pos - 1, ids[pos]]), abs=1e-5)
    comp = out.outputs[0]
    assert len(comp.logprobs) == 4
    for tok, entry in zip(comp.token_ids, comp.logprobs):
        assert entry[tok].rank == 1  # greedy picks the most likely token
    assert comp.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)))


def test_stop_strings_and_stop_tokens(llm):
    base = llm.generate("abc", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    text = base.text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1) if text[i:i + 2].isprintable()
                and text.find(text[i:i + 2]) == i)
    out = llm.generate("abc", SamplingParams(max_tokens=12, temperature=0, stop=[stop]))[0].outputs[0]
    assert out.text == text[:text.find(stop)] and out.finish_reason == "stop" and out.stop_reason == stop
    tok = base.token_ids[5]
    first = base.token_ids.index(tok)
    out = llm.generate("abc", SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[tok]))[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1] and out.stop_reason == tok


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=7, n=2)
    a, b = llm.generate("seed", p)[0], llm.generate("seed", p)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert a.outputs[0].token_ids != a.outputs[1].token_ids  # n samples differ
    c = llm.generate("seed", SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=8))[0]
    assert c.outputs[0].token_ids != a.outputs[0].token_ids


@pytest.mark.parametrize("prompt,match", [({"prompt_token_ids": []}, "empty"),
                                          ({"prompt_token_ids": [1, 99999]}, "outside"),
                                          (42, "a prompt must be")])
def test_bad_prompts(llm, prompt, match):
    with pytest.raises((ValueError, TypeError), match=match):
        llm.generate(prompt)


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="make-tiny"):
        LLM(model=tmp_path / "nothing")


def test_cli_make_tiny_and_generate(tmp_path):
    ckpt = tmp_path / "tiny"
    run = lambda *a: subprocess.run([sys.executable, "-m", "v4ray.cli", *a], capture_output=True,
                                    text=True, timeout=300)
    r = run("make-tiny", str(ckpt), "--preset", "v4-tiny-swa")
    assert r.returncode == 0, r.stderr
    r = run("generate", "--model", str(ckpt), "--prompt", "Hi", "--max-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["prompt"] == "Hi" and len(row["token_ids"]) == 5
