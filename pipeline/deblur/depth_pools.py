"""Depth-specific pools: what crosses between the encoder and the depth pools, and how big each pool is.

No torch and no Ray here: shard workers import this, and it is what they route by. In the
`depth-pools` layout an encoder actor returns, for a batch of frames, one `EncodedBatch` (per frame:
key, patch shape, each patch's exit depth) and one `DepthGroup` per depth 1..N (the features of
every patch of the batch that exits there, pooled over the batch's frames). The depth-k group goes to
an actor of depth k's pool, which runs columns 1..k over it and answers with a `DepthGroup` of
residuals; those go back to the encoder actor, which stitches and encodes the frames.

Pool sizes follow the work: depth k's share of the decoder actors is its patches x k columns, counted
over the exit mix seen so far (plus a prior from the exit table, so the first batches have a plan),
and recomputed for every batch, so the pools re-balance when the mix shifts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.formats.frames import Rejected

PRIOR_PATCHES = 64  # weight of the exit-table prior, in patches: a few frames' observations outweigh it


@dataclass(frozen=True)
class EncodedFrame:
    """One encoded frame, as the router sees it."""

    key: str
    shape: tuple[int, int]  # patch size (h, w): frames smaller than a patch have smaller patches
    depths: np.ndarray  # (P,) int64 exit depth of each patch, row-major
    encode_ms: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class EncodedBatch:
    """The encoder's small answer: what it encoded, and what it could not (with the original bytes)."""

    frames: tuple[EncodedFrame, ...]
    rejected: tuple[Rejected, ...]

    def depths_present(self) -> list[int]:
        """Depths >= 1 that some patch of the batch exits at: the pools this batch needs."""
        present: set[int] = set()
        for frame in self.frames:
            present.update(int(d) for d in np.unique(frame.depths) if d > 0)
        return sorted(present)

    def histogram(self, num_columns: int) -> list[int]:
        """Patches per exit depth 0..N over the batch."""
        total = np.zeros(num_columns + 1, dtype=np.int64)
        for frame in self.frames:
            total += np.bincount(frame.depths, minlength=num_columns + 1)[: num_columns + 1]
        return total.tolist()


@dataclass(frozen=True)
class GroupPart:
    """Depth-k patches of the batch's frames that share one patch shape, frame after frame: their
    features (one array per encoder level, (n, C, h, w)) on the way to a pool, their residual
    ((n, 3, h, w)) on the way back."""

    shape: tuple[int, int]
    arrays: tuple[np.ndarray, ...]
    counts: tuple[int, ...]  # patches of each frame of this shape, in batch order


@dataclass(frozen=True)
class DepthGroup:
    depth: int
    parts: tuple[GroupPart, ...]
    decode_ms: float = 0.0  # set on the way back: how long the pool took

    @property
    def patches(self) -> int:
        return sum(sum(p.counts) for p in self.parts)


def prior_histogram(exit_table: Sequence[int], num_columns: int) -> list[float]:
    """Patches per depth 0..N expected before anything is seen: every class equally likely, each
    exiting where the exit table says; `PRIOR_PATCHES` patches in all."""
    prior = [0.0] * (num_columns + 1)
    for depth in exit_table:
        prior[min(int(depth), num_columns)] += PRIOR_PATCHES / len(exit_table)
    return prior


def work_per_depth(histogram: Sequence[float]) -> list[float]:
    """Column runs per depth 1..N: a depth-k patch runs k columns (depth 0 runs none)."""
    return [float(n) * k for k, n in enumerate(histogram) if k > 0]


def pool_sizes(work: Sequence[float], actors: int) -> list[int]:
    """Actors per depth 1..N in proportion to `work`, greedily on work per actor. Every depth with work
    gets one actor while there are actors to give (the busiest first); with fewer actors than depths
    with work, the rest get none and borrow one (`assign`)."""
    active = sorted((d for d, w in enumerate(work) if w > 0), key=lambda d: -work[d])
    if not active:  # nothing to decode (every patch exits at depth 0)
        return [actors] + [0] * (len(work) - 1)
    sizes = [0] * len(work)
    for d in active[:actors]:
        sizes[d] = 1
    for _ in range(actors - len(active)):
        d = max(active, key=lambda i: work[i] / sizes[i])
        sizes[d] += 1
    return sizes


def assign(sizes: Sequence[int], actors: int) -> list[list[int]]:
    """Actor indices of each depth's pool: consecutive runs in depth order. A depth with no actor of
    its own (more depths with work than actors) borrows one, round-robin over all."""
    pools, start = [], 0
    for d, size in enumerate(sizes):
        pools.append([(start + j) % actors for j in range(size)] if size else [d % actors])
        start += size
    return pools


class ExitMix:
    """The exit mix a router sizes the pools by: the last `window` frames it saw, over the exit
    table's prior. A shift in the mix (a pan, a scene cut) moves the pool sizes within `window` frames."""

    def __init__(self, exit_table: Sequence[int], num_columns: int, window: int = 32) -> None:
        self.num_columns = num_columns
        self.prior = np.array(prior_histogram(exit_table, num_columns))
        self.recent: deque[np.ndarray] = deque(maxlen=window)

    def observe(self, batch: EncodedBatch) -> None:
        for frame in batch.frames:
            self.recent.append(np.bincount(frame.depths, minlength=self.num_columns + 1)[: self.num_columns + 1])

    def histogram(self) -> list[float]:
        return (self.prior + sum(self.recent, np.zeros_like(self.prior))).tolist()

    def sizes(self, actors: int) -> list[int]:
        return pool_sizes(work_per_depth(self.histogram()), actors)
