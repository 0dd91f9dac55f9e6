"""Training batches streamed from paired shards (`blur.png` + `sharp.png`, as `adarevd synth` writes).

Each worker streams its share of the shards (shards are dealt out per epoch, in an order drawn from the
seed), shuffles samples through a bounded buffer of still-encoded pairs, and cuts `repeats` aligned
crops, each with one of the 8 flips/rotations, from every pair it decodes. Everything random is drawn
from the seed, the worker's rank and a counter, so batch `i` of worker `r` is the same in every run and
a resumed run can skip to step `i` without decoding the pairs it skips.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from adarevd.errors import InvalidInput
from adarevd.training import dihedral
from pipeline.formats import images
from pipeline.formats.shards import Sample, iter_samples
from pipeline.store.storage import Store

BLURRY, SHARP = "blur.png", "sharp.png"


class PairDataError(InvalidInput):
    """Paired training data that cannot be used (names the store, shard or key)."""


@dataclass(frozen=True)
class StreamConfig:
    batch: int = 8
    crop: int = 96
    repeats: int = 4  # crops cut from each decoded pair
    buffer: int = 64  # shuffle buffer, in encoded pairs
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.batch, self.crop, self.repeats, self.buffer) < 1:
            raise InvalidInput(f"batch, crop, repeats and buffer must be >= 1, got {self}")


def paired_shards(store: Store) -> list[str]:
    """The `*.tar` shards of a paired-data folder, sorted; an error if there are none."""
    shards = store.glob("*.tar")
    if not shards:
        raise PairDataError(f"{store.url}: no *.tar shards; make paired shards with `adarevd synth --output URL`")
    return shards


def decode_pair(sample: Sample, shard: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(blurry, sharp) as (3, H, W) float RGB in [0, 1], or a PairDataError naming shard and key."""
    where = f"{shard}: sample {sample.key!r}"
    missing = [m for m in (BLURRY, SHARP) if m not in sample.members]
    if missing:
        raise PairDataError(
            f"{where} has no {', '.join(missing)} (members: {sorted(sample.members)}); "
            f"paired shards need {BLURRY} and {SHARP}"
        )
    out = []
    for member in (BLURRY, SHARP):
        try:
            bgr, _ = images.decode(sample.members[member])
        except images.ImageError as e:
            raise PairDataError(f"{where}: {member}: {e}") from None
        out.append(torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1).float().div(255))
    if out[0].shape != out[1].shape:
        raise PairDataError(f"{where}: {BLURRY} is {tuple(out[0].shape[1:])} but {SHARP} is {tuple(out[1].shape[1:])}")
    return out[0], out[1]


class PairStream:
    """The endless batch stream of worker `rank` of `world`."""

    def __init__(self, store: Store, config: StreamConfig, rank: int = 0, world: int = 1) -> None:
        self.store, self.config, self.rank, self.world = store, config, rank, world
        self.shards = paired_shards(store)
        if len(self.shards) < world:
            raise PairDataError(
                f"{store.url}: {len(self.shards)} shard(s) for {world} workers; each worker needs a shard "
                f"(write smaller shards with `adarevd synth --max-frames-per-shard`, or use fewer workers)"
            )

    def _encoded(self) -> Iterator[tuple[Sample, str]]:
        """This worker's samples, epoch after epoch, shuffled through the buffer (not decoded)."""
        c = self.config
        for epoch in itertools.count():
            order = np.random.default_rng([c.seed, epoch]).permutation(len(self.shards))
            rng = np.random.default_rng([c.seed, epoch, self.rank])
            buffer: list[tuple[Sample, str]] = []
            seen = 0
            for i in order[self.rank :: self.world]:
                shard = self.shards[int(i)]
                with self.store.open(shard) as stream:
                    for sample in iter_samples(stream, shard):
                        seen += 1
                        buffer.append((sample, shard))
                        if len(buffer) >= c.buffer:
                            yield _pop(buffer, rng)
            if not seen:
                raise PairDataError(f"{self.store.url}: the shards of worker {self.rank} hold no samples")
            while buffer:
                yield _pop(buffer, rng)

    def _crops(self, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Aligned crops; the first `skip` are drawn but not made (pairs wholly skipped are not decoded)."""
        c = self.config
        for n, (sample, shard) in enumerate(self._encoded()):
            if skip >= c.repeats:
                skip -= c.repeats
                continue
            blurry, sharp = decode_pair(sample, shard)
            h, w = blurry.shape[1:]
            if min(h, w) < c.crop:
                raise PairDataError(
                    f"{shard}: sample {sample.key!r} is {h}x{w}, smaller than the {c.crop} crop; "
                    f"use a smaller --crop or larger pairs"
                )
            rng = np.random.default_rng([c.seed, self.rank, n, 1])
            for r in range(c.repeats):
                y, x, k = int(rng.integers(h - c.crop + 1)), int(rng.integers(w - c.crop + 1)), int(rng.integers(8))
                if r < skip:
                    continue
                window = (slice(None), slice(y, y + c.crop), slice(x, x + c.crop))
                yield dihedral(blurry[window], k), dihedral(sharp[window], k)
            skip = 0

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(blurry, sharp) batches of (batch, 3, crop, crop), starting at batch `start_step`."""
        size = self.config.batch
        crops = self._crops(start_step * size)
        while True:
            chunk = [next(crops) for _ in range(size)]
            yield torch.stack([b for b, _ in chunk]), torch.stack([s for _, s in chunk])


def _pop(buffer: list, rng: np.random.Generator) -> object:
    i = int(rng.integers(len(buffer)))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()
