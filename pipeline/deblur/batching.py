"""Frames into batches for the restorers: by count, or by count with a flush timeout.

By count alone a batch holds exactly `size` items (the last one fewer), so batch composition depends
only on the input order and a re-run gives the same bytes. With `flush_s`, items are read ahead in a
thread (a bounded queue of 2 x size) and a batch also goes out when its first item has waited
`flush_s` seconds: a slow source (a store with high latency, a shard that trickles in) no longer holds
frames back until a batch is full. The price: batch composition then depends on timing, and pooled
float results can differ in the last bit between runs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def batched(items: Iterable[T], size: int, flush_s: float = 0.0) -> Iterator[list[T]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    if flush_s <= 0:
        yield from _by_count(items, size)
    else:
        yield from _with_timeout(items, size, flush_s)


def _by_count(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _with_timeout(items: Iterable[T], size: int, flush_s: float) -> Iterator[list[T]]:
    ahead: queue.Queue[object] = queue.Queue(maxsize=2 * size)
    stop = threading.Event()

    def put(thing: object) -> bool:
        while not stop.is_set():
            try:
                ahead.put(thing, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failure(e))
            return
        put(_END)

    reader = threading.Thread(target=read, name="adarevd-read-ahead", daemon=True)
    reader.start()
    try:
        done = False
        while not done:
            first = ahead.get()
            if first is _END:
                return
            if isinstance(first, _Failure):
                raise first.error
            batch = [first]
            deadline = time.monotonic() + flush_s
            while len(batch) < size:
                try:
                    item = ahead.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break  # flush: the first frame has waited long enough
                if item is _END:
                    done = True
                    break
                if isinstance(item, _Failure):
                    yield batch  # what came before the failure still goes out, then the failure
                    raise item.error
                batch.append(item)  # type: ignore[arg-type]
            yield batch  # type: ignore[misc]
    finally:
        stop.set()
        reader.join()
