"""Batch scoring: `ray job submit -- v4ray score ...` against a real local head, exactly once, resumable."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Log-likelihoods from the job vs the offline LLM: same fp32 model, different batch compositions; summation
# order differences are ~1e-6 per token, so 1e-3 on a sum over <= 40 tokens is tight but safe.
LL_ABS_TOL = 1e-3
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real `ray start --head` on 127.0.0.1 with the dashboard (job server); stopped by killing its group."""
    dash, gcs = _port(), _port()
    # Ray 2.60 turns token auth on for a new head; clients must ask for it too (RAY_AUTH_MODE=token)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    # every port explicit: the session's simulated cluster already holds Ray's default agent ports
    ports = [f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
             f"--runtime-env-agent-port={_port()}", f"--metrics-export-port={_port()}"]
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
