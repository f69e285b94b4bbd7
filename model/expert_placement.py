"""Which expert shard serves which routed expert: contiguous global-id ranges plus optional redundant copies.

Pure Python/CPU tensors, decided apart from doing: the router asks `destinations` for a shard per (token,
expert) pair. With redundant copies the choice among an expert's holders is deterministic (row index modulo
the number of holders), so a batch always splits the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int
    ranges: tuple[tuple[int, int], ...]               # shard s holds experts [e0, e1)
    redundant: dict[int, tuple[int, ...]] = field(default_factory=dict)  # expert -> extra holder shards

    @classmethod
    def contiguous(cls, num_experts: int, num_shards: int,
                   redundant: dict[int, list[int]] | None = None) -> "ExpertPlacement":
        if not 1 <= num_shards <= num_experts:
            raise ValueError(f"num_expert_shards must be in [1, {num_experts}] (the number of routed experts), "
                             f"got {num_shards}")
        base, extra = divmod(num_experts, num_shards)
        ranges, start = [], 0
        for s in range(num_shards):
            end = start + base + (s < extra)
            ranges.append((start, end))
            start = end
        red = {}
        for e, shards in (redundant or {}).items():
            e = int(e)
            if not 0 <= e < num_experts:
                raise ValueError(f"redundant_experts: expert {e} is outside [0, {num_experts})")
            bad = [s for s in shards if not 0 <= s < num_shards]
            if bad:
                raise ValueError(f"redundant_experts[{e}]: shards {bad} are outside [0, {num_shards})")
            red[e] = tuple(sorted({int(s) for s in shards} - {cls._owner(ranges, e)}))
        return cls(num_experts, tuple(ranges), red)

    @staticmethod
    def _owner(ranges, e: int) -> int:
        return next(s for s, (a, b) in enumerate(ranges) if a <= e < b)

    @property
    def num_shards(self) -> int:
        return len(self.ranges)

    def holders(self, e: int) -> list[int]:
        """Shards holding expert e, its contiguous owner first."""
        return [self._owner(self.ranges, e), *self.redundant.get(e, ())]

    def shard_experts(self, shard: int) -> list[int]:
        a, b = self.ranges[shard]
        return list(range(a, b)) + sorted(e for e, s in self.redundant.items() if shard in s)

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """holders [E, max_copies] (padded by repetition) and copies [E]."""
        hold = [self.holders(e) for e in range(self.num_experts)]
        width = max(len(h) for h in hold)
        padded = [h + [h[0]] * (width - len(h)) for h in hold]
        return torch.tensor(padded, dtype=torch.long), torch.tensor([len(h) for h in hold], dtype=torch.long)

    def destinations(self, expert_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Shard index for each (row, expert) pair: copy number row % copies of the expert's holders."""
        holders, copies = self.table()
        return holders[expert_ids, rows % copies[expert_ids]]
