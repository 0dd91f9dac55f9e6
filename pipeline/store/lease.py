"""One run writes an output folder at a time (deblur, ingest, synth): a lease in `OUT/_lock/`.

A run takes generation g by creating `_lock/<g>.json` create-only (`Store.create`: O_EXCL locally,
If-None-Match on S3), so of several runs that try at once exactly one wins. The holder refreshes
`_lock/<g>.beat` while it runs. A later run refuses while the newest generation's holder is alive; it
takes over (creating g + 1, create-only again, so again only one wins) when the holder is gone: a
process on this host that no longer exists, a heartbeat older than `stale_after_s` (clocks of the
machines assumed to agree within that), or `take_over=True` from a user who knows it died. A holder
that finds a newer generation has lost the output and must stop (`LockLost`); so must the processes
that write for it, which check its `Fence` before each commit. Whatever it committed is whole
(commits are atomic) and the same bytes its successor writes.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from functools import partial

from adarevd.errors import UserError
from pipeline.store.processes import alive
from pipeline.store.storage import StorageError, Store, redact

LOCK_DIR = "_lock"
UNFINISHED = f"{LOCK_DIR}/unfinished"  # a deblur's mark on its output from its lease until it finishes
PART_GRACE_S = 10.0  # partial files younger than this are not an earlier run's
BEAT_RETRY_S = 5.0  # how long one heartbeat retries a store that does not answer
_HELD: set[str] = set()  # run ids holding a lease in this process


def new_run_id(kind: str = "") -> str:
    """A run's id, the lease's holder and the stamp on what it writes: 12 hex digits, after `kind-`."""
    return f"{kind}-{uuid.uuid4().hex[:12]}" if kind else uuid.uuid4().hex[:12]


class OutputLocked(UserError, RuntimeError):
    """Another run holds the output; the message says which, since when, and what to do."""


class LockLost(UserError, RuntimeError):
    """Another run took this output over while this one was still running."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    started: float  # Unix time

    def describe(self, beat: float, now: float) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return (
            f"run {self.run_id} (host {self.host}, pid {self.pid}, started {when}, "
            f"last heartbeat {now - beat:.0f} s ago)"
        )


class OutputLock:
    """The lease of one run on `store` (the output folder)."""

    def __init__(
        self, store: Store, run_id: str, *, stale_after_s: float = 120.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.store, self.run_id, self.stale_after_s, self.clock = store, run_id, stale_after_s, clock
        self.generation = 0
        self.lost: str | None = None  # set by the heartbeat thread when another run took over
        self.took_over: str | None = None  # whom this run replaced, and why
        self.swept = (0, 0)  # partial files (count, bytes) that runs which died or failed left behind

    def acquire(self, take_over: bool = False) -> None:
        newest = _generations(self.store)[-1:] or [0]
        current = newest[0]
        if current:
            held = _read(self.store, current)
            if held is not None:
                holder, beat = held
                now = self.clock()
                why_free = self._gone(holder, beat, now)
                if why_free or take_over:
                    self.took_over = f"{holder.describe(beat, now)}: {why_free or '--take-over'}"
                else:
                    raise OutputLocked(
                        f"{redact(self.store.url)} is being written by {holder.describe(beat, now)}. Wait for it "
                        f"to finish; if it died, re-run after {self.stale_after_s:.0f} s without a heartbeat, or now "
                        f"with --take-over."
                    )
        self._sweep()
        me = Holder(self.run_id, socket.gethostname(), os.getpid(), self.clock())
        data = json.dumps(asdict(me), sort_keys=True).encode()
        # Marked held before the lease exists: another thread of this process that reads the lease
        # at once must not take it for an ended run of ours.
        _HELD.add(self.run_id)
        try:
            self.store.create(_name(current + 1, "json"), data)
        except FileExistsError:
            raced = _read(self.store, current + 1)
            if raced is None or raced[0].run_id != self.run_id:  # (ours: a retried create that had landed)
                _HELD.discard(self.run_id)
                who = raced[0].describe(raced[1], self.clock()) if raced else "another run"
                raise OutputLocked(f"{redact(self.store.url)}: {who} took this output at the same moment") from None
        except BaseException:
            _HELD.discard(self.run_id)
            raise
        self.generation = current + 1
        try:
            self.beat()
        except LockLost as e:  # taken over between our create and our first beat
            self.release()
            raise OutputLocked(str(e)) from None

    def _sweep(self) -> None:
        """Remove the partial files of earlier runs (none is alive to finish them: this run is about to
        take the lease). They keep a full disk full. Files written in the last `PART_GRACE_S` stay: a run
        that takes the lease at this moment may be writing them (object stores stamp whole seconds)."""
        with suppress(OSError, StorageError):  # (a run that cannot sweep can still run)
            self.swept = self.store.retrying_at_most(BEAT_RETRY_S).sweep_parts(time.time() - PART_GRACE_S)

    def beat(self, retry_s: float | None = None) -> None:
        """Refresh the heartbeat; raise LockLost if the lease was taken over or is gone (`still_held`)."""
        store = self._store(retry_s)
        still_held(store, self.generation, self.clock)
        store.commit_bytes(_name(self.generation, "beat"), json.dumps({"time": self.clock()}).encode())

    @contextmanager
    def heartbeat(self, every_s: float | None = None) -> Iterator[None]:
        """Beat in a background thread while the block runs; `lost` says why if the lease went."""
        stop = threading.Event()
        interval = every_s or self.stale_after_s / 4

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    # A few seconds of retries, not the whole --storage-retry window: the next beat comes
                    # anyway, and a run that fails waits for the beat in flight before it releases.
                    self.beat(retry_s=BEAT_RETRY_S)
                except LockLost as e:
                    self.lost = str(e)
                    return
                except (OSError, StorageError):
                    continue  # the store is unreachable for a while: the next beat tries again

        thread = threading.Thread(target=loop, name="adarevd-lock-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def check(self) -> None:
        """Raise LockLost if the heartbeat found that another run took the output over."""
        if self.lost:
            raise LockLost(self.lost)

    def confirm(self) -> None:
        """Raise LockLost unless this run still holds the lease, asking the store now (not the last
        heartbeat): before a run commits what names its whole output (an index, `_run.json`)."""
        self.check()
        self.beat()

    def mark_unfinished(self) -> None:
        """Write `UNFINISHED` (a deblur, before it writes its first shard): it stays where the run
        fails, stops or dies, marking the output as a deblur output (`refuse_foreign`), and `held`
        removes it once the run finished."""
        self.store.commit_bytes(UNFINISHED, json.dumps({"run_id": self.run_id}).encode())

    @contextmanager
    def held(self, take_over: bool = False) -> Iterator[OutputLock]:
        """Hold the lease for the block: acquire it, beat while the block runs, then (the heartbeat
        stopped, so nothing writes there any more) remove the temporary folder, the mark and the
        lease, leaving no `_lock/` folder. A block that fails releases with one try (the failure may
        be the store's), removes the temporary folder unless the store failed or the lease was lost,
        and keeps the mark."""
        self.acquire(take_over=take_over)
        try:
            with self.heartbeat():
                yield self
        except BaseException as e:
            if not isinstance(e, (StorageError, LockLost)):  # (the new holder's writes may be under way)
                self.store.remove_tmp_folder()  # a refused run wrote only its heartbeat there
            self.release(retry_s=0, remove_folder=True)
            raise
        self.store.remove_tmp_folder()
        with suppress(FileNotFoundError):  # (also an earlier run's, that died with nothing left to do)
            self.store.remove(UNFINISHED)
        self.release(remove_folder=True)

    def release(self, retry_s: float | None = None, remove_folder: bool = False) -> None:
        """Remove this run's generation and the older ones it replaced (not a newer one). Best effort:
        with the store gone, the lease stays and the next run takes it over (its holder is dead).
        `retry_s=0` (after a failure, which may be the store's): one try, no retry window.
        `remove_folder`: and `_lock/` itself where it is then empty (folders on local disks, SeaweedFS)."""
        if not self.generation:
            return
        _HELD.discard(self.run_id)
        store = self._store(retry_s)
        try:
            for g in _generations(store):
                if g <= self.generation:
                    for suffix in ("beat", "json"):
                        with suppress(FileNotFoundError):
                            store.remove(_name(g, suffix))
            if remove_folder:
                store.remove_empty_folder(LOCK_DIR)
        except (OSError, StorageError):
            pass
        self.generation = 0

    def fence(self) -> Fence:
        """What a process that writes for this run (a shard worker) checks before each commit."""
        return Fence(self.generation)

    def fenced(self, store: Store) -> Callable[[], None]:
        """The check before a commit to `store` in this process (a `ShardSink`'s `before_commit`)."""
        return partial(self.fence().check, store)

    def _gone(self, holder: Holder, beat: float, now: float) -> str:
        if holder.host == socket.gethostname() and not alive(holder.pid):
            return "its process is gone"
        if holder.host == socket.gethostname() and holder.pid == os.getpid() and holder.run_id not in _HELD:
            return "it was a run of this process that has ended"
        if now - beat > self.stale_after_s:
            return "its heartbeat stopped"
        return ""

    def _store(self, retry_s: float | None) -> Store:
        """The output store, retrying one that does not answer for at most `retry_s` (None: its own)."""
        if retry_s is None:
            return self.store
        return self.store.retrying_at_most(retry_s)


@dataclass(frozen=True)
class Fence:
    """A run's generation, for the processes that write its output (shard workers, on any node): each
    checks it right before a commit, so that a run taken over commits nothing more, not only once its
    next heartbeat (up to a quarter of the stale time later) tells its driver."""

    generation: int

    def check(self, store: Store) -> None:
        """Raise LockLost unless the run still holds `store` (the output): `still_held`."""
        still_held(store, self.generation)

    def seen(self, store: Store) -> bool:
        """Whether `store` shows this run's lease or a newer one: False where it is not the folder the
        driver writes (a local path on a node that does not mount that filesystem)."""
        return any(g >= self.generation for g in _generations(store))


def still_held(store: Store, generation: int, clock: Callable[[], float] = time.time) -> None:
    """Raise LockLost if `store` has a newer generation than `generation` (naming its holder), or no
    longer has `generation` (released: the run ended or was stopped, or `_lock/` was removed)."""
    generations = _generations(store)
    newer = [g for g in generations if g > generation]
    if newer:
        held = _read(store, newer[-1])
        who = held[0].describe(held[1], clock()) if held else "another run"
        raise LockLost(f"{redact(store.url)} was taken over by {who}; this run stops")
    if generation not in generations:
        raise LockLost(
            f"{redact(store.url_of(_name(generation, 'json')))}: this run's lease is gone (the run "
            "ended or was stopped, or its lease was removed); this run stops"
        )


def _generations(store: Store) -> list[int]:
    names = store.glob(f"{LOCK_DIR}/*.json")
    stems = [posixpath.basename(name)[: -len(".json")] for name in names]
    return sorted(int(stem) for stem in stems if stem.isdigit())


def _read(store: Store, generation: int) -> tuple[Holder, float] | None:
    name = _name(generation, "json")
    try:
        holder = Holder(**json.loads(store.read_bytes(name)))
        try:
            beat = float(json.loads(store.read_bytes(_name(generation, "beat")))["time"])
        except FileNotFoundError:
            beat = holder.started
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:  # not written by us: say so instead of guessing
        raise OutputLocked(
            f"{redact(store.url_of(name))}: an unreadable lease ({e}); if no run is "
            f"writing this output, remove {LOCK_DIR}/ and re-run"
        ) from None
    return holder, beat


def _name(generation: int, suffix: str) -> str:
    return f"{LOCK_DIR}/{generation:08d}.{suffix}"
