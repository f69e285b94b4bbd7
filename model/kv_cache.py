"""V4 cache state, paged: compressed entries in token blocks, fixed per-sequence state in slots.

Two kinds of storage (docs/v4_model.md §3, docs/architecture.md §5):

* Token-proportional: each layer's compressed entries (CSA: one per `m` tokens, plus one indexer key; HCA: one
  per `m'` tokens) live in pools of fixed-size token blocks. A sequence's `block_table[i]` holds tokens
  [i*B, (i+1)*B); entry j of a layer with ratio m sits in block j*m // B at offset j % (B/m). B is a multiple
  of every compression rate, so windows never straddle blocks.
* Fixed per sequence: the sliding-window ring (last `window` K=V vectors) and each compressor's ring of raw
  per-token rows (kv, gate + position bias; fp32): 2m rows for CSA (the open window and the previous one, whose
  first-half channels overlap into the next entry), m rows for HCA. A sequence owns one state slot.

Accounting (which block or slot is free) is plain Python in `BlockAllocator`; `PagedKVCache` owns the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace

import torch

from v4ray.kernels.backend import kernel_backend

from .config import CSA, SWA, V4Config
from .kv_format import (ENTRY_FORMATS, PREFIX_UNIT, default_block_size, index_key_bytes, kv_bytes, main_entry_bytes,
                        pack_index, pack_main, unpack_index, unpack_main)


class CacheFullError(RuntimeError):
    """Not enough free blocks or slots; nothing was allocated."""


class BlockAllocator:
    """Free-list accounting of `num` interchangeable units (token blocks or state slots)."""

    def __init__(self, num: int):
        self.num = num
        self._free = list(range(num - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFullError(f"need {n} blocks, {len(self._free)} of {self.num} free")
        out = [self._free.pop() for _ in range(n)]
        return out

    def free(self, ids: list[int]) -> None:
        self._free.extend(reversed(ids))
        assert len(self._free) <= self.num, "a block was freed twice"


@dataclass
class SeqCache:
    """One sequence's handle into the cache: its state slot, block table and cached token count."""

    slot: int
    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0


@dataclass
class LayerCache:
    """Tensors of one layer. Entries [blocks, B/m, d]; rings [slots, rows, ...]. In the "fp8" format entries
    and the window ring hold packed bytes ([..., entry_bytes] uint8); read/write convert."""

    kind: str
    ratio: int
    fmt: str
    head_dim: int
    rope_dim: int
    swa: torch.Tensor                       # [slots, window, d] RoPE'd K=V, row = position % window
    entries: torch.Tensor | None = None     # [blocks, B/m, d] compressed entries (RoPE'd, normalised)
    state_kv: torch.Tensor | None = None    # [slots, R, coff*d] fp32 raw compressor kv, row = position % R
    state_gate: torch.Tensor | None = None  # [slots, R, coff*d] fp32 gate + position bias
    index_keys: torch.Tensor | None = None  # [blocks, B/m, dI] indexer keys (CSA)
    index_state_kv: torch.Tensor | None = None
    index_state_gate: torch.Tensor | None = None

    # Storage form (what a pool holds) <-> compute form. The fixed-shape decode step substitutes a fresh entry in
    # storage form into what it gathered, so it reads exactly what a write-then-read would.
    def store_main(self, x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        return pack_main(x, self.rope_dim) if self.fmt == "fp8" else x.to(pool.dtype)

    def load_main(self, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return unpack_main(v, self.head_dim, self.rope_dim, dtype) if self.fmt == "fp8" else v.to(dtype)

    def store_index(self, x: torch.Tensor) -> torch.Tensor:
        return pack_index(x) if self.fmt == "fp8" else x.to(self.index_keys.dtype)

    def load_index(self, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return unpack_index(v, dtype) if self.fmt == "fp8" else v.to(dtype)

    def read_main(self, pool: torch.Tensor, i: torch.Tensor, j: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Main-width vectors (window ring or entries) at [i, j] -> [n, d] in `dtype`."""
        return self.load_main(pool[i, j], dtype)

    def write_main(self, pool: torch.Tensor, i: torch.Tensor, j: torch.Tensor, x: torch.Tensor) -> None:
        pool[i, j] = self.store_main(x, pool)

    def read_index(self, i: torch.Tensor, j: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.load_index(self.index_keys[i, j], dtype)

    def write_index(self, i: torch.Tensor, j: torch.Tensor, x: torch.Tensor) -> None:
        self.index_keys[i, j] = self.store_index(x)


def state_rows(kind: str, ratio: int) -> int:
    return 2 * ratio if kind == CSA else ratio


class StagingBuffer:
    """The one host->device copy of a step (docs/architecture.md §11): the step's index tensors, built on the host
    from Python lists, are packed into one host buffer (pinned on CUDA) and uploaded with one non-blocking copy;
    each comes back as a view of the device copy. On the CPU nothing is copied.

    The host buffer is reused step after step. Refilling it is safe: every step ends by reading its results back
    (the sampled tokens), which waits for the device, so the previous upload has completed."""

    ALIGN = 8  # byte alignment of each packed tensor, so every view keeps its dtype's alignment

    def __init__(self, device: torch.device):
        self.device = device
        self.host = torch.empty(0, dtype=torch.uint8)

    def upload(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return tensors
        spans, total = [], 0
        for t in tensors:
            n = t.numel() * t.element_size()
            spans.append((total, n))
            total += -(-n // self.ALIGN) * self.ALIGN
        if self.host.numel() < total:
            self.host = torch.empty(max(total, 2 * self.host.numel()), dtype=torch.uint8,
                                    pin_memory=self.device.type == "cuda")
        for t, (at, n) in zip(tensors, spans):
            if n:
                self.host[at:at + n].copy_(t.contiguous().view(-1).view(torch.uint8))
        staged = self.host[:total].to(self.device, non_blocking=True)
        return [staged[at:at + n].view(t.dtype).view(t.shape) if n else
                torch.empty(t.shape, dtype=t.dtype, device=self.device) for t, (at, n) in zip(tensors, spans)]


def _tensors_of(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if is_dataclass(value):
        return [t for f in fields(value) for t in _tensors_of(getattr(value, f.name))]
    return []


def _swap_tensors(value, moved: dict[int, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        return moved[id(value)]
    if is_dataclass(value):
        return replace(value, **{f.name: _swap_tensors(getattr(value, f.name), moved) for f in fields(value)})
    return value


class PagedKVCache:
    """All layers' cache tensors plus block/slot accounting for a fixed number of blocks and slots."""

    def __init__(self, cfg: V4Config, num_blocks: int, num_slots: int, dtype: torch.dtype = torch.float32,
                 block_size: int | None = None, kv_format: str | None = None, device: torch.device | None = None):
        """dtype: the compute dtype reads return. kv_format: storage of entries and window rings — "fp32",
        "bf16" or "fp8" (packed; docs/v4_model.md §3.1); default: the compute dtype's. block_size: default
        `default_block_size(cfg)`. device: where every cache tensor lives (default cpu)."""
        block_size = block_size or default_block_size(cfg)
        bad = sorted({r for r in cfg.compress_ratios if r and block_size % r})
        if bad or block_size % 128:
            raise ValueError(f"block_size {block_size} must be a multiple of 128 and of every compression rate "
                             f"(not a multiple of {bad})")
        fmt = kv_format or ("fp32" if dtype == torch.float32 else "bf16")
        if fmt not in ENTRY_FORMATS:
            raise ValueError(f"kv_format must be one of {ENTRY_FORMATS}, got {fmt!r}")
        self.cfg, self.block_size, self.dtype, self.kv_format = cfg, block_size, dtype, fmt
        self.device = device = torch.device(device or "cpu")
        self.staging = StagingBuffer(device)
        self.blocks, self.slots = BlockAllocator(num_blocks), BlockAllocator(num_slots)
        # One more block and slot than the allocators hand out: where the fixed-shape decode step
        # (`DecodeBatch`) sends the writes of padded rows and of windows that do not close, so every write
        # has a destination and none lands in a sequence's state.
        self.scratch_block, self.scratch_slot = num_blocks, num_slots
        num_blocks, num_slots = num_blocks + 1, num_slots + 1
        d, dI, w, r = cfg.head_dim, cfg.index_head_dim, cfg.sliding_window, cfg.qk_rope_head_dim

        def store(*shape_then_width: int, width: int) -> torch.Tensor:
            if fmt == "fp8":
                return torch.zeros(*shape_then_width, width, dtype=torch.uint8, device=device)
            return torch.zeros(*shape_then_width, width // (4 if fmt == "fp32" else 2),
                               dtype=torch.float32 if fmt == "fp32" else torch.bfloat16, device=device)

        main_b, idx_b = main_entry_bytes(d, r, fmt), index_key_bytes(dI, fmt)
        self.layers: list[LayerCache] = []
        for kind, m in zip(cfg.layer_types, cfg.compress_ratios):
            lc = LayerCache(kind, m, fmt, d, r, swa=store(num_slots, w, width=main_b))
            if kind != SWA:
                coff, rows = (2 if kind == CSA else 1), state_rows(kind, m)
                lc.entries = store(num_blocks, block_size // m, width=main_b)
                lc.state_kv = torch.zeros(num_slots, rows, coff * d, device=device)
                lc.state_gate = torch.zeros(num_slots, rows, coff * d, device=device)
            if kind == CSA:
                lc.index_keys = store(num_blocks, block_size // m, width=idx_b)
                lc.index_state_kv = torch.zeros(num_slots, 2 * m, 2 * dI, device=device)
                lc.index_state_gate = torch.zeros(num_slots, 2 * m, 2 * dI, device=device)
            self.layers.append(lc)

    @classmethod
    def from_budget(cls, cfg: V4Config, budget_bytes: int, max_seqs: int, dtype: torch.dtype = torch.float32,
                    block_size: int | None = None, kv_format: str | None = None,
                    device: torch.device | None = None) -> "PagedKVCache":
        """As many blocks as fit in `budget_bytes` after the fixed state of `max_seqs` sequences."""
        block_size = block_size or default_block_size(cfg)
        fmt = kv_format or ("fp32" if dtype == torch.float32 else "bf16")
        kb = kv_bytes(cfg, fmt, block_size)
        left = budget_bytes - (max_seqs + 1) * kb.fixed_per_seq - kb.per_block  # + the scratch slot and block
        if left < 0 or max_seqs < 1:
            raise ValueError(f"a KV budget of {budget_bytes} B cannot hold the fixed state of {max_seqs} sequences "
                             f"({kb.fixed_per_seq} B each) and the decode step's scratch slot and block; raise the "
                             f"budget or lower max_seqs")
        if kb.per_block:
            num_blocks = left // kb.per_block
        else:  # sliding-window-only model: blocks hold no bytes, only the fixed state limits sequences
            num_blocks = max_seqs * -(-cfg.max_position_embeddings // block_size)
        return cls(cfg, int(num_blocks), max_seqs, dtype, block_size, fmt, device)

    @property
    def nbytes(self) -> int:
        """Bytes of every cache tensor (what the cache really occupies)."""
        return sum(t.nbytes for lc in self.layers for t in (lc.swa, lc.entries, lc.state_kv, lc.state_gate,
                                                            lc.index_keys, lc.index_state_kv, lc.index_state_gate)
                   if t is not None)

    # ---- accounting --------------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Would a new sequence of `num_tokens` tokens fit (one slot plus its blocks)?"""
        return self.slots.can_allocate(1) and self.blocks.can_allocate(self.blocks_for(num_tokens))

    def allocate(self, num_tokens: int = 0) -> SeqCache:
        """A new sequence with room for `num_tokens` tokens; all or nothing."""
        if not self.can_allocate(num_tokens):
            raise CacheFullError(f"cannot fit a sequence of {num_tokens} tokens: {self.slots.num_free} slots and "
                                 f"{self.blocks.num_free} blocks free")
        seq = SeqCache(slot=self.slots.allocate(1)[0])
        seq.block_table = self.blocks.allocate(self.blocks_for(num_tokens))
        return seq

    def can_append(self, seq: SeqCache, num_new: int) -> bool:
        return self.blocks.can_allocate(self.blocks_for(seq.num_tokens + num_new) - len(seq.block_table))

    def append(self, seq: SeqCache, num_new: int) -> None:
        """Make room for `num_new` more tokens of `seq` (allocating blocks as needed; all or nothing)."""
        need = self.blocks_for(seq.num_tokens + num_new) - len(seq.block_table)
        if need > 0:
            seq.block_table.extend(self.blocks.allocate(need))

    def free(self, seq: SeqCache) -> None:
        self.blocks.free(seq.block_table)
        self.slots.free([seq.slot])
        seq.block_table, seq.num_tokens, seq.slot = [], 0, -1


@dataclass
class WindowLayout:
    """Sliding-window keys of a group of chunks: their cached ring rows, then the group's new rows."""

    rows: torch.Tensor         # [n] batch rows of the group's queries (and new keys), in order
    ring_slots: torch.Tensor   # [P] state slot of each cached key read from the ring
    ring_rows: torch.Tensor    # [P] its ring row (position % window)
    bias: torch.Tensor | None  # [n, P + n] 0 where query row sees the key (same sequence, within the window);
    #                            None for a banded group (`StepBatch.banded`), whose band is built in its attention
    ring_pad: torch.Tensor | None = None  # banded: [1] window - 1 - P, the padding rows before the ring's P rows


@dataclass
class StackLayout:
    """G prefill groups of one chunk each, of the same length n at the same start, attended as one batched call
    (`StepBatch.prefill_stacks`): their queries see the same window and entry pattern, so one bias serves all."""

    rows: torch.Tensor         # [G, n] batch rows of each group's queries (and new keys)
    ring_slots: torch.Tensor   # [G, P] state slot of each cached key read from the ring
    ring_rows: torch.Tensor    # [G, P] its ring row
    bias: torch.Tensor         # [n, P + n] as `WindowLayout.bias`, the same for every group
    first: int | None = None   # where the rows are rows[0, 0] + 0..G*n-1 (the chunks one after another): that row

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The stack's rows of x [N, *] -> [G, n, *]: a view where they are consecutive, else a gather."""
        G, n = self.rows.shape
        return x[self.rows] if self.first is None else x[self.first:self.first + G * n].view(G, n, *x.shape[1:])

    def put(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """`take`'s inverse: y [G, n, *] into the stack's rows of out [N, *]."""
        y = y.flatten(0, 1)
        if self.first is None:
            out[self.rows.flatten()] = y
        else:
            out[self.first:self.first + y.shape[0]] = y


@dataclass
class DecodeTables:
    rows: torch.Tensor         # [n] batch row of each sequence's token
    slots: torch.Tensor        # [n] state slot
    cached: torch.Tensor       # [n] tokens cached before this step (= the new token's position)
    block_tables: torch.Tensor  # [n, max blocks] (padding points at block 0 and is masked by entry counts)


@dataclass
class RingWrites:
    """Writes of a step's newest rows into per-sequence rings: (slot, ring row) <- batch row."""

    slots: torch.Tensor
    rows: torch.Tensor
    src: torch.Tensor


@dataclass
class EntryLayout:
    """Compressed entries (ratio m) of a step's sequences, gathered into one list in chunk order."""

    blocks: torch.Tensor   # [E] pool block of each gathered entry ([G, E]: a stack's, `StepBatch.stack_entries`)
    offsets: torch.Tensor  # [E] offset within the block
    lo: torch.Tensor       # [N] query row r may see gathered entries [lo_r, hi_r): its own closed windows
    hi: torch.Tensor
    bias: torch.Tensor     # [N, E] 0 on [lo_r, hi_r) (HCA attends to all of them)
    most: int = 0          # max_r (hi_r - lo_r): a CSA indexer keeping top-k >= most keeps them all (this bias)
    # the leading rows that see at most the config's index_topk entries: a CSA group's queries there attend to
    # all of theirs without the indexer (`Attention._attend_cached`); 0 where under 2 such rows or under 2 after them
    # (a compiled region's size of 0 or 1 is a graph of its own)
    plain_rows: int = 0


@dataclass
class EmitLayout:
    """Windows closing in a step, as gathers from [ring rows of all slots ; new rows of the batch]."""

    rows: torch.Tensor       # [W, m] source row of each slot of each closing window
    prev_rows: torch.Tensor  # [W, m] rows of the window before it (CSA overlap), valid where has_prev
    has_prev: torch.Tensor   # [W] bool
    positions: torch.Tensor  # [W] entry RoPE position j*m
    blocks: torch.Tensor     # [W] destination block and offset in the entry pool
    offsets: torch.Tensor
    writes: RingWrites       # the newest R rows of each chunk


@dataclass
class StepBatch:
    """One model step: each sequence contributes a chunk of new tokens (a prompt, a prompt chunk, or one decode
    token), concatenated in `chunks` order. A chunk is (sequence, first row in the batch, number of tokens).

    The index layouts of the step (which cached rows and entries each query reads) depend only on the chunks,
    so they are computed once per step and shared by every layer of the same kind. Attention runs per group of
    chunks: all single-token (decode) chunks together, each multi-token (prefill) chunk alone, so that no
    dense query x key block spans two long prompts; on the torch backend, groups of equal chunks (one length, one
    start) go as one stacked call (`prefill_stacks`)."""

    cache: PagedKVCache
    chunks: list[tuple[SeqCache, int, int]]
    _layouts: dict = field(default_factory=dict)
    prepared: bool = False

    @classmethod
    def build(cls, cache: PagedKVCache, seqs: list[SeqCache], lengths: list[int]) -> "StepBatch":
        chunks, row = [], 0
        for seq, n in zip(seqs, lengths):
            if n <= 0:
                raise ValueError(f"a chunk needs at least one token, got {n}")
            if cache.blocks_for(seq.num_tokens + n) > len(seq.block_table):
                raise CacheFullError(f"sequence in slot {seq.slot} has no blocks for {seq.num_tokens + n} tokens: "
                                     f"call PagedKVCache.append first")
            chunks.append((seq, row, n))
            row += n
        return cls(cache, chunks)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, _, n in self.chunks)

    def prepare(self, token_ids, logit_rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Build every index layout this step's layers read (they depend only on the chunks and the config),
        then move them with the token ids, positions and logit rows (default: each chunk's last row) to the
        cache's device in one copy. -> (token ids, logit rows) on the device. Layouts asked for later raise."""
        cfg, w = self.cache.cfg, self.cache.cfg.sliding_window
        self.positions()
        self.ring_writes(w)
        if self.decode_group:
            self.decode_tables(self.decode_group)
        for stack in self.prefill_stacks:
            self.window_layout(w, stack[0])  # a stack's shared bias is its first group's
            if len(stack) > 1:
                self.stack_layout(w, stack)
        for kind, m in sorted(set(zip(cfg.layer_types, cfg.compress_ratios))):
            if kind != SWA:  # compressed entries: read by prefill groups, written by the windows closing now
                for stack in self.prefill_stacks:
                    self.entry_layout(m, stack[0])
                    if len(stack) > 1:
                        self.stack_entries(m, stack)
                self.emit_layout(m, state_rows(kind, m), kind == CSA)
        rows = self.last_rows() if logit_rows is None else torch.as_tensor(logit_rows, dtype=torch.long)
        chunk_of_last = {a + n - 1: i for i, (_, a, n) in enumerate(self.chunks)}
        tail = [chunk_of_last.get(r) for r in rows.tolist()]
        if 0 < len(rows) < self.num_tokens and None not in tail:
            self._layouts["tail"] = self._last_token_tables(tail)
        host = {"tokens": torch.as_tensor(token_ids, dtype=torch.long), "rows": rows}
        self.prepared = True
        if self.cache.device.type == "cpu":
            return host["tokens"], host["rows"]
        staged = {k: v for k, v in host.items() if v.device != self.cache.device}
        unique = {id(t): t for v in [*self._layouts.values(), *staged.values()] for t in _tensors_of(v)}
        moved = dict(zip(unique, self.cache.staging.upload(list(unique.values()))))
        self._layouts = {k: _swap_tensors(v, moved) for k, v in self._layouts.items()}
        return tuple(moved[id(v)] if k in staged else v for k, v in host.items())

    def positions(self) -> torch.Tensor:
        return self._cached("positions", lambda: torch.cat(
            [torch.arange(seq.num_tokens, seq.num_tokens + n) for seq, _, n in self.chunks]))

    def last_rows(self) -> torch.Tensor:
        """Row index of each chunk's last token (where the next token is predicted)."""
        return torch.tensor([a + n - 1 for _, a, n in self.chunks])

    # Short prompt chunks share one dense attention call while its query x key block stays this small: every query
    # scores every key of its group (masked outside its own sequence), so grouping trades masked-away work for
    # fewer calls. Two 128-token prompts alone cost 2 x 128 x 128 scores, together 256 x 256.
    PREFILL_GROUP_SCORES = 128 * 256

    @property
    def decode_group(self) -> tuple[int, ...]:
        """Chunks of one token (decode steps): attended sparsely, each with its own gathered keys."""
        if "decode" not in self._layouts:
            self._layouts["decode"] = tuple(i for i, (_, _, n) in enumerate(self.chunks) if n == 1)
        return self._layouts["decode"]

    @property
    def prefill_groups(self) -> list[tuple[int, ...]]:
        """Multi-token chunks, packed into dense attention calls of at most PREFILL_GROUP_SCORES scores (or one chunk)."""
        if "prefill" not in self._layouts:
            window = self.cache.cfg.sliding_window
            groups, cur, rows, keys = [], [], 0, 0
            for i, (seq, _, n) in enumerate(self.chunks):
                if n == 1:
                    continue
                k = min(seq.num_tokens, window - 1) + n                     # its window keys: ring rows + its own
                if cur and (rows + n) * (keys + k) > self.PREFILL_GROUP_SCORES:
                    groups.append(tuple(cur))
                    cur, rows, keys = [], 0, 0
                cur.append(i)
                rows, keys = rows + n, keys + k
            if cur:
                groups.append(tuple(cur))
            self._layouts["prefill"] = groups
        return self._layouts["prefill"]

    # A stack's logits (groups x heads x queries x window keys) stay under this many: 64 MiB in fp32 (v4-tiny's 32
    # prompts of 128 tokens are 2M; with a real config's 64 or 128 heads, 16 or 8 such prompts make a stack). Stacks
    # of 8 or 16 prompts instead of 32 measured the same for v4-tiny.
    STACK_SCORES = 1 << 24

    @property
    def prefill_stacks(self) -> list[tuple[tuple[int, ...], ...]]:
        """The prefill groups as attention calls: on the torch backend, groups of one chunk with the same length
        and start (not banded) are stacked into one batched call (`StackLayout`; a batch of equal prompts is one
        call per layer, not one per prompt); every other group is a call of its own (a stack of one)."""
        if "stacks" not in self._layouts:
            w, heads, stacks, where = self.cache.cfg.sliding_window, self.cache.cfg.num_attention_heads, [], {}
            stackable = kernel_backend(self.cache.device) == "torch"
            for group in self.prefill_groups:
                if stackable and len(group) == 1 and not self.banded(w, group):
                    seq, _, n = self.chunks[group[0]]
                    shape = (seq.num_tokens, n)
                    per_group = heads * n * (min(seq.num_tokens, w - 1) + n)   # its window logits
                    if shape in where and (len(stacks[where[shape]]) + 1) * per_group <= self.STACK_SCORES:
                        stacks[where[shape]].append(group)
                        continue
                    where[shape] = len(stacks)
                stacks.append([group])
            self._layouts["stacks"] = [tuple(s) for s in stacks]
        return self._layouts["stacks"]

    def stack_layout(self, window: int, stack: tuple[tuple[int, ...], ...]) -> StackLayout:
        def build() -> StackLayout:
            keys = [self._ring_keys(self.chunks[i][0], window) for (i,) in stack]
            qrows = [list(range(a, a + n)) for (i,) in stack for _, a, n in [self.chunks[i]]]
            t = lambda x: torch.tensor(x, dtype=torch.long)
            flat = [r for q in qrows for r in q]
            first = flat[0] if flat == list(range(flat[0], flat[0] + len(flat))) else None
            return StackLayout(t(qrows), t([k[1] for k in keys]), t([k[2] for k in keys]),
                               self.window_layout(window, stack[0]).bias, first)
        return self._cached(("stack", window, stack), build)

    def stack_entries(self, ratio: int, stack: tuple[tuple[int, ...], ...]) -> EntryLayout:
        """A stack's entries: the first group's `EntryLayout` (bias and bounds, the same for all) with every group's
        places, blocks and offsets [G, E]."""
        def build() -> EntryLayout:
            places = [self._entry_places(self.chunks[i][0], self.chunks[i][2], ratio) for (i,) in stack]
            t = lambda x: torch.tensor(x, dtype=torch.long)
            return replace(self.entry_layout(ratio, stack[0]), blocks=t([b for b, _ in places]),
                           offsets=t([o for _, o in places]))
        return self._cached(("stack_entries", ratio, stack), build)

    def _cached(self, key, fn):
        if key not in self._layouts:
            if self.prepared:
                raise RuntimeError(f"step layout {key!r} was not built by StepBatch.prepare (it would be a second "
                                   f"host->device copy in the step)")
            self._layouts[key] = fn()
        return self._layouts[key]

    def decode_tables(self, group: tuple[int, ...]) -> "DecodeTables":
        """Per-row tensors of a decode group (one new token per sequence): `_last_token_tables`."""
        return self._cached(("decode", group), lambda: self._last_token_tables(group))

    def _last_token_tables(self, chunks) -> DecodeTables:
        """Each chunk's last token as a decode row: its batch row, state slot, position and block table (padded to
        the longest). For a decode chunk (one token) that token is the chunk."""
        seqs = [self.chunks[i][0] for i in chunks]
        width = max(1, max(len(s.block_table) for s in seqs))
        return DecodeTables(torch.tensor([self.chunks[i][1] + self.chunks[i][2] - 1 for i in chunks], dtype=torch.long),
                            torch.tensor([s.slot for s in seqs], dtype=torch.long),
                            torch.tensor([s.num_tokens + self.chunks[i][2] - 1 for s, i in zip(seqs, chunks)],
                                         dtype=torch.long),
                            torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                                         dtype=torch.long))

    def tail_tables(self) -> "DecodeTables | None":
        """Where every logit row of the step is its chunk's last token and not every row is one (`prepare` decides):
        those rows as decode rows (`_last_token_tables`), which the last layer's attention reads after the step's cache
        writes (`Attention.attend_tail`); else None."""
        return self._layouts.get("tail")

    def window_layout(self, window: int, group: tuple[int, ...]) -> WindowLayout:
        return self._cached(("window", window, group), lambda: self._window_layout(window, group))

    # A chunk alone in its group attends to its window as a band (kernels/attention.py `banded_sink_attention`: n
    # (2w - 1) scores) where the dense form's n (P + n) would be at least twice as many, on the torch backend (the
    # Triton kernel skips masked key blocks itself).
    BANDED_MIN_WINDOWS = 3

    def banded(self, window: int, group: tuple[int, ...]) -> bool:
        """Whether a prefill group attends to its window as a band (see BANDED_MIN_WINDOWS)."""
        return (len(group) == 1 and self.chunks[group[0]][2] >= self.BANDED_MIN_WINDOWS * window
                and kernel_backend(self.cache.device) == "torch")

    @staticmethod
    def _ring_keys(seq: SeqCache, w: int) -> tuple[range, list[int], list[int]]:
        """A sequence's cached window keys: their positions, state slots and ring rows."""
        past = range(max(0, seq.num_tokens - w + 1), seq.num_tokens)
        return past, [seq.slot] * len(past), [p % w for p in past]

    def _entry_places(self, seq: SeqCache, n: int, m: int) -> tuple[list[int], list[int]]:
        """Pool block and offset of every compressed entry (ratio m) a sequence has after its n new tokens."""
        per_block, count = self.cache.block_size // m, (seq.num_tokens + n) // m
        return [seq.block_table[j // per_block] for j in range(count)], [j % per_block for j in range(count)]

    def _window_layout(self, w: int, group: tuple[int, ...]) -> WindowLayout:
        slots, rows, key_seq, key_pos, q_seq, q_rows = [], [], [], [], [], []
        for i in group:
            seq, a, n = self.chunks[i]
            past, ring_slots, ring_rows = self._ring_keys(seq, w)
            slots += ring_slots
            rows += ring_rows
            key_seq += [i] * len(past)
            key_pos += list(past)
            q_seq += [i] * n
            q_rows += range(a, a + n)
        q_rows_t = torch.tensor(q_rows, dtype=torch.long)
        if self.banded(w, group):
            return WindowLayout(q_rows_t, torch.tensor(slots, dtype=torch.long), torch.tensor(rows, dtype=torch.long),
                                None, torch.tensor([w - 1 - len(slots)], dtype=torch.long))
        positions = self.positions()[q_rows_t]
        key_seq = torch.tensor(key_seq + q_seq, dtype=torch.long)
        key_pos = torch.cat([torch.tensor(key_pos, dtype=torch.long), positions])
        q_seq = torch.tensor(q_seq, dtype=torch.long)
        rel = key_pos[None, :] - positions[:, None]
        hidden = (key_seq[None, :] != q_seq[:, None]) | (rel > 0) | (rel <= -w)
        return WindowLayout(q_rows_t, torch.tensor(slots, dtype=torch.long), torch.tensor(rows, dtype=torch.long),
                            torch.zeros(hidden.shape).masked_fill(hidden, float("-inf")))

    def ring_writes(self, ring_rows: int) -> RingWrites:
        """The newest `ring_rows` positions of each chunk go to rows position % ring_rows of its slot."""
        def build() -> RingWrites:
            ws, wr, wsrc = [], [], []
            for seq, a, n in self.chunks:
                s = seq.num_tokens
                for p in range(max(s, s + n - ring_rows), s + n):
                    ws.append(seq.slot), wr.append(p % ring_rows), wsrc.append(a + p - s)
            t = lambda x: torch.tensor(x, dtype=torch.long)
            return RingWrites(t(ws), t(wr), t(wsrc))
        return self._cached(("ring", ring_rows), build)

    def entry_layout(self, ratio: int, group: tuple[int, ...]) -> EntryLayout:
        return self._cached(("entries", ratio, group), lambda: self._entry_layout(ratio, group))

    def _entry_layout(self, m: int, group: tuple[int, ...]) -> EntryLayout:
        blocks, offsets, lo, hi = [], [], [], []
        base = 0
        for i in group:
            seq, _, n = self.chunks[i]
            s = seq.num_tokens
            b, o = self._entry_places(seq, n, m)
            blocks += b
            offsets += o
            lo += [base] * n
            hi += [base + (p + 1) // m for p in range(s, s + n)]
            base += len(b)
        lo_t, hi_t = torch.tensor(lo, dtype=torch.long), torch.tensor(hi, dtype=torch.long)
        j = torch.arange(base)[None, :]
        hidden = (j < lo_t[:, None]) | (j >= hi_t[:, None])
        k = self.cache.cfg.index_topk
        plain = next((r for r, (l, h) in enumerate(zip(lo, hi)) if h - l > k), len(lo))
        return EntryLayout(torch.tensor(blocks, dtype=torch.long), torch.tensor(offsets, dtype=torch.long),
                           lo_t, hi_t, torch.zeros(hidden.shape).masked_fill(hidden, float("-inf")),
                           max((h - l for l, h in zip(lo, hi)), default=0),
                           plain if 2 <= plain <= len(lo) - 2 else 0)

    def emit_layout(self, ratio: int, ring_rows: int, overlap: bool) -> EmitLayout:
        return self._cached(("emit", ratio, ring_rows, overlap), lambda: self._emit_layout(ratio, ring_rows, overlap))

    def _emit_layout(self, m: int, R: int, overlap: bool) -> EmitLayout:
        """Position p of a sequence with s cached tokens lives in its ring (slot * R + p % R) where p < s, else in
        this step's rows (ring_total + a + p - s, a the chunk's first row). Built as tensors over every closing window
        at once: a prefill of 32 x 128 tokens closes 1024 CSA windows of 4 rows (each with the 4 of the one before)."""
        ring_total = (self.cache.slots.num + 1) * R  # every slot's ring, the scratch slot's included
        per_block = self.cache.block_size // m
        win, blocks = [], []                          # per closing window: (slot, cached, first row, window number)
        for seq, a, n in self.chunks:
            s = seq.num_tokens
            js = range(s // m, (s + n) // m)
            win += [(seq.slot, s, a, j) for j in js]
            blocks += [seq.block_table[j // per_block] for j in js]
        slot, cached, first, j = torch.tensor(win, dtype=torch.long).view(-1, 4).unbind(1)
        k = torch.arange(m)

        def src(window: torch.Tensor) -> torch.Tensor:   # [W, m]: where each raw row of each window lives
            p, c = window[:, None] * m + k, cached[:, None]
            return torch.where(p < c, slot[:, None] * R + p % R, ring_total + first[:, None] + p - c)

        has_prev = (j >= 1) & overlap
        prev = torch.where(has_prev[:, None], src(j - 1), 0)
        return EmitLayout(src(j), prev, has_prev, j * m, torch.tensor(blocks, dtype=torch.long), j % per_block,
                          self.ring_writes(R))


@dataclass
class DecodeBatch:
    """One decode step in fixed shapes (docs/architecture.md §12): B rows, one new token each: sequences first, then
    padding; each row's block table padded to W blocks. Every intermediate
    shape of the step is a function of (B, W, config), never of the sequences' lengths, so the step compiles with
    `fullgraph=True` and can be captured as a CUDA graph. Padded rows read and write only the cache's scratch slot
    and block, and their logits are dropped before sampling."""

    cache: PagedKVCache
    token_ids: torch.Tensor     # [B] long
    positions: torch.Tensor     # [B] long: the new token's position (= tokens cached before it); 0 for padding
    slots: torch.Tensor         # [B] long: state slot; the scratch slot for padding
    block_tables: torch.Tensor  # [B, W] long: blocks past a table's end (and padding rows') are the scratch block
    real: torch.Tensor          # [B] long: 1 for a sequence's row, 0 for padding
    deferred: list | None = None  # None: cache writes happen in the step; a list: they are collected there
    # HCA layers pool their open window only in steps where one closes (`Attention._pool_static`): a `torch.cond`,
    # whose flag is read on the host. The compiled CPU step sets it (host and device are one there); a CUDA graph
    # cannot branch on the device, so it pools every step.
    pool_on_close: bool = False

    def put(self, layer: int, pool: str, index: tuple[torch.Tensor, ...], value: torch.Tensor) -> None:
        """cache.layers[layer].<pool>[index] = value — now, or collected for `apply_writes` after the step. A compiled
        step returns its writes instead of making them: inductor turns an in-graph write into an input mutation and
        may then copy the whole pool, twice, every step; the writes of one layer are read only by the next step."""
        if self.deferred is None:
            self.apply_writes([(layer, pool, index, value)])
        else:
            self.deferred.append((layer, pool, index, value))

    def apply_writes(self, writes: list) -> None:
        for layer, pool, index, value in writes:
            getattr(self.cache.layers[layer], pool)[index] = value


class DecodeInputs:
    """The inputs of one (B, W) bucket in one persistent int64 tensor on the cache's device, filled each step from a
    host mirror (pinned on CUDA) by one non-blocking copy. A captured CUDA graph reads its inputs at fixed addresses,
    so the views below are what it was captured with; the compiled CPU step takes them as arguments."""

    def __init__(self, cache: PagedKVCache, batch_size: int, width: int):
        self.cache, self.batch_size, self.width = cache, batch_size, width
        B, W = batch_size, width
        self.host = torch.zeros(4 * B + B * W, dtype=torch.long, pin_memory=cache.device.type == "cuda")
        self.device = self.host if cache.device.type == "cpu" else torch.empty_like(self.host, device=cache.device)
        d = self.device
        self.token_ids, self.positions, self.slots, self.real = (d[i * B:(i + 1) * B] for i in range(4))
        self.block_tables = d[4 * B:].view(B, W)

    def fill(self, seqs: list[SeqCache], token_ids: list[int]) -> DecodeBatch:
        """Rows for `seqs` (each one token past its cached length; blocks already appended), padding after."""
        B, W = self.batch_size, self.width
        n = len(seqs)
        if not 0 < n <= B or len(token_ids) != n:
            raise ValueError(f"a decode bucket of {B} rows got {n} sequences and {len(token_ids)} tokens")
        longest = max(len(s.block_table) for s in seqs)
        if longest > W:
            raise ValueError(f"a block table of {longest} blocks does not fit a bucket {W} blocks wide")
        h = self._pad()
        h[:4 * B].view(4, B)[:, :n] = torch.tensor([token_ids, [s.num_tokens for s in seqs], [s.slot for s in seqs],
                                                    [1] * n], dtype=torch.long)
        pad = self.cache.scratch_block
        tables = [b for s in seqs for b in s.block_table + [pad] * (W - len(s.block_table))]
        h[4 * B:4 * B + n * W] = torch.tensor(tables, dtype=torch.long)
        return self._upload()

    def padding(self) -> DecodeBatch:
        """Every row padding (a warm-up or capture run: it touches only the scratch slot and block)."""
        self._pad()
        return self._upload()

    def _pad(self) -> torch.Tensor:
        B, h = self.batch_size, self.host
        h[:4 * B] = 0
        h[2 * B:3 * B] = self.cache.scratch_slot
        h[4 * B:] = self.cache.scratch_block
        return h

    def _upload(self) -> DecodeBatch:
        if self.device is not self.host:
            self.device.copy_(self.host, non_blocking=True)
        return self.batch()

    def batch(self) -> DecodeBatch:
        return DecodeBatch(self.cache, self.token_ids, self.positions, self.slots, self.block_tables, self.real)


# ---- prefix export / import (the KV-cache service's unit of exchange) --------------------------------------



def _flat_bytes(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:  # e.g. a sliding-window-only model has no compressed entries
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([t.contiguous().view(torch.uint8).flatten() for t in tensors])


def _unflat_into(buf: torch.Tensor, targets: list[torch.Tensor]) -> None:
    """Copy consecutive byte ranges of `buf` into `targets` (views to write through), in order."""
    at = 0
    for t in targets:
        n = t.numel() * t.element_size()
        t.copy_(buf[at:at + n].view(t.dtype).view(t.shape))
        at += n
    assert at == buf.numel(), f"prefix payload has {buf.numel()} bytes, the cache layout {at}"


class PrefixIO:
    """Exports and imports a sequence's cached prefix: per 128-token unit the compressed entries and indexer
    keys of every layer (one flat byte tensor per unit), and the boundary state at the prefix end (window
    rings and compressor rings; one flat byte tensor). Byte layouts follow the cache's storage format."""

    def __init__(self, cache: PagedKVCache):
        bad = sorted({m for m in cache.cfg.compress_ratios if m and PREFIX_UNIT % m})
        if bad:
            raise ValueError(f"prefix caching needs every compression rate to divide {PREFIX_UNIT}; {bad} do not")
        self.cache = cache

    def _unit_views(self, seq: SeqCache, unit: int) -> list[torch.Tensor]:
        c, views = self.cache, []
        block, within = divmod(unit * PREFIX_UNIT, c.block_size)
        b = seq.block_table[block]
        for lc in c.layers:
            if lc.entries is None:
                continue
            lo, n = within // lc.ratio, PREFIX_UNIT // lc.ratio
            views.append(lc.entries[b, lo:lo + n])
            if lc.index_keys is not None:
                views.append(lc.index_keys[b, lo:lo + n])
        return views

    def _boundary_views(self, seq: SeqCache) -> list[torch.Tensor]:
        views = []
        for lc in self.cache.layers:
            views.append(lc.swa[seq.slot])
            for t in (lc.state_kv, lc.state_gate, lc.index_state_kv, lc.index_state_gate):
                if t is not None:
                    views.append(t[seq.slot])
        return views

    @property
    def unit_bytes(self) -> int:
        c = self.cache
        total = 0
        for lc in c.layers:
            if lc.entries is not None:
                total += (PREFIX_UNIT // lc.ratio) * lc.entries[0, 0].nbytes
            if lc.index_keys is not None:
                total += (PREFIX_UNIT // lc.ratio) * lc.index_keys[0, 0].nbytes
        return total

    def export_units(self, seq: SeqCache, first: int, last: int) -> list[torch.Tensor]:
        """Flat byte tensors of units [first, last) (their windows must have closed: last*128 <= cached)."""
        assert last * PREFIX_UNIT <= seq.num_tokens, "exporting units the sequence has not cached"
        return [_flat_bytes(self._unit_views(seq, u)).clone() for u in range(first, last)]

    def export_boundary(self, seq: SeqCache) -> torch.Tensor:
        """The state needed to resume exactly at the sequence's current length (a multiple of 128)."""
        assert seq.num_tokens % PREFIX_UNIT == 0, "boundary state is kept only at unit boundaries"
        return _flat_bytes(self._boundary_views(seq)).clone()

    def import_prefix(self, seq: SeqCache, units: list[torch.Tensor], boundary: torch.Tensor) -> None:
        """Load a prefix of len(units) units into a fresh sequence (blocks must be allocated)."""
        n_tokens = len(units) * PREFIX_UNIT
        assert seq.num_tokens == 0 and self.cache.blocks_for(n_tokens) <= len(seq.block_table)
        *units, boundary = self.cache.staging.upload([*units, boundary])   # one copy to the cache's device
        for u, buf in enumerate(units):
            _unflat_into(buf, self._unit_views(seq, u))
        _unflat_into(boundary, self._boundary_views(seq))
        seq.num_tokens = n_tokens
