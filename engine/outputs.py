"""Request outputs in vLLM's shape (`RequestOutput.outputs[i].token_ids`, `.text`, `.logprobs`, ...)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .sampling import Logprob

# Per position: token id -> Logprob. Prompt logprobs start with None (the first token has no prediction).
PositionLogprobs = dict[int, Logprob]


class FlatLogprobs(Sequence):
    """A sequence's per-position logprobs kept in flat lists, one entry per (position, token): what the engine
    appends each step and what travels from the engine to the server. Reading it as vLLM users do works:
    `logprobs[i]` is position i's dict token id -> Logprob, and `len`, iteration and slices behave as a list's.

    Why flat: a Python object per entry made one request of n=8 x 512 tokens with logprobs=20 cost 200 ms to
    pickle and 230 ms to unpickle (Ray ships outputs pickled), with the GIL held, stalling every other request of
    the replica; plain lists of numbers take 4 and 9 ms. `entries(i)` walks a position without building objects.
    """

    __slots__ = ("ends", "token_ids", "logprobs", "ranks", "decoded")

    def __init__(self):
        self.ends: list[int] = []                    # position i's entries are [ends[i-1], ends[i])
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.ranks: list[int | None] = []
        self.decoded: list[str | None] = []

    def add(self, token_ids: list[int], logprobs: list[float], ranks: list[int | None],
            decoded: list[str | None]) -> None:
        """Append one position's entries (parallel lists, in the order they are to be read)."""
        self.token_ids += token_ids
        self.logprobs += logprobs
        self.ranks += ranks
        self.decoded += decoded
        self.ends.append(len(self.token_ids))

    def append(self, position: PositionLogprobs) -> None:
        """Append one position given as vLLM's dict."""
        self.add(list(position), [e.logprob for e in position.values()], [e.rank for e in position.values()],
                 [e.decoded_token for e in position.values()])

    def extend(self, other: "FlatLogprobs") -> None:
        base = len(self.token_ids)
        self.ends += [base + e for e in other.ends]
        self.token_ids += other.token_ids
        self.logprobs += other.logprobs
        self.ranks += other.ranks
        self.decoded += other.decoded

    def entries(self, i: int) -> Iterator[tuple[int, float, int | None, str | None]]:
        """Position i's entries as (token id, logprob, rank, decoded token) tuples, in stored order (the top-k by
        rank, then the chosen token when it is not among them)."""
        start, end = self._span(i)
        return zip(self.token_ids[start:end], self.logprobs[start:end], self.ranks[start:end],
                   self.decoded[start:end])

    def _span(self, i: int) -> tuple[int, int]:
        i = range(len(self.ends))[i]  # negative indices; IndexError past the end
        return (self.ends[i - 1] if i else 0), self.ends[i]

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            first, stop, step = i.indices(len(self))
            out = FlatLogprobs()
            if step != 1:
                for j in range(first, stop, step):
                    out.append(self[j])
                return out
            if stop <= first:
                return out
            base, end = (self.ends[first - 1] if first else 0), self.ends[stop - 1]
            out.ends = [e - base for e in self.ends[first:stop]]
            out.token_ids, out.logprobs = self.token_ids[base:end], self.logprobs[base:end]
            out.ranks, out.decoded = self.ranks[base:end], self.decoded[base:end]
            return out
        return {t: Logprob(logprob=lp, rank=r, decoded_token=d) for t, lp, r, d in self.entries(i)}

    def __eq__(self, other) -> bool:
        if isinstance(other, FlatLogprobs):
            return (self.ends, self.token_ids, self.logprobs, self.ranks, self.decoded) == (
                other.ends, other.token_ids, other.logprobs, other.ranks, other.decoded)
        return isinstance(other, list) and list(self) == other

    def __repr__(self) -> str:
        return f"FlatLogprobs({list(self)!r})"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: FlatLogprobs | None = None             # per position: token id -> Logprob (see FlatLogprobs)
    finish_reason: str | None = None  # "stop" (EOS, stop string or stop token) or "length"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it, if any


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0
    # Set when this request failed inside the engine (e.g. sampling raised); other requests are unaffected.
    error: str | None = None
    # The Serve replica that ran it (V4Server sets it on a request's first output; the response's x-v4ray-replica)
    replica: str | None = None


def merge_delta(into: RequestOutput, delta: RequestOutput) -> RequestOutput:
    """Append a DELTA output to an earlier one of the same request (in place; returns `into`).

    Used where a reader fell behind (several deltas coalesce into one) and by readers that need the whole
    output at the end (non-streaming responses)."""
    by_index = {c.index: c for c in into.outputs}
    for d in delta.outputs:
        c = by_index.get(d.index)
        if c is None:
            c = CompletionOutput(d.index, "", [], logprobs=FlatLogprobs() if d.logprobs is not None else None)
            into.outputs.append(c)
            by_index[d.index] = c
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None:  # extend in place: merging k deltas costs O(total), not O(k * total)
            if c.logprobs is None:
                c.logprobs = FlatLogprobs()
            c.logprobs.extend(d.logprobs)
        c.cumulative_logprob = d.cumulative_logprob
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    into.outputs.sort(key=lambda c: c.index)
    if delta.prompt_logprobs is not None:
        into.prompt_logprobs = delta.prompt_logprobs
    if delta.prompt_token_ids and not into.prompt_token_ids:
        into.prompt, into.prompt_token_ids = delta.prompt, delta.prompt_token_ids
    into.finished, into.error = delta.finished, delta.error
    into.num_cached_tokens = max(into.num_cached_tokens, delta.num_cached_tokens)
    return into
