"""Batch scoring: JSONL in, JSONL out, one output row per input line, resumable (`v4ray score`, also as a Ray job).

Input rows: {"id", "prompt"}, {"id", "messages"}, or the OpenAI Batch format {"custom_id", "body": {...}}, with
optional sampling fields (max_tokens, temperature, top_p, top_k, seed, stop, ...) and, in logprobs mode, an
optional "continuation" to score after the prompt. Ids are JSON strings or integers and keep their type: `7` and
`"7"` are different ids, and each is written back as it came. Modes:
* complete: the completion, token counts and timing;
* logprobs: per-token log-probabilities of the prompt (and continuation), their total log-likelihood and
  perplexity.

Why not Ray Data: the model replica is one stateful placement group (routers and expert shards stepping in
lockstep through all-to-all), so rows must reach one engine; Ray Data's map_batches would either build a
replica per actor or add a serialisation hop per row. The driver instead streams the file through the engine
with at most `max_in_flight` rows admitted, appending each result as it finishes (bounded memory, one writer,
exactly-once bookkeeping in one place).

Exactly once: every non-blank input line (split on "\\n" only; a trailing "\\r\\n" counts as one line end) gets
exactly one output row over all runs: a result {"id", "line", ...} or an error row {"line", "id", "error"}. On
start, lines already in the output are skipped (and ids that already have a result, for an input that was
edited), and a torn last line from a crash is cut off. Any failure of one row (bad bytes, JSON, types, sampling
values, admission, a sampling error inside a step) becomes that row's error row and the job goes on; only a
failed engine or replica stops it (`EngineFailed`), since every later row would fail too. Output is flushed per
row and fsynced every `CHECKPOINT_ROWS` rows or `CHECKPOINT_S` seconds and at the end. To retry error rows,
delete them from the output and rerun.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from v4ray.model.chat import ChatFormatError, render_chat
from v4ray.engine.json_input import JSONInputError, loads_strict, lone_surrogate_path
from v4ray.engine.sampling import SamplingParams

from .replica import ReplicaError

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_p", "presence_penalty",
                   "frequency_penalty", "repetition_penalty")
MAX_ROW_BYTES = 64 << 20  # one input line; longer lines become error rows without being held in memory
MAX_ERROR_CHARS = 1000  # error text kept in an error row
CHECKPOINT_ROWS = 256  # fsync the output after this many rows written ...
CHECKPOINT_S = 10.0  # ... or this many seconds, whichever comes first
ENGINE_KEY_PREFIX = "score-"



class RowError(ValueError):
    """One input line cannot be read as a row (bytes, JSON, nesting, id)."""


class EngineFailed(RuntimeError):
    """The engine or replica failed: every later row would fail too, so the job stops (rerun to resume)."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


@dataclass
class Row:
    line: int
    id: str | int
    prompt_ids: list[int]
    continuation_start: int | None
    params: SamplingParams
    custom: bool = False


# ---- reading --------------------------------------------------------------------------------------------------
def read_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes without the line end) for each non-blank line, split on b"\\n" only.

    A line over MAX_ROW_BYTES is yielded as None (and skipped over without being held in memory)."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_ROW_BYTES + 2)  # + "\r\n"
            if not raw:
                return
            lineno += 1
            if not raw.endswith(b"\n") and len(raw) > MAX_ROW_BYTES:
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(1 << 20)
                yield lineno, None
                continue
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            if len(raw) > MAX_ROW_BYTES:
                yield lineno, None
            elif raw.strip():
                yield lineno, raw


def _row_id(obj: dict):
    """The row's id (a non-empty string or an integer, type kept), or RowError."""
    field = "custom_id" if "custom_id" in obj else "id"
    rid = obj.get(field)
    if rid is None or rid == "":
        raise RowError("row has no 'id' (or 'custom_id')")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise RowError(f"'{field}' must be a non-empty string or an integer, got {json.dumps(rid)[:80]}")
    if isinstance(rid, str) and lone_surrogate_path(rid) is not None:
        raise RowError(f"'{field}' holds a lone surrogate; JSON strings must be valid Unicode")
    return rid


def id_key(rid) -> tuple[str, str | int] | None:
    """Identity of an id: its JSON type and value, so 7 and "7" differ; None for anything that is not an id."""
    if isinstance(rid, str) and rid:
        return ("str", rid)
    if isinstance(rid, int) and not isinstance(rid, bool):
        return ("int", rid)
    return None


def decode_row(raw: bytes) -> tuple[dict, str | int]:
    """Input line bytes -> (JSON object, id), or RowError."""
    try:
        obj = loads_strict(raw)
    except JSONInputError as e:
        raise RowError(f"the line is {e}" if e.code == "invalid_encoding" else str(e)) from None
    if not isinstance(obj, dict):
        raise RowError("a row must be a JSON object")
    return obj, _row_id(obj)


def build_row(n: int, obj: dict, rid, tokenizer, mode: str, max_model_len: int,
              default_max_tokens: int | None) -> Row:
    """A decoded row -> Row (tokenized, SamplingParams built); raises on anything wrong with it."""
    custom = "custom_id" in obj
    body = obj.get("body", obj) if custom else obj
    if not isinstance(body, dict):
        raise ValueError("'body' must be an object")
    bad = lone_surrogate_path(body, "body" if custom else "")
    if bad is not None:
        raise ValueError(f"'{bad or 'row'}' holds a lone surrogate; JSON strings must be valid Unicode")
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
    continuation = body.get("continuation")
    if mode == "logprobs" and continuation is not None:
        if not isinstance(continuation, str):
            raise ValueError(f"'continuation' must be a string, got {type(continuation).__name__}")
        if continuation:
            start = len(ids)
            ids = ids + tokenizer.encode(continuation, add_bos=False)
    kw = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    if mode == "logprobs":
        kw.update(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    else:
        if default_max_tokens is not None:
            kw.setdefault("max_tokens", default_max_tokens)
    params = SamplingParams(**kw)  # validates types and ranges
    if len(ids) + params.max_tokens > max_model_len:
        raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} exceeds the context of "
                         f"{max_model_len}")
    return Row(n, rid, ids, start, params, custom)


def load_done(output: Path) -> tuple[set[int], set[tuple]]:
    """(lines with an output row, id keys with a result row) already in `output`; a torn last line (a crash
    mid-write) is truncated away."""
    lines, result_ids = set(), set()
    if not output.exists():
        return lines, result_ids
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(output, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    for raw in data[:keep].split(b"\n"):
        try:
            row = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if not isinstance(row, dict):
            continue
        if isinstance(row.get("line"), int):
            lines.add(row["line"])
        key = id_key(row.get("id"))
        if key is not None and "error" not in row:
            result_ids.add(key)
    return lines, result_ids


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


def _error_text(e: BaseException) -> str:
    text = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    return text[:MAX_ERROR_CHARS]


# ---- writing --------------------------------------------------------------------------------------------------
class Output:
    """The append-only output: one JSON object per line, flushed per row, fsynced at checkpoints."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")
        self.unsynced, self.synced_at = 0, time.monotonic()

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj) + "\n")  # ASCII-only: no raw "\r" or surrogates reach the file
        self.f.flush()
        self.unsynced += 1
        if self.unsynced >= CHECKPOINT_ROWS or time.monotonic() - self.synced_at > CHECKPOINT_S:
            self.sync()

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.unsynced, self.synced_at = 0, time.monotonic()

    def close(self) -> None:
        self.sync()
        self.f.close()


class Progress:
    """Rows done/total, tokens/s and ETA on stderr, at most once a second."""

    def __init__(self, total: int):
        self.total, self.done, self.start, self.t0, self.tokens = total, 0, 0, time.monotonic(), 0
        self._last = 0.0

    def skip(self) -> None:
        self.done += 1
        self.start += 1

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


# ---- running --------------------------------------------------------------------------------------------------
class Scorer:
    """Feeds rows to the engine (at most `max_in_flight` at once) and writes one output row per input row.

    A step that raises (a sampling error no row-level check caught) cannot be pinned on one row of the batch:
    every row in flight is aborted and rerun alone, so only the guilty row gets the error row."""

    def __init__(self, engine, out: Output, mode: str = "complete", max_in_flight: int = 32, total_rows: int = 0):
        self.engine, self.out, self.mode, self.max_in_flight = engine, out, mode, max(1, max_in_flight)
        self.summary = {"rows": total_rows, "scored": 0, "errors": 0, "skipped": 0, "tokens": 0}
        self.progress = Progress(total_rows)
        self.in_flight: dict[str, tuple[Row, float]] = {}
        self.line = 0  # the input line being handled, for the failure message

    def error(self, line: int, rid, message: str) -> None:
        self.out.write({"line": line, "id": rid, "error": message})
        self.summary["errors"] += 1
        self.progress.update(1, 0)

    def submit(self, row: Row) -> None:
        """Admit a row (an admission error becomes its error row), then step until there is room for another."""
        if self._add(row):
            self.drain(self.max_in_flight - 1)

    def drain(self, until: int) -> None:
        while len(self.in_flight) > until:
            try:
                outs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a row's fault unless the engine says it failed
                self._check_alive(e)
                self._isolate(e)
                continue
            self._collect(outs)

    def _add(self, row: Row) -> bool:
        key = f"{ENGINE_KEY_PREFIX}{row.line}"
        try:
            self.engine.add_request(key, row.prompt_ids, row.params)
        except Exception as e:  # noqa: BLE001 - admission errors (seed range, cache fit, ...) are the row's
            self._check_alive(e)
            self._abort(key)
            self.error(row.line, row.id, f"not admitted: {_error_text(e)}")
            return False
        self.in_flight[key] = (row, time.monotonic())
        return True

    def _collect(self, outs) -> None:
        if not outs and self.in_flight and not self.engine.has_work():
            raise self._failed(f"the engine dropped {len(self.in_flight)} rows in flight without finishing them")
        for out in outs:
            if not out.finished or out.request_id not in self.in_flight:
                continue
            row, t0 = self.in_flight.pop(out.request_id)
            if getattr(out, "error", None):  # the engine failed this request alone (e.g. its sampling raised)
                self.error(row.line, row.id, f"failed in the engine: {out.error}"[:MAX_ERROR_CHARS])
                continue
            try:
                res = result_row(row, out, self.mode, time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - an output this row's result cannot be made from
                self.error(row.line, row.id, f"no result: {_error_text(e)}")
                continue
            self.out.write(res)
            n_tok = len(row.prompt_ids) + sum(len(c.token_ids) for c in out.outputs)
            self.summary["scored"] += 1
            self.summary["tokens"] += n_tok
            self.progress.update(1, n_tok)

    def _isolate(self, first: Exception) -> None:
        suspects = [row for row, _ in self.in_flight.values()]
        for key in list(self.in_flight):
            self._abort(key)
        self.in_flight.clear()
        if len(suspects) == 1:
            self.error(suspects[0].line, suspects[0].id, f"sampling failed: {_error_text(first)}")
            return
        for row in suspects:
            if not self._add(row):
                continue
            key = f"{ENGINE_KEY_PREFIX}{row.line}"
            while key in self.in_flight:
                try:
                    outs = self.engine.step()
                except Exception as e:  # noqa: BLE001
                    self._check_alive(e)
                    self._abort(key)
                    self.in_flight.pop(key)
                    self.error(row.line, row.id, f"sampling failed: {_error_text(e)}")
                    break
                self._collect(outs)

    def _abort(self, key: str) -> None:
        try:
            self.engine.abort(key)
        except Exception as e:  # noqa: BLE001 - an abort that fails leaves the engine in doubt
            self._check_alive(e)
            raise self._failed(f"aborting {key} failed: {_error_text(e)}") from e

    def _check_alive(self, e: Exception) -> None:
        failed = getattr(self.engine, "failed", None)
        if failed or isinstance(e, ReplicaError):
            raise self._failed(str(failed or e)) from e

    def _failed(self, reason: str) -> EngineFailed:
        return EngineFailed(f"the engine failed while scoring line {self.line} ({reason}); the {len(self.in_flight)} "
                            f"rows in flight and every later line are not scored yet: rerun with the same output "
                            f"to resume", self.summary)


def score(llm, input_path: str | Path, output_path: str | Path, mode: str = "complete", max_in_flight: int = 32,
          default_max_tokens: int | None = None) -> dict:
    """Score every line of `input_path` that has no row in `output_path` yet through `llm`'s engine.

    Returns (and prints to stderr) a summary: rows (non-blank input lines), scored, errors, skipped (already in
    the output), tokens, seconds, tokens_per_s. Raises EngineFailed (summary attached) if the engine fails."""
    if mode not in ("complete", "logprobs"):
        raise ValueError(f"mode must be 'complete' or 'logprobs', got {mode!r}")
    inp, outp = Path(input_path), Path(output_path)
    if not inp.exists():
        raise FileNotFoundError(f"input {inp} does not exist")
    done_lines, result_ids = load_done(outp)
    total = sum(1 for _ in read_lines(inp))
    out = Output(outp)
    scorer = Scorer(llm.engine, out, mode, max_in_flight, total)
    summary, progress = scorer.summary, scorer.progress
    first_line: dict[tuple, int] = {}  # id key -> the first line with that id in this input
    t_start = time.monotonic()
    status = "stopped"
    try:
        for lineno, raw in read_lines(inp):
            scorer.line = lineno
            obj, rid, row_error = None, None, f"the line is longer than {MAX_ROW_BYTES} bytes"
            if raw is not None:
                try:
                    obj, rid = decode_row(raw)
                except Exception as e:  # noqa: BLE001 - anything wrong with one line is that line's error row
                    row_error = _error_text(e)
            key = id_key(rid)
            first = first_line.setdefault(key, lineno) if key is not None else lineno
            if lineno in done_lines or (key in result_ids and first == lineno):
                summary["skipped"] += 1  # this line (or, for an edited input, this id) is done
                progress.skip()
                continue
            if obj is None:
                scorer.error(lineno, rid, row_error)
                continue
            if first != lineno:
                scorer.error(lineno, rid, f"duplicate id {rid!r} (line {first} has it)")
                continue
            try:
                row = build_row(lineno, obj, rid, llm.tokenizer, mode, llm.max_model_len, default_max_tokens)
            except Exception as e:  # noqa: BLE001
                scorer.error(lineno, rid, _error_text(e))
                continue
            scorer.submit(row)
        scorer.drain(0)
        status = "done"
    finally:
        out.close()
        summary["seconds"] = round(time.monotonic() - t_start, 3)
        summary["tokens_per_s"] = round(summary["tokens"] / max(1e-9, summary["seconds"]), 1)
        progress.update(0, 0, final=True)
        print(f"[v4ray score] {status}: {summary['rows']} rows: {summary['scored']} scored, {summary['errors']} "
              f"errors, {summary['skipped']} skipped; {summary['tokens']} tokens in {summary['seconds']} s "
              f"({summary['tokens_per_s']} tokens/s)", file=sys.stderr, flush=True)
    return summary


def engine_args(args) -> dict:
    """EngineConfig fields the command line sets; every other field keeps EngineConfig's default. The engine
    runs as many sequences as rows may be in flight."""
    given = ("dtype", "max_model_len", "device", "kv_cache_dtype", "gpus_per_router", "gpus_per_shard")
    kwargs = {k: getattr(args, k) for k in given if getattr(args, k, None) is not None}
    if getattr(args, "enforce_eager", False):
        kwargs["enforce_eager"] = True
    kwargs["max_num_seqs"] = max(1, args.max_in_flight)
    if args.expert_shards:
        kwargs.update(num_routers=args.routers, num_expert_shards=args.expert_shards)
    return kwargs


def main(args) -> int:
    from .llm import LLM

    inp, outp = Path(args.input).resolve(), Path(args.output).resolve()
    address = args.address or os.environ.get("RAY_ADDRESS")
    with LLM(model=args.model, address="auto" if address and args.expert_shards else None,
             **engine_args(args)) as llm:
        try:
            summary = score(llm, inp, outp, args.mode, args.max_in_flight, args.max_tokens)
        except EngineFailed as e:
            print(f"v4ray score: {e}", file=sys.stderr, flush=True)
            print(json.dumps({"summary": e.summary, "output": str(outp), "error": str(e)}), flush=True)
            return 1
    print(json.dumps({"summary": summary, "output": str(outp)}), flush=True)
    return 0
