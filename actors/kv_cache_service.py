"""KVCacheService: a named Ray actor keeping finished prefixes of V4's compressed cache for reuse.

Keys. A prefix is a chain of 128-token units; unit i's key is sha256(key of unit i-1 || its 128 token ids),
and the chain starts from a root that hashes the model's identity (`model/identity.py`: every weight byte, the
tokenizer, the config, the dtype) and the cache layout, so replicas of different models (or storage formats)
never share entries. Keys are 64 lowercase hex digits; the service refuses anything else.

Values. Each unit holds the compressed entries and indexer keys of every layer (one flat uint8 array). To
resume exactly at a prefix end a router also needs the boundary state there (window rings, compressor rings);
it is stored only at the end of each stored prefix, so bytes per cached token stay those of the compressed
entries. Arrays travel through Ray's object store as numpy buffers (zero-copy), never as Python lists.

Budget. Prefixes are the LRU unit: evicting one drops its boundary state and every unit no other stored
prefix uses. A store call is one actor method call with all its arrays as arguments: a caller that dies before
the call runs stores nothing, so no entry is ever half-written.

Spill. With a `spill_dir`, an evicted prefix is written to `<last key>.kvspill` (safetensors: raw array bytes
plus the unit keys and a sha256 of the arrays in its metadata, never pickle) and reloaded on a lookup that
reaches it. Writes are atomic (a temp file in the same directory, fsync, rename), files are 0600 in a 0700
directory, and the directory has its own byte budget (`spill_budget_bytes`, LRU: the oldest spill goes first).
A file that is torn or fails its checksum is deleted and counted (`spill_dropped`); its lookup is a miss. At
start the service takes an exclusive lock on the directory (one service per directory), removes leftover temp
files, and indexes the spill files already there (so a service Ray restarts keeps its spilled prefixes) after
checking their headers; unreadable ones are deleted. Other files in the directory are left alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from v4ray.engine.config import KV_CACHE_SERVICE as SERVICE_NAME
from v4ray.model.identity import TMP_PREFIX as _TMP_PREFIX
from v4ray.model.identity import write_atomic
from v4ray.model.kv_format import PREFIX_UNIT as UNIT_TOKENS

log = logging.getLogger(__name__)

SERVICE_NAMESPACE = "v4ray"
# Disk budget of a spill directory. A fixed size rather than a multiple of the memory budget, so raising the
# memory budget never silently multiplies disk use; 8 GiB holds 8x the default in-memory budget.
SPILL_BUDGET_BYTES = 8 << 30
SPILL_SUFFIX = ".kvspill"
SPILL_FORMAT = "v4ray-kv-spill/1"
_SPILL_LOCK = ".kvspill.lock"
_MAX_HEADER_BYTES = 64 << 20
_KEY = re.compile(r"[0-9a-f]{64}")

def chain_keys(root: str, token_ids: list[int], unit: int = UNIT_TOKENS) -> list[str]:
    """Key of every full `unit`-token block of `token_ids`, each chained on the previous one."""
    keys, prev = [], bytes.fromhex(root)
    for u in range(len(token_ids) // unit):
        block = np.asarray(token_ids[u * unit:(u + 1) * unit], dtype=np.int64).tobytes()
        prev = hashlib.sha256(prev + block).digest()
        keys.append(prev.hex())
    return keys


def root_key(model_identity: str, layout: str) -> str:
    return hashlib.sha256(f"v4ray-prefix/1|{model_identity}|{layout}".encode()).hexdigest()


def check_keys(keys: list[str]) -> None:
    """Every key must be a sha256 in lowercase hex (`chain_keys`' output): keys become spill file names."""
    if not isinstance(keys, list):
        raise ValueError(f"prefix cache keys must be a list of hex strings, got {type(keys).__name__}")
    for k in keys:
        if not isinstance(k, str) or not _KEY.fullmatch(k):
            raise ValueError(f"prefix cache key {k!r} is not 64 lowercase hex digits (a sha256 from chain_keys)")


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _spill_keys(meta: dict, last: str) -> tuple[list[str], int]:
    """The unit keys and spill sequence number recorded in a spill file's metadata, checked against its name."""
    if not isinstance(meta, dict) or meta.get("format") != SPILL_FORMAT:
        raise ValueError(f"not a {SPILL_FORMAT} file")
    keys = json.loads(meta["keys"])
    check_keys(keys)
    if not keys or keys[-1] != last:
        raise ValueError("its keys do not end with its file name")
    return keys, int(meta["seq"])


def _read_spill_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= _MAX_HEADER_BYTES:
            raise ValueError(f"header length {n}")
        return json.loads(f.read(n))["__metadata__"]


def _read_spill(path: Path, last: str) -> tuple[list[str], dict[int, np.ndarray], np.ndarray]:
    """Keys, units and boundary of a spill file; ValueError/OSError/SafetensorError if torn or corrupt."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if not 0 < n <= min(_MAX_HEADER_BYTES, len(data) - 8):
        raise ValueError(f"header length {n} in a {len(data)}-byte file")
    meta = json.loads(data[8:8 + n])["__metadata__"]
    keys, _ = _spill_keys(meta, last)
    arrays = safetensors.numpy.load(data)
    if set(arrays) != {"boundary", *(f"u{i}" for i in range(len(keys)))}:
        raise ValueError(f"arrays {sorted(arrays)} do not match its {len(keys)} keys")
    if _arrays_digest(arrays) != meta.get("sha256"):
        raise ValueError("checksum mismatch")
    return keys, {i: arrays[f"u{i}"] for i in range(len(keys))}, arrays["boundary"]


@dataclass
class _Prefix:
    keys: list[str]          # unit keys, in order
    boundary: np.ndarray     # uint8 boundary state at the prefix end


@dataclass
class _Spilled:
    keys: list[str]          # unit keys, in order
    nbytes: int              # file size


@dataclass
class _Stats:
    lookups: int = 0
    hits: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    bytes_served: int = 0
    evictions: int = 0
    stores: int = 0
    spilled: int = 0
    reloaded: int = 0
    rejected: int = 0
    spill_evictions: int = 0   # spill files deleted for the disk budget
    spill_dropped: int = 0     # spill files deleted as torn or corrupt (at start or on reload)
    spill_errors: int = 0      # spills that could not be written (disk full, permissions)
    spill_tmp_removed: int = 0  # leftover temp files removed at start


class KVCacheService:
    """The actor class (wrapped with `ray.remote` by `start_service`). All methods run one at a time.

    budget_bytes: memory for units and boundaries. spill_dir: where evicted prefixes go (None: they are
    dropped); the directory belongs to this service (made 0700, locked). spill_budget_bytes: disk budget of
    the spill files, default `SPILL_BUDGET_BYTES` (8 GiB)."""

    def __init__(self, budget_bytes: int, spill_dir: str | None = None,
                 spill_budget_bytes: int = SPILL_BUDGET_BYTES):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        if spill_budget_bytes <= 0:
            raise ValueError(f"spill_budget_bytes must be positive, got {spill_budget_bytes}")
        self.budget = budget_bytes
        self.units: dict[str, tuple[np.ndarray, int]] = {}        # key -> (payload, refcount)
        self.prefixes: OrderedDict[str, _Prefix] = OrderedDict()  # last unit key -> prefix, LRU order
        self.stats_ = _Stats()
        self.unit_bytes = 0
        self.boundary_bytes = 0
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self.spill_budget = spill_budget_bytes
        self.spilled: OrderedDict[str, _Spilled] = OrderedDict()  # last key -> file, oldest spill first
        self.spill_bytes = 0
        self._spill_seq = 0  # spill order, kept in each file: the LRU order survives a restart
        self._spill_lock = None
        if self.spill_dir:
            self._open_spill_dir()

    # ---- queries --------------------------------------------------------------------------------------------
    def lookup(self, keys: list[str]) -> int:
        """Number of leading units of `keys` that can be resumed from (a stored prefix ends there)."""
        check_keys(keys)
        self.stats_.lookups += 1
        self.stats_.lookup_tokens += len(keys) * UNIT_TOKENS
        for n in range(len(keys), 0, -1):
            k = keys[n - 1]
            if k in self.prefixes or (k in self.spilled and self._reload(k)):
                self.stats_.hits += 1
                self.stats_.hit_tokens += n * UNIT_TOKENS
                return n
        return 0

    def fetch(self, keys: list[str]) -> tuple[list[np.ndarray], np.ndarray] | None:
        """Units and boundary of the stored prefix ending at keys[-1]; None if it was evicted meanwhile."""
        check_keys(keys)
        p = self.prefixes.get(keys[-1]) if keys else None
        if p is None or p.keys != keys:
            return None
        self.prefixes.move_to_end(keys[-1])
        units = [self.units[k][0] for k in keys]
        self.stats_.bytes_served += sum(u.nbytes for u in units) + p.boundary.nbytes
        return units, p.boundary

    def missing(self, keys: list[str]) -> list[int]:
        """Indices of units the service does not hold (the caller sends only those)."""
        check_keys(keys)
        return [i for i, k in enumerate(keys) if k not in self.units]

    # ---- updates --------------------------------------------------------------------------------------------
    def store(self, keys: list[str], units: dict[int, np.ndarray], boundary: np.ndarray) -> bool:
        """Store the prefix ending at keys[-1]: `units` maps index -> payload for units not yet held."""
        check_keys(keys)
        if not keys or keys[-1] in self.prefixes:
            return False
        if any(k not in self.units and i not in units for i, k in enumerate(keys)):
            return False  # a unit was evicted between `missing` and `store`: the caller may retry
        new_bytes = boundary.nbytes + sum(u.nbytes for i, u in units.items() if keys[i] not in self.units)
        if new_bytes > self.budget:
            self.stats_.rejected += 1
            return False
        self._delete_spilled(keys[-1])  # held in memory now: a spilled copy would only be stale disk use
        for i, k in enumerate(keys):
            if k in self.units:
                payload, refs = self.units[k]
                self.units[k] = (payload, refs + 1)
            else:
                self.units[k] = (np.ascontiguousarray(units[i]), 1)
                self.unit_bytes += units[i].nbytes
        self.prefixes[keys[-1]] = _Prefix(list(keys), np.ascontiguousarray(boundary))
        self.boundary_bytes += boundary.nbytes
        self.stats_.stores += 1
        while self.unit_bytes + self.boundary_bytes > self.budget and len(self.prefixes) > 1:
            self._evict_oldest()
        return True

    def _evict_oldest(self) -> None:
        last, p = self.prefixes.popitem(last=False)
        if self.spill_dir is not None:
            self._spill(last, p)
        self.boundary_bytes -= p.boundary.nbytes
        for k in p.keys:
            payload, refs = self.units[k]
            if refs == 1:
                del self.units[k]
                self.unit_bytes -= payload.nbytes
            else:
                self.units[k] = (payload, refs - 1)
        self.stats_.evictions += 1

    # ---- spill ----------------------------------------------------------------------------------------------
    def _open_spill_dir(self) -> None:
        """Make the directory private and ours, remove leftover temp files, index the spill files there."""
        d = self.spill_dir
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if d.stat().st_mode & 0o077:
            os.chmod(d, 0o700)
        lock = open(d / _SPILL_LOCK, "a", opener=lambda p, flags: os.open(p, flags, 0o600))
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ValueError(f"spill_dir {d} is in use by another KVCacheService; give each service its own "
                             f"directory") from None
        self._spill_lock = lock  # held while this object lives; released when it is collected or the process dies
        found = []
        for path in d.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                path.unlink(missing_ok=True)  # a write that never reached its rename
                self.stats_.spill_tmp_removed += 1
            elif path.suffix == SPILL_SUFFIX:
                try:
                    keys, seq = _spill_keys(_read_spill_header(path), path.stem)
                    size = path.stat().st_size
                except (OSError, ValueError, KeyError, TypeError) as e:
                    log.warning("spill file %s is unreadable (%s); deleting it", path, repr(e))
                    path.unlink(missing_ok=True)
                    self.stats_.spill_dropped += 1
                    continue
                found.append((seq, path.stem, keys, size))
        for seq, last, keys, size in sorted(found):  # oldest first: the LRU order they were spilled in
            self.spilled[last] = _Spilled(keys, size)
            self.spill_bytes += size
            self._spill_seq = seq + 1
        self._make_spill_room(0)

    def _spill_path(self, last: str) -> Path:
        return self.spill_dir / f"{last}{SPILL_SUFFIX}"

    def _spill(self, last: str, p: _Prefix) -> None:
        arrays = {f"u{i}": self.units[k][0] for i, k in enumerate(p.keys)} | {"boundary": p.boundary}
        meta = {"format": SPILL_FORMAT, "keys": json.dumps(p.keys), "sha256": _arrays_digest(arrays),
                "seq": str(self._spill_seq)}
        self._spill_seq += 1
        data = safetensors.numpy.save(arrays, metadata=meta)
        self._delete_spilled(last)
        if len(data) > self.spill_budget:
            self.stats_.spill_evictions += 1  # larger than the whole disk budget: dropped at once
            return
        self._make_spill_room(len(data))
        try:
            write_atomic(self._spill_path(last), data, 0o600)
        except OSError as e:
            log.warning("spilling prefix %s failed (%s); dropping it", last, repr(e))
            self.stats_.spill_errors += 1
            return
        self.spilled[last] = _Spilled(list(p.keys), len(data))
        self.spill_bytes += len(data)
        self.stats_.spilled += 1

    def _make_spill_room(self, nbytes: int) -> None:
        while self.spilled and self.spill_bytes + nbytes > self.spill_budget:
            self._delete_spilled(next(iter(self.spilled)))
            self.stats_.spill_evictions += 1

    def _delete_spilled(self, last: str) -> None:
        s = self.spilled.pop(last, None)
        if s is not None:
            self.spill_bytes -= s.nbytes
            self._spill_path(last).unlink(missing_ok=True)

    def _reload(self, last: str) -> bool:
        path = self._spill_path(last)
        try:
            keys, units, boundary = _read_spill(path, last)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            log.warning("spilled prefix %s is torn or corrupt (%s); deleting it", last, repr(e))
            self._delete_spilled(last)
            self.stats_.spill_dropped += 1
            return False
        self._delete_spilled(last)
        ok = self.store(keys, {i: u for i, u in units.items() if keys[i] not in self.units}, boundary)
        self.stats_.reloaded += int(ok)
        return ok

    def clear(self) -> None:
        self.units.clear(), self.prefixes.clear()
        self.unit_bytes = self.boundary_bytes = 0

    def stats(self) -> dict:
        s = self.stats_
        cached_tokens = len(self.units) * UNIT_TOKENS
        return {
            "prefixes": len(self.prefixes), "units": len(self.units), "cached_tokens": cached_tokens,
            "unit_bytes": self.unit_bytes, "boundary_bytes": self.boundary_bytes,
            "bytes": self.unit_bytes + self.boundary_bytes, "budget_bytes": self.budget,
            "bytes_per_cached_token": self.unit_bytes / cached_tokens if cached_tokens else 0.0,
            "boundary_bytes_per_prefix": self.boundary_bytes / len(self.prefixes) if self.prefixes else 0.0,
            "lookups": s.lookups, "hits": s.hits, "hit_rate": s.hits / s.lookups if s.lookups else 0.0,
            "token_hit_rate": s.hit_tokens / s.lookup_tokens if s.lookup_tokens else 0.0,
            "bytes_served": s.bytes_served, "evictions": s.evictions, "stores": s.stores,
            "spilled": s.spilled, "reloaded": s.reloaded, "rejected": s.rejected,
            "spill_files": len(self.spilled), "spill_bytes": self.spill_bytes,
            "spill_budget_bytes": self.spill_budget, "spill_evictions": s.spill_evictions,
            "spill_dropped": s.spill_dropped, "spill_errors": s.spill_errors,
            "spill_tmp_removed": s.spill_tmp_removed,
        }

    def ping(self) -> float:
        return time.time()


def get_or_start_service(budget_bytes: int = 1 << 30, spill_dir: str | None = None, name: str = SERVICE_NAME,
                         namespace: str = SERVICE_NAMESPACE, spill_budget_bytes: int = SPILL_BUDGET_BYTES,
                         resources: dict[str, float] | None = None):
    """The cluster's named service actor, started on first use (restarted by Ray if it dies: its memory is empty
    again, its spill directory is indexed again). `resources`: custom Ray resources it asks for where it starts
    (and restarts), e.g. one only the head node declares. It is never placed in the caller's placement group:
    a Serve replica captures its child actors in its own, and a service started there would live and die with
    that one replica."""
    import ray

    actor = ray.remote(KVCacheService).options(
        name=name, namespace=namespace, get_if_exists=True, lifetime="detached", max_restarts=-1,
        num_cpus=0, max_concurrency=1, resources=dict(resources or {}), scheduling_strategy="DEFAULT")
    return actor.remote(budget_bytes, spill_dir, spill_budget_bytes)


@dataclass
class PrefixHit:
    num_tokens: int
    keys: list[str] = field(default_factory=list)
    units: list[np.ndarray] = field(default_factory=list)
    boundary: np.ndarray | None = None


class PrefixCacheClient:
    """A router's handle on the service. Every call has a timeout; a dead or slow service counts as a miss
    (requests recompute). After a failed call the router stops calling it — every lookup is a miss, every store is
    skipped, at once — and a background thread probes the service every `retry_after_s` until it answers again:
    a service on a host that died or is cut off costs one call timeout, not one per call or per retry
    (docs/architecture.md §6)."""

    def __init__(self, root: str, timeout_s: float = 5.0, name: str = SERVICE_NAME,
                 namespace: str = SERVICE_NAMESPACE, budget_bytes: int = 1 << 30, spill_dir: str | None = None,
                 spill_budget_bytes: int = SPILL_BUDGET_BYTES, retry_after_s: float = 5.0,
                 resources: dict[str, float] | None = None):
        self.root, self.timeout_s, self.retry_after_s = root, timeout_s, retry_after_s
        self._resources = dict(resources or {})
        self._name, self._namespace = name, namespace
        self._budget, self._spill, self._spill_budget = budget_bytes, spill_dir, spill_budget_bytes
        self._actor = None
        self._prober: threading.Thread | None = None  # alive while the service is considered down
        self.failures = 0

    @property
    def available(self) -> bool:
        return self._prober is None

    def _resolve(self):
        return get_or_start_service(self._budget, self._spill, self._name, self._namespace, self._spill_budget,
                                    self._resources)

    def _call(self, method: str, *args):
        import ray

        if self._prober is not None:
            return None
        try:
            if self._actor is None:
                self._actor = self._resolve()
            return ray.get(getattr(self._actor, method).remote(*args), timeout=self.timeout_s)
        except (ray.exceptions.RayError, ValueError) as e:
            log.warning("KV cache service %s failed (%s: %s): treating as a miss; probing it every %.0f s", method,
                        type(e).__name__, str(e).strip().splitlines()[-1][:300] if str(e).strip() else "",
                        self.retry_after_s)
            self._actor = None
            self.failures += 1
            self._prober = threading.Thread(target=self._probe, name="kv-cache-probe", daemon=True)
            self._prober.start()
            return None

    def _probe(self) -> None:
        """Until the service answers (a restarted one, or the same one reachable again), off the step's path."""
        import ray

        while True:
            time.sleep(self.retry_after_s)
            try:
                actor = self._resolve()
                ray.get(actor.stats.remote(), timeout=self.timeout_s)
            except (ray.exceptions.RayError, ValueError):
                continue
            log.info("KV cache service answers again")
            self._actor, self._prober = actor, None
            return

    def lookup(self, token_ids: list[int], max_tokens: int) -> PrefixHit:
        """Longest stored prefix of `token_ids` of at most `max_tokens` tokens, fetched."""
        keys = chain_keys(self.root, token_ids[:max_tokens])
        if not keys:
            return PrefixHit(0)
        n = self._call("lookup", keys) or 0
        if n == 0:
            return PrefixHit(0)
        got = self._call("fetch", keys[:n])
        if got is None:
            return PrefixHit(0)
        units, boundary = got
        return PrefixHit(n * UNIT_TOKENS, keys[:n], units, boundary)

    def store(self, token_ids: list[int], export_units, boundary: np.ndarray) -> bool:
        """Store the prefix of len(token_ids) // 128 units; `export_units(indices)` -> arrays of those units."""
        keys = chain_keys(self.root, token_ids)
        if not keys:
            return False
        missing = self._call("missing", keys)
        if missing is None:
            return False
        payload = dict(zip(missing, export_units(missing))) if missing else {}
        return bool(self._call("store", keys, payload, boundary))

    def stats(self) -> dict | None:
        return self._call("stats")
