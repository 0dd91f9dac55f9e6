"""Numbered WebDataset shards on a store: `<prefix>-000000.tar`, ... each committed whole.

Samples are appended to a local temporary tar; when the next sample would pass the frame or byte limit
the tar is closed, uploaded under a temporary name and moved to its final name (`Store.commit_file`),
so a reader never sees a partial shard. Same samples, same limits: same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from adarevd.errors import AlreadyExists, InvalidInput
from pipeline.formats.shards import Sample, TarShardWriter
from pipeline.store.scratch import scratch
from pipeline.store.storage import Store

TAR_OVERHEAD = 1024  # header + padding per member, at most


@dataclass(frozen=True)
class ShardLimits:
    max_samples: int = 1000
    max_bytes: int = 512 * 2**20

    def __post_init__(self) -> None:
        if self.max_samples < 1 or self.max_bytes < 1:
            raise InvalidInput(f"shard limits must be positive, got {self}")


def refuse_earlier(store: Store, prefix: str, index: str | None, overwrite: bool, hint: str = "") -> None:
    """An earlier run's `<prefix>-*.tar` shards (or `index`) in `store` stop a new run unless
    `overwrite`: new shards over some of the old ones would leave a mix of the two."""
    earlier = store.glob(f"{prefix}-*.tar") + (store.glob(index) if index else [])
    if earlier and not overwrite:
        raise AlreadyExists(
            f"{store.url} already holds {earlier[0]} (an earlier run's); choose another --output or pass "
            f"--overwrite{hint}"
        )


def remove_stale(store: Store, prefix: str, keep: list[str]) -> None:
    """After an `overwrite` run: remove the earlier run's shards that this one did not write again."""
    for stale in sorted(set(store.glob(f"{prefix}-*.tar")) - set(keep)):
        store.remove(stale)


class ShardSink:
    """Append samples; `add` returns the name of the shard the sample went into. `before_commit` runs
    before each shard's commit and raises to commit nothing more (the run lost its lease)."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        limits: ShardLimits = ShardLimits(),
        before_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.store, self.prefix, self.limits, self.before_commit = store, prefix, limits, before_commit
        self.committed: list[str] = []
        self.bytes_committed = 0
        self._tmp = scratch("shard")
        self._file = None
        self._writer: TarShardWriter | None = None
        self._samples = 0
        self._bytes = 0

    @property
    def current(self) -> str:
        return f"{self.prefix}-{len(self.committed):06d}.tar"

    def add(self, sample: Sample) -> str:
        size = sample.nbytes + TAR_OVERHEAD * len(sample.members)
        if self._writer is not None and (
            self._samples >= self.limits.max_samples or self._bytes + size > self.limits.max_bytes
        ):
            self._commit()
        if self._writer is None:
            self._file = open(os.path.join(self._tmp.name, "shard.tar"), "wb")  # noqa: SIM115 - closed in _commit
            self._writer = TarShardWriter(self._file)
            self._samples = self._bytes = 0
        self._writer.write(sample)
        self._samples += 1
        self._bytes += size
        return self.current

    def close(self) -> list[str]:
        """Commit the last shard; returns every committed shard name."""
        try:
            if self._writer is not None:
                self._commit()
        finally:
            self._tmp.cleanup()
        return self.committed

    def _commit(self) -> None:
        assert self._writer is not None and self._file is not None
        self._writer.close()
        self._file.close()
        name = self.current
        local = self._file.name
        self.before_commit()
        self.store.commit_file(name, local)
        self.bytes_committed += os.path.getsize(local)
        os.remove(local)
        self.committed.append(name)
        self._writer = self._file = None

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:  # an error: keep what was committed, drop the partial shard
            if self._writer is not None and self._file is not None:
                # The tar stream first: left open, it writes its end into the closed file when it is
                # collected ("write to closed file", an unraisable exception).
                with suppress(OSError, ValueError):  # (the error may be the file's: a full disk)
                    self._writer.close()
                self._file.close()
            self._tmp.cleanup()
