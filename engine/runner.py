"""ModelRunner: one process's model plus its paged cache, driven by sequence keys.

The scheduler above it (offline `LLM`, later the engine) decides which sequences run and which tokens each
contributes per step; the runner owns the device state: cache blocks per sequence, the model step, and moving
prefixes in and out of an optional prefix cache (duck-typed: `lookup(tokens, max_tokens)` -> hit with
`num_tokens`, `units`, `boundary`; `store(tokens, export_units, boundary)`). A Router actor wraps the same runner.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from v4ray.model.kv_cache import PREFIX_UNIT, CacheFullError, PagedKVCache, PrefixIO, SeqCache, StepBatch
from v4ray.kernels.backend import kernel_backend
from v4ray.kernels import build_native_cpu_kernels
from v4ray.model.v4 import EAGER_REGIONS, StepRegions, V4Model

from .graphs import DecodeGraphs, static_decode_problem
from .host_memory import freeze_startup_objects, keep_freed_memory

log = logging.getLogger(__name__)

DECODE_STEPS = ("eager", "static", "compiled")
Chunk = tuple[str, list[int], list[int]]  # (sequence key, new token ids, rows of the chunk that need logits)


class ModelRunner:
    def __init__(self, model: V4Model, kv_cache_bytes: int, max_num_seqs: int, block_size: int | None = None,
                 kv_format: str | None = None, prefix_cache=None, decode_step: str = "eager",
                 max_model_len: int | None = None):
        """decode_step: "eager" runs every step through `StepBatch` (the reference); "compiled" runs decode-only
        steps as the fixed-shape step of `DecodeGraphs` (compiled on the CPU, CUDA graphs on a GPU) where the model
        allows it; "static" runs that fixed-shape step uncompiled. max_model_len: the longest sequence (bounds
        the decode step's block-table width)."""
        if decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step must be one of {DECODE_STEPS}, got {decode_step!r}")
        self.model = model
        keep_freed_memory(model.device)  # a CPU step's activations reuse the last step's freed pages
        self.cache = PagedKVCache.from_budget(model.cfg, kv_cache_bytes, max_num_seqs, model.dtype, block_size,
                                              kv_format, model.device)
        self.prefix_cache = prefix_cache
        self.io = PrefixIO(self.cache) if prefix_cache is not None else None
        self.seqs: dict[str, SeqCache] = {}
        self.graphs: DecodeGraphs | None = None
        # the last step's greedy picks ([rows, 2], `greedy_picks`) when it ran as the fixed-shape decode step alone
        # (computed inside its graph; the engine reads them instead of sampling plain greedy rows); else None
        self.greedy_picks: torch.Tensor | None = None
        # the variable-shape step's mHC and prefill attention: compiled with the decode step on the torch backend
        # (CUDA runs them as Triton kernels); on the model itself, so a model shared by runners takes the last one's
        compile_regions = (decode_step == "compiled" and kernel_backend(model.device) == "torch"
                           and not torch._dynamo.config.disable)
        model.use_regions(StepRegions(compile_=True) if compile_regions else EAGER_REGIONS)
        if kernel_backend(model.device) == "torch" and model.device.type == "cpu":
            build_native_cpu_kernels()   # not in the first request (~0.2-0.5 s a kernel)
        if compile_regions:   # stderr, as the decode step's line: a Ray actor's .err log shows it at any log level
            t0 = time.perf_counter()
            print("v4ray: compiling the prefill regions (torch.compile, inductor; about a minute cold for a tiny "
                  "preset on 2 cores, seconds from the disk cache)...", file=sys.stderr, flush=True)
            model.regions.warm_up(model)
            print(f"v4ray: prefill regions compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if decode_step != "eager":
            problem = static_decode_problem(model)
            if problem:
                log.warning("decode steps run eagerly: %s", problem)
            else:
                max_blocks = min(self.cache.blocks.num, self.cache.blocks_for(max_model_len or (1 << 62)))
                self.graphs = DecodeGraphs(model, self.cache, max_num_seqs, max(1, max_blocks),
                                           compiled=decode_step == "compiled")
                self.graphs.warm_up()
        freeze_startup_objects()  # once per process: the compiled graphs' objects are not walked again

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
        row, chunk by chunk, as [rows, V] fp32 on the model's device.

        With `DecodeGraphs`, the chunks that decode (one token, its logits wanted) run as the fixed-shape step and
        the rest (prompt chunks) as one eager `StepBatch` step beside it: different sequences never interact in a
        step, so the split changes no value. Not in an expert-parallel router: every rank takes part in each MoE
        layer's exchange once per step, so a router's step is one forward (mixed steps run eagerly)."""
        for key, new, _ in chunks:
            seq = self.seqs[key]
            if not self.cache.can_append(seq, len(new)):
                raise CacheFullError(f"sequence {key!r} needs blocks for {seq.num_tokens + len(new)} tokens")
            self.cache.append(seq, len(new))
        self.greedy_picks = None
        if not chunks:
            return torch.empty(0, self.model.cfg.vocab_size, device=self.model.device)
        decode = [i for i, (_, new, want) in enumerate(chunks) if len(new) == 1 and list(want) == [0]]
        seqs = [self.seqs[chunks[i][0]] for i in decode]
        if (self.graphs is None or not decode or (self.model.experts_remote and len(decode) < len(chunks))
                or not self.graphs.fits(len(seqs), max(len(s.block_table) for s in seqs))):
            return self._eager(chunks)
        decoded, picks = self.graphs.run(seqs, [chunks[i][1][0] for i in decode])
        for seq in seqs:
            seq.num_tokens += 1
        if len(decode) == len(chunks):
            self.greedy_picks = picks
            return decoded
        is_decode = set(decode)
        rest = self._eager([c for i, c in enumerate(chunks) if i not in is_decode])
        # back into chunk order, a slice per run of chunks from the same side (no index tensor to upload)
        parts, at = [], {True: 0, False: 0}
        for i, (_, _, want) in enumerate(chunks):
            side = i in is_decode
            src = decoded if side else rest
            n = len(want)
            if parts and parts[-1][0] is src and parts[-1][2] == at[side]:
                parts[-1][2] += n
            else:
                parts.append([src, at[side], at[side] + n])
            at[side] += n
        return torch.cat([src[a:b] for src, a, b in parts])

    def _eager(self, chunks: list[Chunk]) -> torch.Tensor:
        seqs, lengths, tokens, rows = [], [], [], []
        for key, new, want in chunks:
            rows.extend(len(tokens) + r for r in want)
            seqs.append(self.seqs[key]), lengths.append(len(new)), tokens.extend(new)
        return self.model.step(tokens, StepBatch.build(self.cache, seqs, lengths), rows)
