"""The depth-pools layout on Ray: a shard worker's batches go encoder -> depth pools -> encoder.

For each batch: an encoder actor encodes and classifies its frames and returns N + 1 objects (the
small `EncodedBatch` and one `DepthGroup` of features per depth); the router reads only the small one,
sends each non-empty depth's group (by reference: the features go from the object store to the pool
actor, never through this process) to an actor of that depth's pool, and asks the same encoder actor
to stitch and encode the frames from the residuals. Routing is node-local: a batch encoded on a node
is decoded by that node's pool actors when it has any. Pool sizes come from `ExitMix` (the exit
table's prior and the frames just seen), recomputed for every batch.

Torch-free (shard workers import it). Faults: a dead actor or a lost object redoes the batch from the
encoder (the bytes depend only on the batch, so a redo gives the same ones); an error inside a call
(a patch group that cannot be decoded) falls back to the fused path on an encoder actor, which
rejects only the frames that fail.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, OwnerDiedError, RayActorError

from pipeline.depth_pools import EncodedBatch, ExitMix, assign
from pipeline.frames import FrameIn, FrameOut, Rejected
from pipeline.shard_job import RestoreFn

LOST = (RayActorError, ActorDiedError, ActorUnavailableError, ObjectLostError, OwnerDiedError)


@dataclass(frozen=True)
class Pools:
    """The actors of a run. Fused: `restorers` do everything and `encoders` is empty. Depth pools:
    `encoders` encode, classify and stitch; `restorers` are the depth pools' actors (any of them can
    run any depth: re-balancing moves no weights). Nodes are the actors' node ids, in order."""

    restorers: list[Any]
    restorer_nodes: list[str] = field(default_factory=list)
    encoders: list[Any] = field(default_factory=list)
    encoder_nodes: list[str] = field(default_factory=list)
    num_columns: int = 0
    exit_table: tuple[int, ...] = ()

    def local_restorers(self, node: str) -> list[Any]:
        """Pool actors on `node`, or all of them if it has none."""
        here = [a for a, n in zip(self.restorers, self.restorer_nodes, strict=True) if n == node]
        return here or list(self.restorers)


@dataclass
class _Flight:
    batch: list[FrameIn]
    attempt: int = 0
    encoder: int = 0
    frames: Any = None  # ObjectRef of the batch: sent to the encoder twice, stored once
    encoded: list[Any] = field(default_factory=list)  # [EncodedBatch ref, group 1 ref, ..., group N ref]
    result: Any = None  # ref of the finished batch, once routed
    fallback: str | None = None  # why the batch went the fused way, once it has


def depth_pool_restore(pools: Pools, start: int, window: int = 3, retries: int = 3, progress: Any = None) -> RestoreFn:
    """A RestoreFn over depth pools: `window` batches in flight, results in order. `progress` (the
    run's ProgressActor) is told each new pool plan."""
    mix = ExitMix(pools.exit_table, pools.num_columns)
    turns: dict[tuple[str, int], int] = defaultdict(int)  # (node, depth) -> next actor of that pool
    encoder_turn = start
    last_plan: list[int] | None = None

    def launch(flight: _Flight) -> None:
        nonlocal encoder_turn
        flight.encoder = encoder_turn % len(pools.encoders)
        encoder_turn += 1
        flight.frames = ray.put(flight.batch)
        actor = pools.encoders[flight.encoder]
        flight.encoded = actor.encode_by_depth.options(num_returns=pools.num_columns + 1).remote(flight.frames)
        flight.result = None

    def route(flight: _Flight) -> None:
        nonlocal last_plan
        encoded: EncodedBatch = ray.get(flight.encoded[0])
        mix.observe(encoded)
        node = pools.encoder_nodes[flight.encoder]
        local = pools.local_restorers(node)
        sizes = mix.sizes(len(local))
        if progress is not None and sizes != last_plan:
            last_plan = sizes
            progress.plan.remote(sizes)
        members = assign(sizes, len(local))
        residuals = []
        for depth in encoded.depths_present():
            pool = members[depth - 1]
            actor = local[pool[turns[node, depth] % len(pool)]]
            turns[node, depth] += 1
            residuals.append(actor.decode_depth.remote(flight.encoded[depth]))
        encoder = pools.encoders[flight.encoder]
        flight.result = encoder.finish_routed.remote(flight.frames, flight.encoded[0], *residuals)

    def ready(flight: _Flight) -> bool:
        return bool(ray.wait([flight.encoded[0]], timeout=0)[0])

    def resolve(flight: _Flight) -> list[FrameOut | Rejected]:
        while True:
            try:
                if flight.result is None:
                    route(flight)
                results = ray.get(flight.result)
                if flight.fallback is None:
                    return results
                note = f"decoded on the fused path: {flight.fallback}"
                return [replace(r, notes=(*r.notes, note)) if isinstance(r, FrameOut) else r for r in results]
            except LOST:
                if flight.attempt >= retries:
                    raise
                flight.attempt += 1
                launch(flight)
            except ray.exceptions.RayTaskError as e:
                if flight.fallback is not None:
                    raise
                # A call failed inside (e.g. a pooled group ran out of memory): the fused path
                # decodes frame by frame and rejects only what fails.
                flight.fallback = f"{type(e.cause).__name__}: {e.cause}"[:300]
                flight.result = pools.encoders[flight.encoder].restore.remote(flight.batch)

    def run(batches: Iterable[list[FrameIn]]) -> Iterator[list[FrameOut | Rejected]]:
        pending: deque[_Flight] = deque()
        for batch in batches:
            flight = _Flight(batch)
            launch(flight)
            pending.append(flight)
            for waiting in pending:  # route every batch whose encoder has answered, without blocking
                if waiting.result is None and ready(waiting):
                    with contextlib.suppress(ray.exceptions.RayError):  # resolve() redoes it and handles it
                        route(waiting)
            while len(pending) >= window:
                yield resolve(pending.popleft())
        while pending:
            yield resolve(pending.popleft())

    return run
