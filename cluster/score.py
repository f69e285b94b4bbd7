"""Batch scoring: JSONL in, JSONL out, each id exactly once, resumable (`v4ray score`, also as a Ray job).

Input rows: {"id", "prompt"}, {"id", "messages"}, or the OpenAI Batch format {"custom_id", "body": {...}}, with
optional sampling fields (max_tokens, temperature, top_p, top_k, seed, stop) and, in logprobs mode, an optional
"continuation" to score after the prompt. Modes:
* complete: the completion, token counts and timing;
* logprobs: per-token log-probabilities of the prompt (and continuation), their total log-likelihood and
  perplexity.

Why not Ray Data: the model replica is one stateful placement group (routers and expert shards stepping in
lockstep through all-to-all), so rows must reach one engine; Ray Data's map_batches would either build a
replica per actor or add a serialisation hop per row. The driver instead streams the file through the engine
with at most `max_in_flight` rows admitted, appending each result as it finishes (bounded memory, one writer,
exactly-once bookkeeping in one place).

Exactly once: results are appended and flushed as they finish; on start, ids (and id-less error lines) already
in the output are skipped, and a torn last line from a crash is cut off. A malformed row becomes an error row
{"line", "id", "error"} in the same output, never a crash.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from v4ray.model.chat import ChatFormatError, render_chat
from v4ray.model.sampling import SamplingParams

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_p", "presence_penalty",
                   "frequency_penalty", "repetition_penalty")


@dataclass
class Row:
    line: int
    id: str
    prompt_ids: list[int]
    continuation_start: int | None
    params: SamplingParams
    custom: bool = False


def load_done(output: Path) -> tuple[set[str], set[int]]:
    """Ids and error lines already written; a torn last line (a crash mid-write) is truncated away."""
    ids, lines = set(), set()
    if not output.exists():
        return ids, lines
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(output, "r+b") as f:
            f.truncate(keep)
    for raw in data[:keep].splitlines():
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if row.get("id") is not None:
            ids.add(str(row["id"]))
        elif "line" in row:
            lines.add(int(row["line"]))
    return ids, lines


def parse_row(n: int, raw: str, tokenizer, mode: str, max_model_len: int, default_max_tokens: int) -> Row:
    """One input line -> Row, or ValueError naming what is wrong."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("a row must be a JSON object")
    custom = "custom_id" in obj
    rid = obj.get("custom_id") if custom else obj.get("id")
    if rid is None or (isinstance(rid, str) and not rid):
        raise ValueError("row has no 'id' (or 'custom_id')")
    body = obj.get("body", obj) if custom else obj
    if not isinstance(body, dict):
        raise ValueError("'body' must be an object")
    if "messages" in body:
        try:
            ids = tokenizer.encode(render_chat(body["messages"]), add_bos=False)
        except ChatFormatError as e:
            raise ValueError(f"{e.param}: {e}") from None
    elif isinstance(body.get("prompt"), str):
        if not body["prompt"]:
            raise ValueError("'prompt' is empty")
        ids = tokenizer.encode(body["prompt"])
    else:
        raise ValueError("row needs a non-empty 'prompt' string or 'messages'")
    start = None
    if mode == "logprobs" and isinstance(body.get("continuation"), str) and body["continuation"]:
        start = len(ids)
        ids = ids + tokenizer.encode(body["continuation"], add_bos=False)
    kw = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    if mode == "logprobs":
        kw.update(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    else:
        kw.setdefault("max_tokens", default_max_tokens)
    if len(ids) + (1 if mode == "logprobs" else kw["max_tokens"]) > max_model_len:
        raise ValueError(f"prompt of {len(ids)} tokens (+ max_tokens) exceeds the context of {max_model_len}")
    try:
        params = SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        raise ValueError(str(e)) from None
    return Row(n, str(rid), ids, start, params, custom)


def result_row(row: Row, out, mode: str, seconds: float) -> dict:
    res = {"id": row.id, "line": row.line, "prompt_tokens": len(row.prompt_ids), "time_s": round(seconds, 4)}
    if row.custom:
        res["custom_id"] = row.id
    if mode == "complete":
        c = out.outputs[0]
        res.update(completion=c.text, completion_tokens=len(c.token_ids), finish_reason=c.finish_reason)
        return res
    lps = [None] + [pos[tok].logprob for pos, tok in zip(out.prompt_logprobs[1:], row.prompt_ids[1:])]
    start = row.continuation_start or 1
    scored = lps[start:]
    ll = float(sum(scored))
    res.update(token_logprobs=lps, log_likelihood=ll, perplexity=math.exp(-ll / max(1, len(scored))),
               scored_tokens=len(scored))
    if row.continuation_start is not None:
        res["continuation_tokens"] = len(scored)
    return res


class Progress:
    """Rows done/total, tokens/s and ETA on stderr, at most once a second."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.start, self.t0, self.tokens = total, done, done, time.monotonic(), 0
        self._last = 0.0

    def update(self, rows: int, tokens: int, final: bool = False) -> None:
        self.done += rows
        self.tokens += tokens
        now = time.monotonic()
        if final or now - self._last > 1.0:
            el = now - self.t0
            rate = self.tokens / el if el else 0.0
            left = self.total - self.done
            eta = el / max(1, self.done - self.start) * left
            print(f"[v4ray score] {self.done}/{self.total} rows, {rate:.0f} tokens/s, ETA {eta:.0f}s",
                  file=sys.stderr, flush=True)
            self._last = now


def score(llm, input_path: str | Path, output_path: str | Path, mode: str = "complete", max_in_flight: int = 32,
          default_max_tokens: int = 64) -> dict:
    """Score every row of `input_path` not yet in `output_path` through `llm`'s engine; returns a summary."""
    if mode not in ("complete", "logprobs"):
        raise ValueError(f"mode must be 'complete' or 'logprobs', got {mode!r}")
    inp, outp = Path(input_path), Path(output_path)
    if not inp.exists():
        raise FileNotFoundError(f"input {inp} does not exist")
    done_ids, done_lines = load_done(outp)
    with open(inp, encoding="utf-8", errors="replace") as f:
        total = sum(1 for line in f if line.strip())
    progress = Progress(total, len(done_ids) + len(done_lines))
    engine, tok = llm.engine, llm.tokenizer
    seen: set[str] = set(done_ids)
    in_flight: dict[str, tuple[Row, float]] = {}
    summary = {"rows": total, "scored": 0, "errors": 0, "skipped": progress.done, "tokens": 0}
    t_start = time.monotonic()
    with open(inp, encoding="utf-8", errors="replace") as src, open(outp, "a", encoding="utf-8") as dst:
        def write(obj: dict) -> None:
            dst.write(json.dumps(obj) + "\n")
            dst.flush()

        def drain(until: int) -> None:
            while len(in_flight) > until:
                for out in engine.step():
                    if not out.finished:
                        continue
                    row, t0 = in_flight.pop(out.request_id)
                    write(result_row(row, out, mode, time.monotonic() - t0))
                    n_tok = len(row.prompt_ids) + sum(len(c.token_ids) for c in out.outputs)
                    summary["scored"] += 1
                    summary["tokens"] += n_tok
                    progress.update(1, n_tok)

        lineno = 0
        for raw in src:
            if not raw.strip():
                continue
            lineno += 1
            try:
                row = parse_row(lineno, raw, tok, mode, llm.max_model_len, default_max_tokens)
            except ValueError as e:
                rid = _peek_id(raw)
                if (rid is not None and rid in seen) or (rid is None and lineno in done_lines):
                    continue
                write({"line": lineno, "id": rid, "error": str(e)})
                if rid is not None:
                    seen.add(rid)
                summary["errors"] += 1
                progress.update(1, 0)
                continue
            if row.id in seen:
                if row.id not in done_ids:  # a second row with an id already taken in this input
                    write({"line": lineno, "id": None, "error": f"duplicate id {row.id!r} (first row kept)"})
                    summary["errors"] += 1
                    progress.update(1, 0)
                continue
            seen.add(row.id)
            key = f"score-{row.line}"
            engine.add_request(key, row.prompt_ids, row.params)
            in_flight[key] = (row, time.monotonic())
            drain(max_in_flight - 1)
        drain(0)
    progress.update(0, 0, final=True)
    summary["seconds"] = round(time.monotonic() - t_start, 3)
    summary["tokens_per_s"] = round(summary["tokens"] / max(1e-9, summary["seconds"]), 1)
    return summary


def _peek_id(raw: str):
    try:
        obj = json.loads(raw)
        rid = obj.get("custom_id", obj.get("id")) if isinstance(obj, dict) else None
        return str(rid) if rid not in (None, "") else None
    except json.JSONDecodeError:
        return None


def main(args) -> int:
    from .llm import LLM

    inp, outp = Path(args.input).resolve(), Path(args.output).resolve()
    address = args.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=max(1, args.max_in_flight))
    if args.expert_shards:
        kwargs.update(num_routers=args.routers, num_expert_shards=args.expert_shards,
                      address="auto" if address else None)
    with LLM(model=args.model, **kwargs) as llm:
        summary = score(llm, inp, outp, args.mode, args.max_in_flight, args.max_tokens)
    print(json.dumps({"summary": summary, "output": str(outp)}), flush=True)
    return 0
