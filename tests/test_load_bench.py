"""bench/load.py at real width (hidden 4096, 64 heads, real expert size; small vocabulary, one layer, 8 experts):
each rank of router + 2 expert shards, and the single-process model, reads from the files only what it keeps
and peaks at no more than its own weights; the distributed forward equals the single-process one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

# Bytes read from storage over the bytes of the rank's own tensors in the files. Above 1: file headers, the index
# and pages shared by two tensors are read too (well under 1 % here). Below 0.95 the page cache was not cold, and
# the count would not measure the loader.
READ_OVER_OWN = (0.95, 1.05)
# Bytes read over bytes kept: issue 16's goal (below 1 where fp32 linears are widened from bf16 on load).
READ_OVER_KEPT = 1.05
# Peak RSS growth over the weights kept: the loader holds at most one conversion chunk (model/loader.py
# CHUNK_ELEMENTS) beyond what it keeps, plus Python objects and allocator slack (2-5 % here). 1.2 is issue 16's goal.
RSS_OVER_KEPT = 1.2


@pytest.mark.timeout(600)
def test_ranks_read_and_hold_only_their_own_weights(tmp_path):
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "load.py"), "--small", "--dir", str(tmp_path),
                        "--json", str(out)], capture_output=True, text=True, timeout=580, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["ranks"]) == {"router", "shard0", "shard1", "single"}
    for role, rank in res["ranks"].items():
        assert READ_OVER_OWN[0] <= rank["read_over_stored"] <= READ_OVER_OWN[1], (role, rank)
        assert rank["read_over_kept"] <= READ_OVER_KEPT, (role, rank)
        assert rank["rss_over_kept"] <= RSS_OVER_KEPT, (role, rank)
    ranks = res["ranks"]
    assert ranks["shard0"]["experts"] == ranks["shard1"]["experts"] == 4
    # The shards split the experts: router and shards together keep what the single process keeps.
    assert sum(ranks[r]["kept_bytes"] for r in ("router", "shard0", "shard1")) == ranks["single"]["kept_bytes"]
    assert res["forward"]["finite"] and res["forward"]["equal"], res["forward"]
