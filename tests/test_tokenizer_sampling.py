"""Byte-level tokenizer (against transformers' loader) and vLLM-semantics sampling, on CPU."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from v4ray.engine.sampler import (
    INVALID_PROBABILITIES,
    Penalties,
    SampledToken,
    SamplingBatch,
    apply_min_tokens,
    apply_penalties,
    draw,
    make_generator,
    read_back,
    sample_token,
    sampling_probs,
    top_logprobs,
)
from v4ray.engine.outputs import FlatLogprobs
from v4ray.engine.sampling import Logprob, SamplingParams, check_stop
from v4ray.model.tokenizer import BYTE_OFFSET, SPECIAL_TOKENS, V4Tokenizer, build_byte_tokenizer

TEXTS = ["hello world", "héllo wörld — ünïcödé", "emoji 😀👍🏽 and 中文", "", " lead\tand\ntrail  "]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return V4Tokenizer.from_dir(tokenizer_dir)


# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_one_token_per_byte(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == [tokenizer.bos_token_id] + [BYTE_OFFSET + b for b in text.encode("utf-8")]
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_bos=False) == ids[1:]


def test_specials_at_fixed_ids(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.vocab_size) == (0, 1, BYTE_OFFSET + 256)
    for token_id, content in SPECIAL_TOKENS.items():
        assert tokenizer.encode(content, add_bos=False) == [token_id]
        assert tokenizer.decode_token(token_id) == content
    text = f"{SPECIAL_TOKENS[2]}hi{SPECIAL_TOKENS[3]}{SPECIAL_TOKENS[4]}x{SPECIAL_TOKENS[5]}"
    ids = tokenizer.encode(text)
    assert ids == [0, 2, BYTE_OFFSET + ord("h"), BYTE_OFFSET + ord("i"), 3, 4, BYTE_OFFSET + ord("x"), 5]
    assert tokenizer.decode(ids) == "hix"
    assert tokenizer.decode(ids, skip_special_tokens=False) == SPECIAL_TOKENS[0] + text


def test_build_is_deterministic(tokenizer_dir, tmp_path):
    build_byte_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes()


def test_transformers_autotokenizer_agrees(tokenizer_dir, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 6)
    for text in TEXTS + [f"{SPECIAL_TOKENS[2]}hi{SPECIAL_TOKENS[3]}"]:
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)


def test_unused_ids_decode_to_empty(tokenizer):
    unused = [7, 8, 15, 272, 300, 511]
    assert tokenizer.decode(unused) == ""
    assert all(tokenizer.decode_token(i) == "" for i in unused)
    assert tokenizer.decode([BYTE_OFFSET + ord("a"), 9, 400, BYTE_OFFSET + ord("b")]) == "ab"


def test_partial_utf8_does_not_raise(tokenizer):
    first_two_bytes = [BYTE_OFFSET + b for b in "😀".encode("utf-8")[:2]]
    assert tokenizer.decode(first_two_bytes) == "\ufffd"
    assert tokenizer.decode_token(first_two_bytes[0]) == "\ufffd"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_decoder_matches_full_decode(tokenizer, skip_special_tokens):
    text = f"a€😀{SPECIAL_TOKENS[4]}中b"
    ids = tokenizer.encode(text) + [9, 300]
    ids += [BYTE_OFFSET + 0xE4, BYTE_OFFSET + 0xB8]  # a truncated 3-byte character at the end
    decoder = tokenizer.incremental_decoder(skip_special_tokens)
    pieces = [decoder.step(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    # "€" is 3 bytes: nothing is emitted until its last byte arrives.
    euro_start = 2  # after bos and "a"
    assert pieces[euro_start : euro_start + 3] == ["", "", "€"]


def test_missing_tokenizer_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        V4Tokenizer.from_dir(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("min_tokens", 17),  # > max_tokens (16)
        ("temperature", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.5),
        ("seed", 1.5),
        ("stop", [""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("logprobs", 21),
        ("logprobs", -1),
        ("prompt_logprobs", 21),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("logit_bias", {"x": 1.0}),
        ("logit_bias", {5: 101.0}),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", None),
    ],
)
def test_sampling_params_validation_names_field(field, value):
    with pytest.raises(ValueError) as error:
        SamplingParams(**{field: value})
    assert str(error.value).startswith(field), str(error.value)


def test_sampling_params_normalisation():
    params = SamplingParams(stop="###", logit_bias={"5": -100})
    assert params.stop == ["###"] and params.stop_token_ids == [] and params.logit_bias == {5: -100.0}
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    assert SamplingParams(top_k=-1).top_k == -1


# ---------------------------------------------------------------------------------------------- sampling


def test_greedy_picks_first_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 3.0, 2.0])
    assert sample_token(logits, SamplingParams(temperature=0.0)) == 1


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.zeros(1000)  # flat distribution
    params = SamplingParams(temperature=1.0)

    def draw(seed):
        generator = make_generator(seed)
        return [sample_token(logits, params, generator) for _ in range(16)]

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert make_generator(None) is None


def test_top_k_one_and_tiny_top_p_equal_greedy():
    torch.manual_seed(0)
    for _ in range(10):
        logits = torch.randn(64)
        expected = int(torch.argmax(logits))
        generator = make_generator(1)
        assert sample_token(logits, SamplingParams(top_k=1, temperature=2.0), generator) == expected
        assert sample_token(logits, SamplingParams(top_p=1e-6, temperature=2.0), generator) == expected
        assert sample_token(logits, SamplingParams(min_p=1.0, temperature=2.0), generator) == expected


def test_top_k_top_p_restrict_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = make_generator(7)
    top_p = {sample_token(logits, SamplingParams(top_p=0.8), generator) for _ in range(200)}
    assert top_p == {0, 1}  # 0.5 + 0.3 reaches 0.8: the smallest such set
    top_k = {sample_token(logits, SamplingParams(top_k=3), generator) for _ in range(300)}
    assert top_k == {0, 1, 2}


def test_penalties_hand_computed():
    logits = torch.tensor([2.0, -1.0, 0.5, 4.0, -3.0])
    params = SamplingParams(
        presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0, logit_bias={4: 1.0}
    )
    out = apply_penalties(logits, output_token_ids=[0, 0, 1], prompt_token_ids=[3], params=params)
    expected = torch.tensor(
        [
            2.0 / 2.0 - 0.25 * 2 - 0.5,  # generated twice, positive: divided by 2
            -1.0 * 2.0 - 0.25 * 1 - 0.5,  # generated once, negative: multiplied by 2
            0.5,  # unseen
            4.0 / 2.0,  # prompt only: repetition penalty, no presence/frequency
            -3.0 + 1.0,  # logit_bias only
        ]
    )
    torch.testing.assert_close(out, expected)
    assert logits[0] == 2.0  # input untouched
    torch.testing.assert_close(apply_penalties(logits, [0], [3], SamplingParams()), logits)


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.zeros(8)
    params = SamplingParams(min_tokens=2, stop_token_ids=[5])
    banned = apply_min_tokens(logits, 1, params, eos_token_id=1)
    assert torch.isinf(banned[[1, 5]]).all() and torch.isfinite(banned[[0, 2, 3, 4, 6, 7]]).all()
    assert apply_min_tokens(logits, 2, params, eos_token_id=1) is logits


def test_top_logprobs_ranks_and_chosen():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])
    expected_logprobs = torch.log_softmax(logits, dim=-1)
    result = top_logprobs(logits, k=2, chosen=3, decode=lambda i: f"<{i}>")
    assert list(result) == [1, 2, 3]
    assert [result[i].rank for i in (1, 2, 3)] == [1, 2, 4]
    assert result[3] == Logprob(logprob=pytest.approx(float(expected_logprobs[3])), rank=4, decoded_token="<3>")
    assert math.isclose(result[1].logprob, float(expected_logprobs[1]), rel_tol=1e-6)
    within = top_logprobs(logits, k=3, chosen=0)
    assert list(within) == [1, 2, 0] and within[0].rank == 3 and within[0].decoded_token is None
    assert list(top_logprobs(logits, k=0, chosen=4)) == [4]


def test_flat_logprobs_read_as_a_list_of_position_dicts():
    """FlatLogprobs (what a sequence appends each step and what travels to the server) reads as vLLM's list of
    per-position dicts: indexing, negative indices, slices, extend, equality, and a pickle round trip that carries
    plain lists only."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0], [0.5, -2.0, 4.0, 1.0, 0.0], [2.0, 2.0, 1.0, 0.0, 3.0]])
    dicts = [top_logprobs(row, k=2, chosen=c, decode=lambda i: f"<{i}>") for row, c in zip(logits, (3, 2, 1))]
    flat = FlatLogprobs()
    for d in dicts:
        flat.append(d)
    assert len(flat) == 3 and list(flat) == dicts and flat == dicts
    assert flat[-1] == dicts[2] and flat[1:] == dicts[1:] and flat[::2] == dicts[::2] and flat[5:] == []
    with pytest.raises(IndexError):
        flat[3]
    assert [list(flat.entries(0))[i][:3] for i in range(3)] == [(t, e.logprob, e.rank) for t, e in dicts[0].items()]
    joined = flat[:1]
    joined.extend(flat[1:])
    assert joined == flat
    wire = pickle.dumps(flat)
    assert pickle.loads(wire) == flat and b"engine.sampling" not in wire  # no Logprob objects on the wire
    assert flat != dicts[:2]  # the comparison can fail


def test_draw_is_torch_multinomial_bit_for_bit():
    """`draw` replaces torch.multinomial (whose argument check reads the device, or asserts on it) with the same
    algorithm: the same generator state draws the same token, row by row in a batch too."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(6, 1000) * torch.arange(6)[:, None], dim=-1)
    probs[2, 10:] = 0  # a top-k / top-p style support
    probs[3] = 0
    probs[3, 999] = 1  # one token left
    for seed in range(20):
        expected = [int(torch.multinomial(p, 1, generator=make_generator(seed + i))) for i, p in enumerate(probs)]
        tokens, valid = draw(probs, [make_generator(seed + i) for i in range(len(probs))])
        assert tokens.tolist() == expected and valid.all()
    torch.manual_seed(5)  # no generator: the default one, consumed the same way
    expected = [int(torch.multinomial(p, 1)) for p in probs]
    torch.manual_seed(5)
    assert draw(probs, [None] * len(probs))[0].tolist() == expected


def test_an_invalid_row_fails_alone_and_leaves_the_others_as_alone():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.9, top_k=10, seed=3)
    bad = SamplingParams(temperature=1.0)
    bad.temperature = float("nan")  # what validation refuses

    def run(rows):
        batch = SamplingBatch(logits[rows])
        for i, row in enumerate(rows):
            p = bad if row == 1 else params
            batch.draw(i, sampling_probs(logits[row], p), make_generator(row))
        return batch.run()

    together = run([0, 1, 2, 3])
    assert together[1].error == INVALID_PROBABILITIES
    assert [r.error for i, r in enumerate(together) if i != 1] == [None] * 3
    assert [together[i].token for i in (0, 2, 3)] == [run([i])[0].token for i in (0, 2, 3)]


def test_plain_argmax_rows_skip_the_rank_pass_and_agree_with_it():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(6))
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie: the first index wins, rank still 1
    fast = SamplingBatch(logits).run(0)
    full, _ = read_back(logits.argmax(dim=-1), torch.log_softmax(logits, dim=-1), 0)
    assert fast == full and [r.rank for r in fast] == [1] * 4 and fast[2].token == 7


def test_penalty_counts_kept_on_the_device_equal_the_token_lists():
    """The engine counts each step's chosen token into `Penalties` on the device; after any sequence of tokens
    the penalised logits equal those computed from the token list at once."""
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5,
                            logit_bias={4: 1.0, 9: -2.0}, min_tokens=5, stop_token_ids=[7])
    logits = torch.randn(16, generator=torch.Generator().manual_seed(2))
    prompt, generated = [3, 3, 11], [0, 5, 0, 12, 5, 0]
    penalties = Penalties(params, prompt, 16, eos_token_id=1, device=logits.device)
    for n, token in enumerate(generated):
        torch.testing.assert_close(penalties.penalise(logits), apply_penalties(logits, generated[:n], prompt, params),
                                   rtol=0, atol=0)
        penalties.count(torch.tensor([token]))
    assert penalties.counts.tolist() == torch.bincount(torch.tensor(generated), minlength=16).tolist()
    banned = penalties.apply(logits, 4)
    assert torch.isinf(banned[[1, 7]]).all() and torch.isfinite(banned[[0, 2, 3]]).all()
    assert torch.isfinite(penalties.apply(logits, 5)).all()


def test_a_sampling_batch_reads_back_once_with_the_same_results():
    """Rows of every kind (plain greedy, greedy after penalties, seeded draws with top-k/top-p/min-p, logprobs)
    on logits tagged device-resident: `run` makes exactly one device->host read, no upload, no host/device mix,
    and returns what the same batch returns on plain CPU tensors."""
    from device_provenance import Provenance, to_device

    kinds = [dict(temperature=0), dict(temperature=0, repetition_penalty=1.2, min_tokens=3),
             dict(temperature=0.8, top_k=20, top_p=0.9, seed=1), dict(temperature=1.0, min_p=0.2, seed=2),
             dict(temperature=0.7, frequency_penalty=0.5, logit_bias={3: 2.0}, seed=3), dict(temperature=0)]
    raw = torch.randn(len(kinds), 300, generator=torch.Generator().manual_seed(4)) * 3

    params = [SamplingParams(logprobs=row, **kw) for row, kw in enumerate(kinds)]

    def state(device):  # what the engine uploads when the requests arrive
        return [(Penalties.of(p, [5, 6, 7], 300, 1, device), make_generator(p.seed, device)) for p in params]

    def run(logits, rows):
        batch = SamplingBatch(logits)
        for row, (p, (penalties, generator)) in enumerate(zip(params, rows)):
            shaped = logits[row]
            if penalties is not None:
                if penalties.counts is not None:
                    batch.count(row, penalties)
                shaped = penalties.apply(shaped, 1)
            if not p.greedy:
                batch.draw(row, sampling_probs(shaped, p), generator)
            elif penalties is not None:
                batch.greedy(row, shaped)
        return batch.run(len(kinds) - 1)

    with Provenance() as prov:
        logits = to_device(raw.clone())
        rows = state(logits.device)
        with prov.window("sample") as w:
            tagged = run(logits, rows)
    assert w.count("sync") == 1 and w.count("upload") == 0 and w.count("mix") == 0, w.summary()
    assert tagged == run(raw, state(raw.device))
    assert [r.top[1][:1] for r in tagged] == [[i] for i in raw.argmax(dim=-1).tolist()]  # top-1 is the argmax


@pytest.mark.parametrize(
    "text, new_text_start, stop, expected",
    [
        ("hello world", 6, ["world"], 6),
        ("hello world", 6, ["xyz"], None),
        ("hello wor", 6, ["world"], None),  # only a prefix so far
        ("abc###def", 4, ["###"], 3),  # stop straddles the old/new boundary
        ("a.b!c", 0, ["!", "."], 1),  # earliest occurrence wins, not list order
        ("a.b", 2, ["."], None),  # a match wholly inside old text is not new
        ("stop here", 0, ["stop"], 0),
        ("anything", 3, [], None),
    ],
)
def test_check_stop(text, new_text_start, stop, expected):
    assert check_stop(text, new_text_start, stop) == expected


def test_a_sequence_reads_any_token_range_without_building_the_whole_list(tokenizer):
    """`Sequence.token_ids(start, stop)` (a step's chunk input) equals the slice of prompt + output for ranges in
    the prompt, in the output and across the boundary; a sequence stops at max_model_len counting both."""
    from v4ray.engine.sequence import Sequence

    prompt = list(range(100, 110))
    seq = Sequence(0, prompt, SamplingParams(max_tokens=50, ignore_eos=True), tokenizer, None, 14, None,
                   torch.zeros(7))
    for t in (300, 301, 302):
        seq.append(SampledToken(t, -1.0))
    whole = prompt + [300, 301, 302]
    assert seq.num_tokens == len(whole) == 13
    for start in range(len(whole) + 1):
        for stop in range(start, len(whole) + 1):
            assert seq.token_ids(start, stop) == whole[start:stop], (start, stop)
    assert not seq.finished
    seq.append(SampledToken(303, -1.0))          # the 14th token: max_model_len
    assert seq.finish_reason == "length"
