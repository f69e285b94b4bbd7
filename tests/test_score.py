"""Batch scoring: `ray job submit -- v4ray score ...` against a real local head, exactly once, resumable."""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

# Log-likelihoods from the job vs the offline LLM: same fp32 model, different batch compositions; summation
# order differences are ~1e-6 per token, so 1e-3 on a sum over <= 40 tokens is tight but safe.
LL_ABS_TOL = 1e-3
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real `ray start --head` on 127.0.0.1 with the dashboard (job server); stopped by killing its group."""
    dash, gcs = free_port(), free_port()
    # Ray 2.60 turns token auth on for a new head; clients must ask for it too (RAY_AUTH_MODE=token). The token
    # is this fixture's own (a fresh machine has no ~/.ray/auth_token, and `ray start` would refuse to run).
    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    # every port explicit: the session's simulated cluster already holds Ray's default agent ports
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    proc = subprocess.Popen(RAY + ["start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                                   "--include-dashboard=true", "--disable-usage-stats", *ports],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"

    def stop():
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # gcs, raylet, dashboard, workers share the group
        except ProcessLookupError:
            pass
        _kill_job_drivers(gcs)  # job drivers run in sessions of their own

    try:
        deadline = time.time() + 120
        while True:
            r = subprocess.run(RAY + ["job", "list", "--address", url], capture_output=True, text=True, env=env)
            if r.returncode == 0:
                break
            assert time.time() < deadline and proc.poll() is None, f"head did not start: {r.stderr[-2000:]}"
            time.sleep(1)
    except BaseException:
        stop()
        raise
    yield {"url": url, "env": env}
    stop()


def _kill_job_drivers(gcs_port: int) -> None:
    """Kill processes whose RAY_ADDRESS points at our head (job drivers outlive the head otherwise)."""
    needle = f"RAY_ADDRESS=127.0.0.1:{gcs_port}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def _rows(n: int) -> list[dict]:
    return [{"id": f"row-{i}", "prompt": "".join(chr(97 + (i * 7 + k) % 26) for k in range(5 + i % 30)),
             **({"continuation": " and more"} if i % 5 == 0 else {})} for i in range(n)]


def _write(path: Path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows]
    for at, line in extra_lines:
        lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n")


def _submit(head, *args, wait=True):
    cmd = RAY + ["job", "submit", "--address", head["url"]] + ([] if wait else ["--no-wait"]) + \
        ["--", "v4ray", "score", *args]
    deadline = time.time() + 90
    while True:  # the head's job agent comes up a little after its dashboard
        r = subprocess.run(cmd, capture_output=True, text=True, env=head["env"], timeout=600)
        if "No available agent" not in r.stderr or time.time() > deadline:
            return r
        time.sleep(2)


def _read(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_job_scores_every_row_exactly_once_matching_offline_llm(head, tiny_ckpt, tmp_path):
    from v4ray import LLM, SamplingParams

    ckpt = tiny_ckpt("v4-tiny-swa")
    rows = _rows(240)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, rows)
    r = _submit(head, "--model", str(ckpt), "--input", str(inp), "--output", str(out), "--mode", "logprobs")
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    results = _read(out)
    assert sorted(x["id"] for x in results) == sorted(x["id"] for x in rows)  # each id exactly once
    llm = LLM(model=ckpt, dtype="float32")
    by_id = {x["id"]: x for x in results}
    for row in rows[::12]:
        ids = llm.tokenizer.encode(row["prompt"])
        start = len(ids) if "continuation" in row else 1
        ids += llm.tokenizer.encode(row.get("continuation", ""), add_bos=False)
        ref = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        ll = sum(ref.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids)))
        got = by_id[row["id"]]
        assert got["log_likelihood"] == pytest.approx(ll, abs=LL_ABS_TOL)
        assert got["perplexity"] == pytest.approx(math.exp(-ll / (len(ids) - start)), rel=1e-3)


def test_killed_job_resubmitted_completes_without_duplicates_or_gaps(head, tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("v4-tiny")
    rows = _rows(300)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, rows)
    args = ["--model", str(ckpt), "--input", str(inp), "--output", str(out), "--mode", "complete",
            "--max-tokens", "24", "--max-in-flight", "4"]
    r = _submit(head, *args, wait=False)
    job = next((w.strip("'\"") for w in (r.stdout + r.stderr).split() if "raysubmit_" in w), None)
    assert job, r.stdout[-2000:] + r.stderr[-2000:]
    job = job[job.index("raysubmit_"):].strip("'\".,")
    deadline = time.time() + 120
    while not out.exists() or len(out.read_text().splitlines()) < 12:
        if time.time() > deadline:
            logs = subprocess.run(RAY + ["job", "logs", "--address", head["url"], job], capture_output=True,
                                  text=True, env=head["env"])
            pytest.fail(f"the job wrote nothing: {r.stdout[-1000:]} {logs.stdout[-3000:]} {logs.stderr[-1000:]}")
        time.sleep(0.2)
    subprocess.run(RAY + ["job", "stop", "--address", head["url"], job], capture_output=True, env=head["env"],
                   timeout=120)
    written = len(out.read_text().splitlines())
    assert 0 < written < len(rows)
    r = _submit(head, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    ids = [x["id"] for x in _read(out)]
    assert len(ids) == len(set(ids)) == len(rows)


def test_malformed_rows_become_error_rows(tiny_ckpt, tmp_path):
    from v4ray import LLM
    from v4ray.cluster.score import score

    rows = _rows(6)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, rows + [{"id": "row-2", "prompt": "duplicate"}, {"id": "empty", "prompt": ""},
                        {"id": "long", "prompt": "x" * 3000}],
           extra_lines=[(1, "{broken json"), (3, json.dumps({"prompt": "no id"}))])
    llm = LLM(model=tiny_ckpt("v4-tiny-swa"), dtype="float32", max_model_len=1024)
    summary = score(llm, inp, out, mode="complete", default_max_tokens=4)
    results = _read(out)
    errors = [x for x in results if "error" in x]
    assert summary["scored"] == 6 and summary["errors"] == 5 == len(errors)
    assert {e["line"] for e in errors} == {2, 4, 9, 10, 11}
    assert sorted(x["id"] for x in results if "error" not in x) == sorted(r["id"] for r in rows)
    again = score(llm, inp, out, mode="complete", default_max_tokens=4)   # rerun: nothing is written twice
    assert again["scored"] == again["errors"] == 0 and len(_read(out)) == len(results)
    with open(out, "a") as f:  # a crash mid-write leaves a torn line: it is cut, and the row rescored
        f.write('{"id": "row-9", "compl')
    score(llm, inp, out, mode="complete", default_max_tokens=4)
    assert len(_read(out)) == len(results)


# ---- one row never stops the job (in-process engine, tiny model, a few tokens per row) ---------------------

# Each line fails on its own: a type, a value the engine or sampler rejects, unreadable text or nesting. The
# repetition penalty sends inf logits to the sampler; the seed does not fit torch's generator.
BAD_ROWS = {
    "max_tokens_string": '{"id": "b1", "prompt": "abc", "max_tokens": "10"}',
    "max_tokens_list": '{"id": "b2", "prompt": "abc", "max_tokens": [5]}',
    "lone_surrogate": '{"id": "b3", "prompt": "a\\ud800b"}',
    "tiny_repetition_penalty": '{"id": "b4", "prompt": "abcdefgh", "repetition_penalty": 1e-39, "temperature": 1}',
    "deep_json": '{"id": "b5", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "seed_2_pow_64": json.dumps({"id": "b6", "prompt": "abc", "seed": 2**64}),
    "not_utf8": b'{"id": "b7", "prompt": "\xff\xfe"}',
    "id_is_a_list": '{"id": [1], "prompt": "abc"}',
}


@pytest.fixture
def tiny_llm(tiny_ckpt):
    """A fresh engine per test (loading the tiny model takes milliseconds): one test's crash cannot leak."""
    from v4ray import LLM

    return LLM(model=tiny_ckpt("v4-tiny-swa"), dtype="float32", max_model_len=512, max_num_seqs=8)


def _write_lines(path: Path, lines) -> None:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))


def _rows_by_line(path: Path) -> dict[int, list[dict]]:
    by_line: dict[int, list[dict]] = {}
    for text in path.read_text().split("\n"):
        if text:
            row = json.loads(text)
            by_line.setdefault(row["line"], []).append(row)
    return by_line


def _assert_one_row_per_line(path: Path, good: dict[int, object], bad: set[int]) -> None:
    """Every good line (line -> id) has exactly one result with its id, every bad line exactly one error row."""
    by_line = _rows_by_line(path)
    assert {n: len(rows) for n, rows in by_line.items() if len(rows) != 1} == {}
    assert set(by_line) == set(good) | bad
    assert {n for n, (row,) in by_line.items() if "error" in row} == bad
    for n, rid in good.items():
        (row,) = by_line[n]
        assert "error" not in row and type(row["id"]) is type(rid) and row["id"] == rid, row


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_row_becomes_its_error_row_and_the_job_goes_on(tiny_llm, tmp_path, name):
    from v4ray.cluster.score import score

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_lines(inp, [json.dumps({"id": "before", "prompt": "hello there"}), BAD_ROWS[name],
                       json.dumps({"id": "after", "prompt": "general kenobi"})])
    summary = score(tiny_llm, inp, out, max_in_flight=4, default_max_tokens=3)
    _assert_one_row_per_line(out, {1: "before", 3: "after"}, {2})
    assert (summary["scored"], summary["errors"]) == (2, 1)
    (error,) = _rows_by_line(out)[2]
    assert error["error"] and error["id"] == (None if name in ("deep_json", "not_utf8", "id_is_a_list")
                                              else f"b{list(BAD_ROWS).index(name) + 1}")


def test_mixed_file_each_line_exactly_one_row_across_kills_and_reruns(tiny_llm, tmp_path):
    """Good rows batched with every bad row and a duplicate id; then a kill is simulated twice: rows that were
    in flight are lost (the duplicate's error row was written, its first line's result was not), and the last
    row is torn mid-line. Reruns complete the file without writing any line twice."""
    from v4ray.cluster.score import score

    lines, good, bad = [], {}, set()
    for i, text in enumerate(BAD_ROWS.values()):
        lines.append(json.dumps({"id": f"g{i}", "prompt": f"good row {i} " * (1 + i % 3), "max_tokens": 2 + i % 3}))
        good[len(lines)] = f"g{i}"
        lines.append(text)
        bad.add(len(lines))
    lines.append(json.dumps({"id": "g0", "prompt": "a second row with id g0"}))
    bad.add(len(lines))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_lines(inp, lines)
    first = score(tiny_llm, inp, out, max_in_flight=4, default_max_tokens=3)
    _assert_one_row_per_line(out, good, bad)
    assert (first["scored"], first["errors"], first["skipped"]) == (len(good), len(bad), 0)

    again = score(tiny_llm, inp, out, max_in_flight=4, default_max_tokens=3)
    assert (again["scored"], again["errors"], again["skipped"]) == (0, 0, len(lines))
    _assert_one_row_per_line(out, good, bad)

    # killed while lines 1 (g0, whose duplicate's error row is already written) and 5 were in flight
    kept = [t for t in out.read_text().split("\n") if t and json.loads(t)["line"] not in (1, 5)]
    out.write_text("".join(t + "\n" for t in kept))
    resumed = score(tiny_llm, inp, out, max_in_flight=4, default_max_tokens=3)
    assert (resumed["scored"], resumed["errors"]) == (2, 0)
    _assert_one_row_per_line(out, good, bad)

    # killed mid-write: the last row is torn, three bad lines were never reached
    kept = [t for t in out.read_text().split("\n") if t and json.loads(t)["line"] not in (2, 4, 6)]
    out.write_text("".join(t + "\n" for t in kept)[:-25])
    resumed = score(tiny_llm, inp, out, max_in_flight=4, default_max_tokens=3)
    assert resumed["errors"] >= 3 and resumed["scored"] + resumed["errors"] == 4
    _assert_one_row_per_line(out, good, bad)


def test_ids_keep_their_json_type(tiny_llm, tmp_path):
    from v4ray.cluster.score import score

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_lines(inp, ['{"id": 7, "prompt": "seven"}', '{"id": "7", "prompt": "seven as text"}',
                       '{"custom_id": 9, "body": {"prompt": "nine"}}', '{"id": 7, "prompt": "seven again"}',
                       '{"id": true, "prompt": "a bool is not an id"}', '{"id": 1.5, "prompt": "nor a float"}'])
    summary = score(tiny_llm, inp, out, default_max_tokens=2)
    _assert_one_row_per_line(out, {1: 7, 2: "7", 3: 9}, {4, 5, 6})
    assert '"id": 7,' in out.read_text() and '"id": "7",' in out.read_text()
    by_line = _rows_by_line(out)
    assert by_line[3][0]["custom_id"] == 9 and by_line[4][0]["id"] == 7 and "duplicate" in by_line[4][0]["error"]
    assert by_line[5][0]["id"] is None and by_line[6][0]["id"] is None
    assert (summary["scored"], summary["errors"]) == (3, 3)
    assert score(tiny_llm, inp, out, default_max_tokens=2)["skipped"] == 6  # "7" is not taken for 7 on resume
    _assert_one_row_per_line(out, {1: 7, 2: "7", 3: 9}, {4, 5, 6})


def test_lines_split_only_on_newline(tiny_llm, tmp_path):
    from v4ray.cluster.score import score

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b'{"id": "cr",\r"prompt":\r"a bare CR between tokens"}\n'    # 1: one row, scored
                    b'{"id": "crlf", "prompt": "a Windows line end"}\r\n'         # 2: CRLF is one line end
                    b'\r\n'                                                       # 3: blank
                    b'{"id": "raw", "prompt": "a raw\rCR inside a string"}\n'     # 4: one row, invalid JSON
                    b'{"id": "last", "prompt": "no final newline"}')              # 5
    summary = score(tiny_llm, inp, out, default_max_tokens=2)
    _assert_one_row_per_line(out, {1: "cr", 2: "crlf", 5: "last"}, {4})
    assert summary["rows"] == 4 and (summary["scored"], summary["errors"]) == (3, 1)


def test_summary_returned_and_printed(tiny_llm, tmp_path, capsys):
    from v4ray.cluster.score import score

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_lines(inp, [json.dumps({"id": i, "prompt": "x" * (3 + i)}) for i in range(5)] + ["{not json"])
    summary = score(tiny_llm, inp, out, default_max_tokens=3)
    assert {k: summary[k] for k in ("rows", "scored", "errors", "skipped")} == \
        {"rows": 6, "scored": 5, "errors": 1, "skipped": 0}
    results = [json.loads(t) for t in out.read_text().split("\n") if t and "error" not in t]
    assert summary["tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in results) > 0
    assert summary["seconds"] > 0
    err = capsys.readouterr().err
    assert "done: 6 rows: 5 scored, 1 errors, 0 skipped" in err and f"{summary['tokens']} tokens" in err
    again = score(tiny_llm, inp, out, default_max_tokens=3)
    assert {k: again[k] for k in ("rows", "scored", "errors", "skipped", "tokens")} == \
        {"rows": 6, "scored": 0, "errors": 0, "skipped": 6, "tokens": 0}
    assert "done: 6 rows: 0 scored, 0 errors, 6 skipped" in capsys.readouterr().err


def test_a_row_that_fails_inside_the_engine_fails_alone(tiny_llm, tmp_path):
    """Defence in depth: parameters that got past validation (changed after it) fail inside the engine, at
    admission (a seed torch's generator cannot take) or in a step shared with other rows (inf logits reach the
    sampler). Only that row gets an error row; the rows batched with it are scored, and the engine is clean."""
    from v4ray import SamplingParams
    from v4ray.cluster.score import Output, Scorer, build_row

    rows = [build_row(n, {"id": f"r{n}", "prompt": f"row {n} " + "abcdefgh" * 4}, f"r{n}", tiny_llm.tokenizer,
                      "complete", tiny_llm.max_model_len, 3) for n in range(1, 7)]
    rows[1].params.seed = 2**64
    rows[3].params.repetition_penalty, rows[3].params.temperature = 1e-39, 1.0
    path = tmp_path / "out.jsonl"
    out = Output(path)
    scorer = Scorer(tiny_llm.engine, out, max_in_flight=len(rows))
    for row in rows:
        scorer.submit(row)
    scorer.drain(0)
    out.close()
    _assert_one_row_per_line(path, {1: "r1", 3: "r3", 5: "r5", 6: "r6"}, {2, 4})
    assert (scorer.summary["scored"], scorer.summary["errors"]) == (4, 2)
    assert not tiny_llm.engine.has_work()
    assert len(tiny_llm.generate("still works", SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2


def test_dead_replica_stops_the_job_and_a_rerun_completes_it(ray_session, tiny_ckpt, tmp_path):
    """A dead expert shard is not any row's fault: the job stops with EngineFailed instead of writing an error
    row for every later line, and a rerun on a healthy engine scores each line exactly once."""
    from v4ray import LLM
    from v4ray.cluster.score import EngineFailed, score

    ckpt = tiny_ckpt("v4-tiny")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_lines(inp, [json.dumps({"id": i, "prompt": f"row {i} abc"}) for i in range(1, 9)] + ["{not json"])
    with LLM(model=ckpt, dtype="float32", max_model_len=256, num_expert_shards=1, max_num_seqs=4,
             replica_options={"step_timeout_s": 30.0}) as llm:
        ray_session.kill(llm.replica.shards[0], no_restart=True)
        with pytest.raises(EngineFailed, match="failed") as failed:
            score(llm, inp, out, max_in_flight=4, default_max_tokens=2)
    assert failed.value.summary["scored"] == 0 and failed.value.summary["errors"] == 0
    assert not out.exists() or out.read_text() == ""
    summary = score(LLM(model=ckpt, dtype="float32", max_model_len=256), inp, out, default_max_tokens=2)
    assert (summary["scored"], summary["errors"], summary["skipped"]) == (8, 1, 0)
    _assert_one_row_per_line(out, {i: i for i in range(1, 9)}, {9})


def test_duplicate_id_error_row_is_written_once_across_a_resume(tiny_llm, tmp_path):
    """Killed while the first row with id "a" was in flight, after the duplicate's error row was written: the
    rerun scores the first row and does not write the duplicate's error row again."""
    from v4ray.cluster.score import score

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_lines(inp, ['{"id": "a", "prompt": "first"}', '{"id": "b", "prompt": "second"}',
                       '{"id": "a", "prompt": "third, a duplicate"}'])
    score(tiny_llm, inp, out, default_max_tokens=2)
    _assert_one_row_per_line(out, {1: "a", 2: "b"}, {3})
    out.write_text("".join(t + "\n" for t in out.read_text().split("\n") if t and json.loads(t)["line"] != 1))
    resumed = score(tiny_llm, inp, out, default_max_tokens=2)
    assert (resumed["scored"], resumed["errors"], resumed["skipped"]) == (1, 0, 2)
    _assert_one_row_per_line(out, {1: "a", 2: "b"}, {3})
