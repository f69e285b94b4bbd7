"""Which V4Server replica takes a request: the one that likely holds its prompt's prefix, unless it is busy
(docs/architecture.md §13).

`PrefixAffinityRouter` is a Ray Serve request router (`request_router_config`), used when an application has more
than one V4Server replica. A request's key is its prompt's first `affinity_tokens` tokens, cut down to whole prefix
units (PREFIX_UNIT, what the prefix cache stores); each key ranks the replicas by rendezvous hashing (highest
hash of key and replica id first), so one key keeps going to one replica while the replica set is unchanged, and
when a replica comes or goes only the keys it held move. The preferred replica is tried first unless it has
`max_imbalance` or more requests beyond the least loaded one (Serve's cached queue lengths); then the least
loaded go first. Prompts shorter than one unit have nothing to reuse and go to the least loaded replicas.

Affinity only saves work: every replica reads and writes the same KVCacheService (a named actor shared by the
application's replicas), so a request sent elsewhere still finds a prefix another replica stored, paying the
transfer instead of the prefill.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from v4ray.model.kv_format import PREFIX_UNIT

DEFAULT_MAX_IMBALANCE = 4


def affinity_key(prompt_ids: list[int], affinity_tokens: int) -> bytes | None:
    """The prompt's first whole prefix units, up to `affinity_tokens` tokens, as bytes; None below one unit."""
    n = min(len(prompt_ids), affinity_tokens) // PREFIX_UNIT * PREFIX_UNIT
    if n == 0:
        return None
    return b",".join(str(t).encode() for t in prompt_ids[:n])


def rank_by_key(key: bytes, replica_ids: list[str]) -> list[str]:
    """Rendezvous hashing: the replica ids, most preferred for `key` first."""
    def weight(rid: str) -> bytes:
        return hashlib.blake2b(key + b"|" + rid.encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class PrefixAffinityRouter(RequestRouter):
    """Prefix affinity with a load bound (see the module text). Kwargs: affinity_tokens (ServeConfig's
    prefix_affinity_tokens, validated there), max_imbalance."""

    def initialize_state(self, affinity_tokens: int, max_imbalance: int = DEFAULT_MAX_IMBALANCE, **kwargs):
        self.affinity_tokens, self.max_imbalance = affinity_tokens, max_imbalance

    def _load(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_load = sorted(candidate_replicas, key=lambda r: (self._load(r), random.random()))
        prompt = pending_request.args[0] if pending_request is not None and pending_request.args else None
        key = affinity_key(prompt, self.affinity_tokens) if isinstance(prompt, list) else None
        if key is None or not by_load:
            return [by_load]
        ids = {r.replica_id.unique_id: r for r in candidate_replicas}
        preferred = ids[rank_by_key(key, list(ids))[0]]
        if self._load(preferred) - self._load(by_load[0]) >= self.max_imbalance:
            return [by_load]
        return [[preferred], [r for r in by_load if r is not preferred]]
