"""ModelRunner: one process's model plus its paged cache, driven by sequence keys.

The scheduler above it (offline `LLM`, later the engine) decides which sequences run and which tokens each
contributes per step; the runner owns the device state: cache blocks per sequence, the model step, and moving
prefixes in and out of an optional prefix cache (duck-typed: `lookup(tokens, max_tokens)` -> hit with
`num_tokens`, `units`, `boundary`; `store(tokens, export_units, boundary)`). A Router actor wraps the same runner.
"""

from __future__ import annotations

import torch

from v4ray.model.kv_cache import PREFIX_UNIT, CacheFullError, PagedKVCache, PrefixIO, SeqCache, StepBatch
from v4ray.model.v4 import V4Model

Chunk = tuple[str, list[int], list[int]]  # (sequence key, new token ids, rows of the chunk that need logits)


class ModelRunner:
    def __init__(self, model: V4Model, kv_cache_bytes: int, max_num_seqs: int, block_size: int | None = None,
                 kv_format: str | None = None, prefix_cache=None):
        self.model = model
        self.cache = PagedKVCache.from_budget(model.cfg, kv_cache_bytes, max_num_seqs, model.dtype, block_size,
                                              kv_format, model.device)
        self.prefix_cache = prefix_cache
        self.io = PrefixIO(self.cache) if prefix_cache is not None else None
        self.seqs: dict[str, SeqCache] = {}

    # ---- admission ---------------------------------------------------------------------------------------
    def can_admit(self, num_tokens: int) -> bool:
        return self.cache.can_allocate(num_tokens)

    def fits_ever(self, num_tokens: int) -> bool:
        """Could a sequence of this size fit in an empty cache?"""
        return self.cache.blocks_for(num_tokens) <= self.cache.blocks.num and self.cache.slots.num >= 1

    def admit(self, key: str, num_tokens: int) -> None:
        """Reserve a slot and blocks for `num_tokens` tokens (all or nothing: CacheFullError)."""
        if key in self.seqs:
            raise KeyError(f"sequence {key!r} is already admitted")
        self.seqs[key] = self.cache.allocate(num_tokens)

    def can_append(self, key: str, num_tokens: int) -> bool:
        return self.cache.can_append(self.seqs[key], num_tokens)

    def reserve(self, key: str, num_tokens: int) -> None:
        """Allocate the blocks `num_tokens` more tokens of `key` will need (a later step uses them)."""
        self.cache.append(self.seqs[key], num_tokens)

    def release(self, key: str) -> None:
        seq = self.seqs.pop(key, None)
        if seq is not None:
            self.cache.free(seq)

    # ---- prefixes ----------------------------------------------------------------------------------------
    def load_prefix(self, key: str, prompt: list[int]) -> int:
        """Resume `key` from the longest cached prefix of `prompt` (at least one prompt token is left to
        compute, so the last position's logits exist). Returns the number of cached tokens loaded."""
        if self.prefix_cache is None:
            return 0
        hit = self.prefix_cache.lookup(prompt, max_tokens=len(prompt) - 1)
        if hit.num_tokens:
            seq = self.seqs[key]
            self.cache.append(seq, hit.num_tokens)
            self.io.import_prefix(seq, [torch.from_numpy(u.copy()) for u in hit.units],
                                  torch.from_numpy(hit.boundary.copy()))
        return hit.num_tokens

    def store_prefix(self, key: str, tokens: list[int]) -> bool:
        """Store the sequence's cached prefix (its length must be a multiple of 128) in the prefix cache."""
        if self.prefix_cache is None:
            return False
        seq = self.seqs[key]
        assert seq.num_tokens % PREFIX_UNIT == 0 and len(tokens) == seq.num_tokens
        return self.prefix_cache.store(tokens, lambda idx: [self.io.export_units(seq, i, i + 1)[0].cpu().numpy()
                                                            for i in idx],
                                       self.io.export_boundary(seq).cpu().numpy())

    # ---- steps -------------------------------------------------------------------------------------------
    def step(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run one step: each chunk appends its tokens to its sequence. Returns the logits of every requested
        row, chunk by chunk, as [rows, V] fp32 on the model's device."""
        seqs, lengths, tokens, rows = [], [], [], []
        for key, new, want in chunks:
            seq = self.seqs[key]
            if not self.cache.can_append(seq, len(new)):
                raise CacheFullError(f"sequence {key!r} needs blocks for {seq.num_tokens + len(new)} tokens")
            self.cache.append(seq, len(new))
            rows.extend(len(tokens) + r for r in want)
            seqs.append(seq), lengths.append(len(new)), tokens.extend(new)
        if not chunks:
            return torch.empty(0, self.model.cfg.vocab_size, device=self.model.device)
        return self.model.step(tokens, StepBatch.build(self.cache, seqs, lengths), rows)
