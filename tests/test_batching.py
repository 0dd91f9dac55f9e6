"""Batches by count, and with a flush timeout over a slow source (read ahead in a thread)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.deblur.batching import batched


def slow(count: int, pause_after: dict[int, float]) -> Iterator[int]:
    for i in range(count):
        yield i
        time.sleep(pause_after.get(i, 0.0))


def test_by_count_batches_depend_only_on_order() -> None:
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched(slow(7, {1: 0.2}), 3)) == [[0, 1, 2], [3, 4, 5], [6]]  # a slow source changes nothing
    assert list(batched([], 3)) == []
    with pytest.raises(ValueError, match="batch size"):
        list(batched(range(3), 0))


def test_a_flush_timeout_sends_what_has_waited() -> None:
    # Items 0-2 come at once, then the source stalls for 0.6 s: with a 0.15 s flush the first batch
    # goes out with 3 items instead of waiting for the 4th.
    sent = list(batched(slow(10, {2: 0.6}), 4, flush_s=0.15))
    assert sent[0] == [0, 1, 2]  # without the flush it would have waited for 3
    assert [i for b in sent for i in b] == list(range(10))  # nothing lost, nothing doubled, in order
    assert all(len(b) <= 4 for b in sent)
    assert list(batched(range(9), 4, flush_s=5.0)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]  # a fast source: full


def test_a_failing_source_delivers_what_came_before_then_raises() -> None:
    def broken() -> Iterator[int]:
        yield from range(5)
        raise OSError("stream broke")

    got: list[int] = []
    with pytest.raises(OSError, match="stream broke"):
        for batch in batched(broken(), 3, flush_s=1.0):
            got += batch
    assert got == [0, 1, 2, 3, 4]


def test_a_consumer_that_stops_early_stops_the_reader() -> None:
    before = threading.active_count()
    batches = batched(slow(1000, {}), 2, flush_s=0.5)
    assert next(batches) == [0, 1]
    batches.close()
    assert threading.active_count() == before
