"""Continuous-batching scheduler: which sequences run this step and how many tokens each contributes.

Pure Python decisions over a capacity interface (the runner's block accounting), no tensors. One rule covers
prefill, chunked prefill, decode and recomputation after preemption: a sequence knows all its tokens (prompt
plus generated) and how many are in the cache; each step it contributes the next uncached ones, up to the
step's token budget, and is sampled when its chunk reaches its last known token.

Policy (vLLM's): running sequences first, in admission order; waiting sequences are admitted in arrival order
while the budget, `max_num_seqs` and the KV cache allow. When a running sequence needs blocks and none are free,
the most recently admitted running sequence is preempted: its cache is freed and it returns to the front of
the waiting queue, keeping its generated tokens, to be recomputed later. Nothing is lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from v4ray.model.kv_cache import PREFIX_UNIT
from .sequence import Sequence


class Capacity(Protocol):
    def can_admit(self, num_tokens: int) -> bool: ...
    def fits_ever(self, num_tokens: int) -> bool: ...
    def can_append(self, key: str, num_tokens: int) -> bool: ...
    def reserve(self, key: str, num_tokens: int) -> None: ...


@dataclass(eq=False)
class SeqState:
    """A sequence as the scheduler sees it."""

    key: str
    request_id: str
    seq: Sequence
    arrival: int
    num_computed: int = 0                  # tokens in the KV cache
    want_prompt_logits: bool = False      # prompt logprobs not yet computed
    prompt_logits: list = field(default_factory=list)
    store_at: int | None = None           # cache length at which to store the prompt prefix
    num_preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.seq.all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.seq.prompt_token_ids) + len(self.seq.output_token_ids)


@dataclass
class ScheduledChunk:
    state: SeqState
    start: int          # first token position of the chunk
    num_tokens: int
    logit_rows: list[int]   # rows of the chunk whose logits are needed
    sample: bool            # the chunk ends at the last known token: sample the next one


class Scheduler:
    def __init__(self, capacity: Capacity, max_num_batched_tokens: int, max_num_seqs: int,
                 prefix_caching: bool = False):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.capacity = capacity
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.prefix_caching = prefix_caching
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self.num_preemptions = 0

    # ---- queues -----------------------------------------------------------------------------------------
    def add(self, state: SeqState) -> None:
        self.waiting.append(state)

    def remove(self, key: str) -> SeqState | None:
        """Take a sequence out of either queue (abort or finish); the caller frees its cache."""
        for s in self.running:
            if s.key == key:
                self.running.remove(s)
                return s
        for s in self.waiting:
            if s.key == key:
                self.waiting.remove(s)
                return s
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------------------
    def schedule(self, admit, preempt, load_prefix) -> list[ScheduledChunk]:
        """Plan one step. Callbacks do the doing: admit(state, num_tokens) reserves cache, preempt(state) frees
        it, load_prefix(state) -> cached tokens loaded on admission."""
        budget = self.max_num_batched_tokens
        plan: list[ScheduledChunk] = []
        for s in list(self.running):
            if s not in self.running:      # preempted earlier in this loop
                continue
            if budget <= 0:
                break
            n = self._chunk_len(s, budget)
            if n == 0:
                continue
            while not self.capacity.can_append(s.key, n):
                victim = self.running[-1]
                self._preempt(victim, preempt)
                if victim is s:
                    break
            if s not in self.running:
                continue
            self.capacity.reserve(s.key, n)  # later checks in this step see these blocks as taken
            plan.append(self._chunk(s, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            if not self.capacity.can_admit(s.num_tokens):
                break
            self.waiting.popleft()
            admit(s, s.num_tokens)
            self.running.append(s)
            if self.prefix_caching and not s.want_prompt_logits:
                s.num_computed = load_prefix(s)
                prompt_len = len(s.seq.prompt_token_ids)
                store_at = prompt_len // PREFIX_UNIT * PREFIX_UNIT
                s.store_at = store_at if store_at > s.num_computed else None
            n = self._chunk_len(s, budget)
            plan.append(self._chunk(s, n))
            budget -= n
        return plan

    def _chunk_len(self, s: SeqState, budget: int) -> int:
        end = s.store_at if s.store_at is not None and s.num_computed < s.store_at else s.num_tokens
        return max(0, min(end - s.num_computed, budget))

    def _chunk(self, s: SeqState, n: int) -> ScheduledChunk:
        start = s.num_computed
        sample = start + n == s.num_tokens
        prompt_len = len(s.seq.prompt_token_ids)
        if s.want_prompt_logits and start < prompt_len:
            rows = list(range(n))
        else:
            rows = [n - 1] if sample else []
        return ScheduledChunk(s, start, n, rows, sample)

    def _preempt(self, s: SeqState, preempt) -> None:
        self.running.remove(s)
        preempt(s)
        s.num_computed = 0
        s.store_at = None
        if s.want_prompt_logits:
            s.prompt_logits = []
        s.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(s)
