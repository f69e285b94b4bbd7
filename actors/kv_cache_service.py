"""KVCacheService: a named Ray actor keeping finished prefixes of V4's compressed cache for reuse.

Keys. A prefix is a chain of 128-token units; unit i's key is sha256(key of unit i-1 || its 128 token ids),
and the chain starts from a root that hashes the model's identity and the cache layout, so replicas of
different models (or storage formats) never share entries.

Values. Each unit holds the compressed entries and indexer keys of every layer (one flat uint8 array). To
resume exactly at a prefix end a router also needs the boundary state there (window rings, compressor rings);
it is stored only at the end of each stored prefix, so bytes per cached token stay those of the compressed
entries. Arrays travel through Ray's object store as numpy buffers (zero-copy), never as Python lists.

Budget. Prefixes are the LRU unit: evicting one drops its boundary state and every unit no other stored
prefix uses. A store call is one actor method call with all its arrays as arguments: a caller that dies before
the call runs stores nothing, so no entry is ever half-written.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SERVICE_NAME = "v4ray-kv-cache"
SERVICE_NAMESPACE = "v4ray"
UNIT_TOKENS = 128


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


def model_identity(ckpt_dir: str | Path) -> str:
    """Content identity of a checkpoint: its config and, per weight file, size and hashes of the first and last
    64 KiB (different random seeds or fine-tunes differ there; reading whole files would be too slow)."""
    d = Path(ckpt_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(65536)
            fh.seek(max(0, size - 65536))
            tail = fh.read()
        h.update(f.name.encode() + size.to_bytes(8, "little") + hashlib.sha256(head + tail).digest())
    return h.hexdigest()


@dataclass
class _Prefix:
    keys: list[str]          # unit keys, in order
    boundary: np.ndarray     # uint8 boundary state at the prefix end


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


class KVCacheService:
    """The actor class (wrapped with `ray.remote` by `start_service`). All methods run one at a time."""

    def __init__(self, budget_bytes: int, spill_dir: str | None = None):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.budget = budget_bytes
        self.units: dict[str, tuple[np.ndarray, int]] = {}        # key -> (payload, refcount)
        self.prefixes: OrderedDict[str, _Prefix] = OrderedDict()  # last unit key -> prefix, LRU order
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self.spilled: dict[str, list[str]] = {}                   # last key -> unit keys, on disk
        if self.spill_dir:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.stats_ = _Stats()
        self.unit_bytes = 0
        self.boundary_bytes = 0

    # ---- queries --------------------------------------------------------------------------------------------
    def lookup(self, keys: list[str]) -> int:
        """Number of leading units of `keys` that can be resumed from (a stored prefix ends there)."""
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
        p = self.prefixes.get(keys[-1]) if keys else None
        if p is None or p.keys != keys:
            return None
        self.prefixes.move_to_end(keys[-1])
        units = [self.units[k][0] for k in keys]
        self.stats_.bytes_served += sum(u.nbytes for u in units) + p.boundary.nbytes
        return units, p.boundary

    def missing(self, keys: list[str]) -> list[int]:
        """Indices of units the service does not hold (the caller sends only those)."""
        return [i for i, k in enumerate(keys) if k not in self.units]

    # ---- updates --------------------------------------------------------------------------------------------
    def store(self, keys: list[str], units: dict[int, np.ndarray], boundary: np.ndarray) -> bool:
        """Store the prefix ending at keys[-1]: `units` maps index -> payload for units not yet held."""
        if not keys or keys[-1] in self.prefixes:
            return False
        if any(k not in self.units and i not in units for i, k in enumerate(keys)):
            return False  # a unit was evicted between `missing` and `store`: the caller may retry
        new_bytes = boundary.nbytes + sum(u.nbytes for i, u in units.items() if keys[i] not in self.units)
        if new_bytes > self.budget:
            self.stats_.rejected += 1
            return False
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

    def _spill(self, last: str, p: _Prefix) -> None:
        arrays = {f"u{i}": self.units[k][0] for i, k in enumerate(p.keys)}
        np.savez(self.spill_dir / f"{last}.npz", boundary=p.boundary, **arrays)
        self.spilled[last] = list(p.keys)
        self.stats_.spilled += 1

    def _reload(self, last: str) -> bool:
        path = self.spill_dir / f"{last}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = self.spilled.pop(last)
                units = {i: z[f"u{i}"] for i in range(len(keys))}
                boundary = z["boundary"]
        except (OSError, KeyError, ValueError) as e:
            log.warning("spilled prefix %s unreadable (%s); dropping it", last, e)
            self.spilled.pop(last, None)
            return False
        path.unlink(missing_ok=True)
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
        }

    def ping(self) -> float:
        return time.time()


def get_or_start_service(budget_bytes: int = 1 << 30, spill_dir: str | None = None, name: str = SERVICE_NAME,
                         namespace: str = SERVICE_NAMESPACE):
    """The cluster's named service actor, started on first use (restarted by Ray if it dies: empty again)."""
    import ray

    actor = ray.remote(KVCacheService).options(
        name=name, namespace=namespace, get_if_exists=True, lifetime="detached", max_restarts=-1,
        num_cpus=0, max_concurrency=1)
    return actor.remote(budget_bytes, spill_dir)


@dataclass
class PrefixHit:
    num_tokens: int
    keys: list[str] = field(default_factory=list)
    units: list[np.ndarray] = field(default_factory=list)
    boundary: np.ndarray | None = None


class PrefixCacheClient:
    """A router's handle on the service. Every call has a timeout; a dead or slow service counts as a miss
    (requests recompute) and the handle is re-resolved on the next call."""

    def __init__(self, root: str, timeout_s: float = 30.0, name: str = SERVICE_NAME,
                 namespace: str = SERVICE_NAMESPACE, budget_bytes: int = 1 << 30, spill_dir: str | None = None):
        self.root, self.timeout_s = root, timeout_s
        self._name, self._namespace = name, namespace
        self._budget, self._spill = budget_bytes, spill_dir
        self._actor = None

    def _call(self, method: str, *args):
        import ray

        try:
            if self._actor is None:
                self._actor = get_or_start_service(self._budget, self._spill, self._name, self._namespace)
            return ray.get(getattr(self._actor, method).remote(*args), timeout=self.timeout_s)
        except (ray.exceptions.RayError, ValueError) as e:
            log.warning("KV cache service %s failed (%s): treating as a miss", method, type(e).__name__)
            self._actor = None
            return None

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
