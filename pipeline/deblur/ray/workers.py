"""The Ray side of one shard: the worker that runs `process_shard` and the pieces it talks to.

Nothing here imports torch: shard workers only read, decode, write and wait on the restorer actors,
so each costs tens of MB, not a model runtime's hundreds.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import ray
import tenacity
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from pipeline.cluster.node_view import Place, check_sees
from pipeline.cluster.this_node import this_node
from pipeline.cluster.waits import batch_label, patient_get
from pipeline.deblur.job import DeblurJob, start_failure
from pipeline.deblur.ray.router import DepthPoolRouter, Pools, Watch
from pipeline.deblur.shard import RestoreFn, ShardReport, ShardTask, add_histogram, process_shard
from pipeline.formats.frames import FrameIn, FrameOut, Rejected
from pipeline.store.lease import Fence
from pipeline.store.scratch import remove_orphans
from pipeline.store.storage import StorageError, is_transient


@ray.remote(num_cpus=0)
class ProgressActor:
    """Counts finished frames per shard and patches per exit depth, for the live bar and stall checks."""

    def __init__(self) -> None:
        self.frames: dict[str, int] = {}
        self.depths: list[int] = []
        self.plans: list[list[int]] = []  # depth-pools layout: each new plan (actors per depth 1..N)
        self.waits: dict[str, str] = {}  # shard -> what it has been waiting on for a while

    def add(self, shard: str, frames: int, histogram: list[int]) -> None:
        self.frames[shard] = self.frames.get(shard, 0) + frames
        add_histogram(self.depths, histogram)

    def plan(self, sizes: list[int]) -> None:
        if not self.plans or self.plans[-1] != sizes:
            self.plans.append(list(sizes))

    def snapshot(self) -> tuple[dict[str, int], list[int]]:
        return dict(self.frames), list(self.depths)

    def pool_plans(self) -> list[list[int]]:
        return [list(p) for p in self.plans]

    def wait(self, shard: str, what: str | None) -> None:
        if what is None:
            self.waits.pop(shard, None)
        else:
            self.waits[shard] = what

    def waiting(self) -> dict[str, str]:
        return dict(self.waits)


@dataclass
class _Call:
    """One batch on its way through a fused restorer actor."""

    ref: Any
    batch: list[FrameIn]
    attempt: int
    actor: int
    sent: float  # time.monotonic() when it was sent
    answered: bool = False  # its answer's time is in `_ANSWER_S`


# Per restorer actor (by index), this process's moving average of seconds from sending a batch to its
# answer: the actor's speed plus the queue in front of it, which the other shard workers' batches make.
_ANSWER_S: dict[int, float] = {}
ANSWER_WEIGHT = 0.3  # of the newest answer in the moving average


class FusedRouter:
    """A RestoreFn over the fused restorer actors: `window` batches in flight, results in order, a dead
    actor's batch resent to another actor (up to `retries` times); `watch` hears what a slow answer is
    waited on.

    Each batch goes to the actor that should answer first: the least (batches this router has in flight
    there + 1) x (its average time to answer). The average counts the queue at the actor, so a slow
    actor, or one the other shard workers keep busy, gets less work. An actor not yet heard from counts
    as 0 s (tried first); ties go in turn from actor `start`."""

    def __init__(self, pools: Pools, start: int, watch: Watch, window: int = 2, retries: int = 3) -> None:
        self.pools, self.watch, self.window, self.retries = pools, watch, window, retries
        self.turn = start
        self.pending: deque[_Call] = deque()

    def __call__(self, batches: Iterable[list[FrameIn]]) -> Iterator[list[FrameOut | Rejected]]:
        for batch in batches:
            self.pending.append(self._submit(batch, 0))
            if len(self.pending) >= self.window:
                yield self._resolve(self.pending.popleft())
        while self.pending:
            yield self._resolve(self.pending.popleft())

    def _submit(self, batch: list[FrameIn], attempt: int) -> _Call:
        actors = self.pools.restorers
        busy = Counter(call.actor for call in self.pending)
        index = choose_actor(len(actors), self.turn, busy, _ANSWER_S)
        self.turn += 1
        return _Call(actors[index].restore.remote(batch), batch, attempt, index, time.monotonic())

    def _heard(self, call: _Call) -> None:
        call.answered = True
        took = time.monotonic() - call.sent
        before = _ANSWER_S.get(call.actor)
        _ANSWER_S[call.actor] = took if before is None else before + ANSWER_WEIGHT * (took - before)

    def _time_answers(self, call: _Call) -> float:
        """Wait (at most the watch's patience) until `call` is answered, noting when each batch in flight
        is, in the order they come: results go back in order, but a fast actor's answer must not count
        the wait for a slow one before it. Returns the patience left."""
        deadline = time.monotonic() + self.watch.patience
        while not call.answered and (left := deadline - time.monotonic()) > 0:
            waiting = [c for c in (call, *self.pending) if not c.answered]
            ready, _ = ray.wait([c.ref for c in waiting], num_returns=1, timeout=left, fetch_local=False)
            for c in waiting:
                if c.ref in ready:
                    self._heard(c)
        return max(deadline - time.monotonic(), 0.0)

    def _waited_on(self, call: _Call) -> str:
        return f"{self.pools.restorer_name(call.actor)} for batch {batch_label([f.key for f in call.batch])}"

    def _resolve(self, call: _Call) -> list[FrameOut | Rejected]:
        while True:
            try:
                left = self._time_answers(call)
                return patient_get(call.ref, partial(self._waited_on, call), self.watch.on_wait, left)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                if (failed := start_failure(e, restarted=True)) is not None:
                    raise failed from None  # Ray will not restart it again: stop, say why
                if call.attempt >= self.retries:
                    raise
                # The actor restarts (model loading): send the batch elsewhere, and this actor less for now.
                _ANSWER_S[call.actor] = max(_ANSWER_S.values(), default=1.0) * 4 or 1.0
                call = self._submit(call.batch, call.attempt + 1)


def choose_actor(count: int, turn: int, busy: Mapping[int, int], answer_s: Mapping[int, float]) -> int:
    """The actor (0..count-1) that should answer a new batch first: the least (`busy[a]` batches in
    flight there + 1) x `answer_s[a]` (its average seconds to answer; unknown: 0, so it is tried).
    Ties go to the first in turn from `turn`."""
    in_turn = [(turn + k) % count for k in range(count)]
    return min(in_turn, key=lambda a: (busy.get(a, 0) + 1) * answer_s.get(a, 0.0))


def restore_fn(pools: Pools, index: int, watch: Watch) -> RestoreFn:
    """Shard `index`'s way to the actors. Fused: shard i starts at actor 2i, so that with >= workers/2
    shards in flight every actor has work. Depth pools: shard i starts at encoder i."""
    if pools.encoders:
        return DepthPoolRouter(pools, start=index, watch=watch)
    return FusedRouter(pools, start=2 * index, watch=watch)


@dataclass(frozen=True, kw_only=True)
class WorkerRun:
    """What every shard of a run needs on a shard worker besides its `ShardTask`."""

    job: DeblurJob
    options: Mapping[str, Any]
    pools: Pools
    progress: Any  # the run's ProgressActor
    fence: Fence  # checked before each commit


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class ShardWorker:
    """Runs shards one after another in one long-lived process. (A task per shard made Ray start and
    reap a worker process per shard: 0.5 s of CPU each, which capped 16 stand-in workers at 20% of
    their ideal on 2 cores.) A worker lost with its node is restarted and its call retried; the
    shard's output is committed whole, so a retry writes the same bytes once."""

    def __init__(self, driver: Place) -> None:
        # A worker killed mid-shard (this one's predecessor, after a restart) left its partial output.
        remove_orphans()
        self.driver = driver
        self.sees = False  # checked before this process's first shard (a restart may be on another node)

    def process(self, task: ShardTask, run: WorkerRun) -> ShardReport:
        source, output = run.job.stores(run.options)
        if not self.sees:
            check_sees(source, output, task.shard, run.fence, this_node(), self.driver)
            self.sees = True
        # Report a wait well before it would count as a stall.
        watch = Watch(
            progress=run.progress,
            on_wait=lambda what: run.progress.wait.remote(task.shard, what),
            patience=min(10.0, run.job.stall_timeout_s / 4),
        )

        def attempt() -> ShardReport:
            return process_shard(
                task,
                source,
                output,
                restore_fn(run.pools, task.index, watch),
                on_frames=lambda n, histogram: run.progress.add.remote(task.shard, n, histogram),
                before_commit=partial(run.fence.check, output),  # taken over: commit nothing more
            )

        # A store that drops the connection in the middle of a shard's stream: redo the shard (its
        # output is committed whole, so a redo writes nothing twice). Single operations retry on their
        # own: their StorageError means the store stayed down for the whole --storage-retry window.
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(
                lambda e: not isinstance(e, StorageError) and (is_transient(e) or is_transient(e.__cause__ or e))
            ),
            wait=tenacity.wait_exponential(multiplier=1, max=30),
            stop=tenacity.stop_after_attempt(3),
            reraise=True,
        )
        return retrying(attempt)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()
