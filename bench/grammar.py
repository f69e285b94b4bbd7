"""Grammar-constrained decoding: which library, and what the constraint costs the engine (issue 20).

    python bench/grammar.py [--vocab 32000] [--batch 32] [--skip-library] [--skip-engine]

Two parts, written to bench/results/grammar.json:

library  llguidance against xgrammar on one byte-level BPE tokenizer trained here (`--vocab` tokens, on the Python
         standard library's source: the tiny test tokenizer has only 256 byte tokens, which flatters every
         library's mask), over the ten JSON schemas of tests/test_serve.py. First `--batch` random walks (each
         step a random token llguidance allows, to the grammar's end), checked with jsonschema; then each library
         compiles the schemas (cold, no cache) and replays the same walks with `--batch` matchers at once, each
         step filling the masks (its batched, threaded call) and advancing every matcher. Reported: compile ms
         per schema, mask + advance ms per step at batch 32, and the walks it refused (a walk is dropped at its
         first refused token; 0: both libraries enforce the same language on these schemas).
engine   tokens/s of the tiny model's EngineCore at concurrency `--batch` (fp32, CPU, eager steps), with and
         without a json_schema constraint (`FIXED_LENGTH`: every output the same length, so both runs hold the
         same rows for the same steps): the constrained run pays the mask fill, upload, masked sampling and
         advance of every step. The ratio is the number the issue's goal (>= 0.8x) is about.

Measured 2026-12-02 on the 2-core box (quiet), 32K trained vocabulary, batch 32: 32/32 walks valid (803 tokens).
llguidance compiles a schema in 0.48 ms (mean of ten), xgrammar in 2.46 ms (5.1x); a full-batch step's mask +
advance takes 0.70 ms with llguidance and 0.25 ms with xgrammar (median); xgrammar refused 6 of the 32 valid
walks (floats with many digits under bounds, escapes in length-bounded strings: its grammar for those schemas is
narrower than the schema), llguidance none. Engine, concurrency 32: 1497 tokens/s unconstrained, 1529 with the
schema (1.02x; with llguidance's thread pool instead of the engine's thread it measured 0.94x, see
`GrammarBackend`). llguidance is the engine's library: it enforces the schema as written, compiles faster and
needs nothing else; xgrammar imports transformers, which the runtime must not depend on.

The library run needs both wheels (xgrammar pulls in transformers at import, so it is only a bench dependency);
without xgrammar it measures llguidance alone.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import write  # noqa: E402


def train_tokenizer(vocab: int):
    """A byte-level BPE `tokenizers.Tokenizer` of `vocab` ids trained on stdlib sources; eos is the last id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    corpus, size = [], 0
    for f in files:
        text = f.read_text(errors="ignore")
        corpus.append(text)
        size += len(text)
        if size > 12 << 20:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(["<eos>"])
    return tok


def _allowed(bitmask_row, vocab: int) -> list[int]:
    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.reshape(-1)[:vocab]).flatten().tolist()


def random_walks(tok, schemas: list[dict], batch: int, seed: int = 0) -> tuple[list[list[int]], int]:
    """`batch` token traces through the schemas (one per matcher, schemas cycled), each step a uniformly random
    token among those llguidance allows (eos, when allowed, half the time), each to the grammar's end; and how
    many of them parse and validate (jsonschema)."""
    import jsonschema
    import llguidance
    from v4ray.model.chat import JSON_STYLE

    vocab, eos = tok.get_vocab_size(), tok.token_to_id("<eos>")
    lltok = llguidance.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=eos)
    rng = random.Random(seed)
    traces, valid = [], 0
    for i in range(batch):
        schema = schemas[i % len(schemas)]
        m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                                      defaults=JSON_STYLE))
        ids: list[int] = []
        while not m.is_stopped():
            bitmask = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32)
            allowed = _allowed(bitmask, vocab)
            token = eos if eos in allowed and rng.random() < 0.5 else rng.choice(allowed)
            assert m.consume_token(token), m.get_error()
            ids.append(token)
        traces.append(ids)
        try:
            jsonschema.validate(json.loads(tok.decode([t for t in ids if t != eos])), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return traces, valid


def replay(lib: str, tok, schemas: list[dict], traces: list[list[int]]) -> dict:
    """Compile each schema (cold), then step `len(traces)` matchers through the traces together: each step fills
    the active matchers' masks (the library's batched, threaded call) and advances each by its trace's token.
    Returns compile times, the mask + advance time per step scaled to a full batch, and the tokens the library
    refused (disagreements with llguidance's walk: 0 when both enforce the same language)."""
    vocab, eos = tok.get_vocab_size(), tok.token_to_id("<eos>")
    batch = len(traces)
    compile_ms = []
    if lib == "llguidance":
        import llguidance
        from v4ray.model.chat import JSON_STYLE

        lltok = llguidance.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=eos)
        executor = llguidance.LLExecutor()
        compiled = []
        for schema in schemas:
            t = time.perf_counter()
            m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults=JSON_STYLE), log_level=0)
            m.compute_bitmask()  # the first mask finishes the lazy parts of the compile
            compile_ms.append((time.perf_counter() - t) * 1e3)
            compiled.append(m)
        matchers = [compiled[i % len(schemas)].deep_copy() for i in range(batch)]

        def fill(active, bitmask):
            executor.unsafe_compute_mask_ptr([(matchers[i], k) for k, i in enumerate(active)], bitmask.data_ptr(),
                                             bitmask.shape[1] * 4, bitmask.shape[0])

        def advance(active, tokens):
            return executor.consume_token_par([(matchers[i], t) for i, t in zip(active, tokens)])
    else:
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        info = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>"),
                                                       vocab_size=vocab, stop_token_ids=[eos])
        compiled = []
        for schema in schemas:
            compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
            t = time.perf_counter()
            compiled.append(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, indent=None,
                                                         separators=(", ", ": ")))
            compile_ms.append((time.perf_counter() - t) * 1e3)
        matchers = [xgrammar.GrammarMatcher(compiled[i % len(schemas)]) for i in range(batch)]
        batcher = xgrammar.BatchGrammarMatcher()

        def fill(active, bitmask):
            batcher.batch_fill_next_token_bitmask([matchers[i] for i in active], bitmask)

        def advance(active, tokens):
            return xgrammar.BatchGrammarMatcher.batch_accept_token([matchers[i] for i in active], tokens)

    words = (vocab + 31) // 32
    refused: dict[int, str] = {}  # walk -> the text up to the first token this library refused (then dropped)
    total_s, matcher_steps, full_steps = 0.0, 0, []
    for step in range(max(len(t) for t in traces)):
        active = [i for i, t in enumerate(traces) if step < len(t) and i not in refused]
        if not active:
            break
        bitmask = torch.full((len(active), words), -1, dtype=torch.int32)
        t = time.perf_counter()
        fill(active, bitmask)
        tokens = [traces[i][step] for i in active]
        ok = advance(active, tokens)
        dt = time.perf_counter() - t
        for k, (i, token) in enumerate(zip(active, tokens)):  # the mask too must allow the walk's token
            if not ok[k] or not (int(bitmask[k, token // 32]) >> (token % 32)) & 1:
                refused[i] = tok.decode(traces[i][:step + 1])
        total_s, matcher_steps = total_s + dt, matcher_steps + len(active)
        if len(active) == batch:
            full_steps.append(dt * 1e3)
    return {"compile_ms": [round(c, 2) for c in compile_ms],
            "compile_ms_mean": round(sum(compile_ms) / len(compile_ms), 2),
            "mask_advance_ms_per_step_at_batch": round(total_s / matcher_steps * batch * 1e3, 3),
            "mask_advance_ms_full_steps_median": round(sorted(full_steps)[len(full_steps) // 2], 3)
            if full_steps else None,
            "walks_refused": len(refused), "refused_at": sorted(refused.values())[:5], "tokens": matcher_steps}


# The engine run's schema: exactly 40 one-digit integers, so every constrained output is "[d, d, ..., d]" — 120
# byte tokens, then eos — and the unconstrained run can make the same number of tokens (ignore_eos): both runs
# then hold the same rows for the same number of steps.
FIXED_LENGTH = {"type": "array", "minItems": 40, "maxItems": 40, "items": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}}
FIXED_TOKENS = 121


def engine_throughput(batch: int, rounds: int = 2) -> dict:
    """Generated tokens/s of one EngineCore (tiny model, fp32, eager steps), `batch` requests at once, without
    and with the json_schema (alternating, `rounds` of each, best taken)."""
    from v4ray.engine.core import EngineCore
    from v4ray.engine.runner import ModelRunner
    from v4ray.engine.sampling import SamplingParams, StructuredOutput
    from v4ray.model.loader import load_model
    from v4ray.model.tiny import make_tiny
    from v4ray.model.tokenizer import V4Tokenizer

    ckpt = make_tiny(Path(tempfile.mkdtemp()) / "tiny", preset="v4-tiny", dtype="fp32", seed=1)
    model = load_model(ckpt, torch.float32)
    core = EngineCore(ModelRunner(model, 256 << 20, batch), V4Tokenizer.from_dir(ckpt), 4096, 4096, batch)
    structured = StructuredOutput("json_schema", json.dumps(FIXED_LENGTH))
    kinds = {"unconstrained": dict(ignore_eos=True, max_tokens=FIXED_TOKENS),
             "json_schema": dict(structured=structured, max_tokens=2 * FIXED_TOKENS)}
    runs: dict[str, list] = {k: [] for k in kinds}
    for r in range(rounds + 1):  # round 0 warms up
        for name, kw in kinds.items():
            for i in range(batch):
                core.add_request(f"{name}{r}-{i}", core.tokenizer.encode(f"Request {i}: forty digits as JSON."),
                                 SamplingParams(temperature=1.0, seed=i, **kw))
            tokens, t = 0, time.perf_counter()
            while core.has_work():
                for o in core.step():
                    if o.finished:
                        tokens += len(o.outputs[0].token_ids)
                        if name == "json_schema":
                            assert len(json.loads(o.outputs[0].text)) == 40
            if r:
                runs[name].append(tokens / (time.perf_counter() - t))
    out = {name: {"tokens_per_s": [round(v, 1) for v in vals]} for name, vals in runs.items()}
    out["tokens_per_request"] = FIXED_TOKENS
    out["ratio"] = round(max(runs["json_schema"]) / max(runs["unconstrained"]), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--skip-library", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from test_serve import JSON_SCHEMAS

    result = {"batch": args.batch}
    if not args.skip_library:
        tok = train_tokenizer(args.vocab)
        traces, valid = random_walks(tok, JSON_SCHEMAS, args.batch)
        result["library"] = {"vocab": tok.get_vocab_size(), "walks": len(traces), "walks_valid": valid,
                             "walk_tokens": [len(t) for t in traces]}
        print(f"{valid}/{len(traces)} random walks valid, {sum(map(len, traces))} tokens", flush=True)
        for lib in ("llguidance", "xgrammar"):
            try:
                __import__(lib)
            except ImportError:
                result["library"][lib] = "not installed"
                continue
            result["library"][lib] = replay(lib, tok, JSON_SCHEMAS, traces)
            print(lib, result["library"][lib], flush=True)
    if not args.skip_engine:
        result["engine"] = engine_throughput(args.batch)
        print("engine", result["engine"], flush=True)
    print(write("grammar", result))


if __name__ == "__main__":
    main()
