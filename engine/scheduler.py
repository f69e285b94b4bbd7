"""Continuous-batching scheduler: which sequences run this step and how many tokens each contributes.

Pure Python decisions over a capacity interface (the runner's block accounting), no tensors. One rule covers
prefill, chunked prefill, decode and recomputation after preemption: a sequence knows all its tokens (prompt
plus generated) and how many are in the cache; each step it contributes the next uncached ones, up to the
step's token budget, and is sampled when its chunk reaches its last known token.

Policy (vLLM's): running sequences first, in admission order; waiting sequences are admitted in arrival order
while the budget, `max_num_seqs` and the KV cache allow. When a running sequence needs blocks and none are free,
the most recently admitted running sequence is preempted: its cache is freed and it returns to the front of
the waiting queue, keeping its generated tokens, to be recomputed later. Nothing is lost.

Fair steps (`max_step_rows`, off by default): when more running sequences than that are ready, whole requests take
turns — narrow requests first, then the one that waited longest, and none waits more than `FAIR_MAX_SKIP_STEPS`
steps — so that a few wide requests (n = 8, with logprobs) cannot stretch every request's step on a replica whose
step time grows with its rows. A request's sequences always step together: their shared seeded generator draws in
the same order as without the bound (docs/architecture.md §3).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from v4ray.model.kv_cache import PREFIX_UNIT
from .sequence import Sequence

FAIR_MAX_SKIP_STEPS = 4   # with max_step_rows: a request left out of this many steps in a row runs next


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

    def token_ids(self, start: int, num_tokens: int) -> list[int]:
        """The sequence's tokens [start, start + num_tokens): a chunk's input."""
        return self.seq.token_ids(start, start + num_tokens)

    @property
    def num_tokens(self) -> int:
        return self.seq.num_tokens


@dataclass
class ScheduledChunk:
    state: SeqState
    start: int          # first token position of the chunk
    num_tokens: int
    logit_rows: list[int]   # rows of the chunk whose logits are needed
    sample: bool            # the chunk ends at the last known token: sample the next one


class Scheduler:
    def __init__(self, capacity: Capacity, max_num_batched_tokens: int, max_num_seqs: int,
                 prefix_caching: bool = False, max_step_rows: int = 0):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if max_step_rows < 0:
            raise ValueError("max_step_rows must be >= 0 (0: every running sequence steps)")
        self.capacity = capacity
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.prefix_caching = prefix_caching
        self.max_step_rows = max_step_rows
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self.num_preemptions = 0
        self.num_steps = 0
        self.last_ran: dict[str, int] = {}   # running request id -> the step it last ran in (with max_step_rows)

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
        self.num_steps += 1
        turn = self._fair_turn()
        for s in list(self.running):
            if s not in self.running:      # preempted earlier in this loop
                continue
            if turn is not None and s.request_id not in turn:
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

    def _fair_turn(self) -> set[str] | None:
        """With `max_step_rows`, the requests whose running sequences step now; None: all of them. Requests are
        taken whole while their rows fit the bound: first any left out of FAIR_MAX_SKIP_STEPS steps, then the
        narrowest, then the one that waited longest (at least one request always runs)."""
        if not self.max_step_rows:
            return None
        width = Counter(s.request_id for s in self.running)
        if len(self.running) <= self.max_step_rows:
            self.last_ran = dict.fromkeys(width, self.num_steps)
            return None
        waited = {rid: self.num_steps - self.last_ran.get(rid, self.num_steps - 1) for rid in width}
        order = sorted(width, key=lambda rid: (waited[rid] <= FAIR_MAX_SKIP_STEPS, width[rid], -waited[rid]))
        turn, rows = set(), 0
        for rid in order:
            if turn and rows + width[rid] > self.max_step_rows:
                continue
            turn.add(rid)
            rows += width[rid]
        # kept for the running requests only: a finished or preempted request's entry goes with it
        self.last_ran = {rid: self.num_steps if rid in turn else self.num_steps - waited[rid] for rid in width}
        return turn

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
