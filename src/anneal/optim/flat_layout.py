"""Where every parameter lives in one flat buffer, and which slice of it a rank owns.

Parameters are laid out group by group (so each param group is one contiguous range) and, within
a group, in ``model.named_parameters()`` order. The buffer is padded to ``world_size *
shard_size`` with ``shard_size = ceil(total / world_size)``, and rank ``r`` owns
``[r * shard_size, (r + 1) * shard_size)``: exactly ``torch.chunk``'s split, which is also how a
1-D DTensor with ``Shard(0)`` splits ``total`` elements. That is what lets a checkpoint written on
N ranks load on M ranks (the layout itself does not depend on the world size).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """The part of param group ``group`` inside this rank's shard, in shard-local offsets."""

    group: int
    start: int
    end: int


@dataclass(frozen=True)
class FlatLayout:
    names: tuple[str, ...]
    numels: tuple[int, ...]
    offsets: tuple[int, ...]  # start of each parameter in the flat buffer
    group_bounds: tuple[tuple[int, int], ...]  # [start, end) of each param group
    world_size: int
    rank: int

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def shard_size(self) -> int:
        return -(-self.total // self.world_size)

    @property
    def padded(self) -> int:
        return self.shard_size * self.world_size

    @property
    def shard_start(self) -> int:
        return self.rank * self.shard_size

    @property
    def valid(self) -> int:
        """Elements of this rank's shard that hold parameters (the rest is padding)."""
        return max(0, min(self.shard_size, self.total - self.shard_start))

    def shard_bounds(self, rank: int) -> tuple[int, int]:
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def segments(self) -> list[Segment]:
        """One segment per param group that overlaps this rank's shard."""
        lo, hi = self.shard_bounds(self.rank)
        out = []
        for g, (start, end) in enumerate(self.group_bounds):
            a, b = max(start, lo), min(end, hi)
            if a < b:
                out.append(Segment(g, a - lo, b - lo))
        return out

    def signature(self) -> str:
        """Names and sizes in order, hashed: equal signatures mean the flat state lines up."""
        text = json.dumps([list(self.names), list(self.numels), [list(b) for b in self.group_bounds]])
        return hashlib.sha256(text.encode()).hexdigest()[:16] + f":{len(self.names)}params:{self.total}elems"


def build_layout(
    group_names: list[list[str]], group_numels: list[list[int]], world_size: int, rank: int
) -> FlatLayout:
    """The layout of parameters given per group as names and element counts."""
    names, numels, offsets, bounds = [], [], [], []
    offset = 0
    for g_names, g_numels in zip(group_names, group_numels):
        start = offset
        for name, numel in zip(g_names, g_numels):
            names.append(name)
            numels.append(numel)
            offsets.append(offset)
            offset += numel
        bounds.append((start, offset))
    return FlatLayout(tuple(names), tuple(numels), tuple(offsets), tuple(bounds), world_size, rank)
