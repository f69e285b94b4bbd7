"""KVCacheService spill files: key validation, atomic private files, torn files, disk budget, start-up cleanup.

The service class runs in this process (the actor's code without the Ray transport, which test_prefix_cache
covers); every check reads the real files on disk."""

from __future__ import annotations

import gc
import stat

import numpy as np
import pytest
import safetensors.numpy

from v4ray.actors.kv_cache_service import SPILL_SUFFIX, UNIT_TOKENS, KVCacheService, chain_keys

UNIT_BYTES = 10_000
ROOT = "33" * 32


def _keys(i: int, units: int = 1) -> list[str]:
    return chain_keys(ROOT, list(range(i * 1000, i * 1000 + units * UNIT_TOKENS)))


def _store(svc: KVCacheService, i: int) -> list[str]:
    """Prefix i: one unit filled with i, a 100-byte boundary filled with i + 1."""
    keys = _keys(i)
    assert svc.store(keys, {0: np.full(UNIT_BYTES, i, np.uint8)}, np.full(100, i + 1, np.uint8))
    return keys


def _service(spill_dir, **kw) -> KVCacheService:
    return KVCacheService(budget_bytes=15_000, spill_dir=str(spill_dir), **kw)  # memory for one prefix


def _spill_files(d):
    return sorted(p for p in d.iterdir() if p.suffix == SPILL_SUFFIX)


@pytest.mark.parametrize("bad", ["../escaped", "/tmp/escaped", "AB" * 32, "0" * 63, "g" * 64, "0" * 64 + "/x", 7])
def test_non_hex_key_is_refused_and_nothing_is_written_outside(tmp_path, bad):
    d = tmp_path / "spill"
    svc = _service(d)
    for call in (lambda: svc.store([bad], {0: np.zeros(UNIT_BYTES, np.uint8)}, np.zeros(100, np.uint8)),
                 lambda: svc.store([*_keys(0), bad], {0: np.zeros(10, np.uint8), 1: np.zeros(10, np.uint8)},
                                   np.zeros(1, np.uint8)),
                 lambda: svc.lookup([bad]), lambda: svc.fetch([bad]), lambda: svc.missing([bad])):
        with pytest.raises(ValueError, match="not 64 lowercase hex digits"):
            call()
    for i in range(3):  # evictions spill whatever the service holds
        _store(svc, i)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spill"]
    assert [p.stem for p in _spill_files(d)] == sorted([_keys(0)[-1], _keys(1)[-1]])
    assert svc.stats()["units"] == 1


def test_spill_files_are_0600_safetensors_in_a_0700_directory(tmp_path):
    d = tmp_path / "spill"
    d.mkdir(mode=0o755)
    d.chmod(0o755)  # as an operator might create it
    svc = _service(d)
    for i in range(3):
        _store(svc, i)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = _spill_files(d)
    assert len(files) == 2
    for p in d.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
    arrays = safetensors.numpy.load_file(str(files[0]))  # raw bytes in safetensors, no pickle
    assert sorted(arrays) == ["boundary", "u0"] and set(np.unique(arrays["u0"])) <= {0, 1}


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage"])
def test_torn_spill_file_is_dropped_and_counted(tmp_path, damage):
    d = tmp_path / "spill"
    svc = _service(d)
    first = _store(svc, 0)
    _store(svc, 1)
    (path,) = _spill_files(d)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        path.write_bytes(data[:-50] + bytes([data[-50] ^ 1]) + data[-49:])  # inside the unit's bytes
    else:
        path.write_bytes(b"\x00" * 8)
    for _ in range(2):  # a miss each time, never an exception
        assert svc.lookup(first) == 0
    s = svc.stats()
    assert s["spill_dropped"] == 1 and s["spill_files"] == 0 and s["spill_bytes"] == 0
    assert not path.exists()
    assert svc.lookup(_keys(1)) == 1  # the service goes on serving


def test_disk_budget_evicts_least_recently_used(tmp_path):
    d = tmp_path / "spill"
    svc = _service(d, spill_budget_bytes=25_000)  # two spill files of ~10.3 KB
    keys = [_store(svc, i) for i in range(5)]     # memory holds 4; 0..3 spilled, 0 and 1 evicted from disk
    s = svc.stats()
    assert s["spill_files"] == 2 and s["spill_evictions"] == 2 and s["spill_bytes"] <= 25_000
    assert s["spill_bytes"] == sum(p.stat().st_size for p in _spill_files(d))
    assert [p.stem for p in _spill_files(d)] == sorted([keys[2][-1], keys[3][-1]])
    assert svc.lookup(keys[0]) == 0 and svc.lookup(keys[1]) == 0

    assert svc.lookup(keys[2]) == 1           # 2 comes back to memory (its file goes), 4 is spilled after 3
    units, boundary = svc.fetch(keys[2])
    assert (units[0] == 2).all() and (boundary == 3).all()
    _store(svc, 5)                            # 2 is spilled again: 3, the least recently used, leaves the disk
    assert sorted(p.stem for p in _spill_files(d)) == sorted([keys[4][-1], keys[2][-1]])
    assert svc.lookup(keys[3]) == 0 and svc.lookup(keys[4]) == 1
    assert svc.stats()["spill_bytes"] <= 25_000


def test_start_up_removes_temp_files_and_indexes_spills(tmp_path):
    d = tmp_path / "spill"
    first = _service(d)
    keys = [_store(first, i) for i in range(3)]  # 0 and 1 on disk
    with pytest.raises(ValueError, match="in use by another KVCacheService"):
        _service(d)
    (d / ".v4ray-tmp-abc123").write_bytes(b"half a spill")                  # a write cut before its rename
    (d / f"{'ab' * 32}{SPILL_SUFFIX}").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # unreadable
    (d / "notes.txt").write_text("the operator's")                            # not ours: left alone
    del first  # the process dies (its lock goes with it)
    gc.collect()

    again = _service(d)
    s = again.stats()
    assert s["spill_tmp_removed"] == 1 and s["spill_dropped"] == 1 and s["spill_files"] == 2
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".kvspill")) == sorted(
        [f"{keys[0][-1]}{SPILL_SUFFIX}", f"{keys[1][-1]}{SPILL_SUFFIX}", "notes.txt"])
    del again
    gc.collect()

    smaller = _service(d, spill_budget_bytes=15_000)  # a lowered budget applies to what is found at start
    s = smaller.stats()
    assert s["spill_files"] == 1 and s["spill_evictions"] == 1
    assert smaller.lookup(keys[0]) == 0                # the older spill went first
    assert smaller.lookup(keys[1]) == 1
    units, boundary = smaller.fetch(keys[1])
    assert (units[0] == 1).all() and (boundary == 2).all()
