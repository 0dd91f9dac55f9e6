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
from functools import partial
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, OwnerDiedError, RayActorError

from pipeline.cluster.waits import OnWait, batch_label, patient_get
from pipeline.deblur.depth_pools import EncodedBatch, ExitMix, assign
from pipeline.deblur.job import start_failure
from pipeline.formats.frames import FrameIn, FrameOut, Rejected

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
    restorer_names: list[str] = field(default_factory=list)  # for stall reports
    encoder_names: list[str] = field(default_factory=list)

    def local_restorers(self, node: str) -> list[int]:
        """Indices of the pool actors on `node`, or of all of them if it has none."""
        here = [i for i, n in enumerate(self.restorer_nodes) if n == node]
        return here or list(range(len(self.restorers)))

    def restorer_name(self, i: int) -> str:
        return self.restorer_names[i] if i < len(self.restorer_names) else f"restorer actor {i}"

    def encoder_name(self, i: int) -> str:
        return self.encoder_names[i] if i < len(self.encoder_names) else f"encoder actor {i}"


@dataclass
class _Flight:
    batch: list[FrameIn]
    attempt: int = 0
    encoder: int = 0
    frames: Any = None  # ObjectRef of the batch: sent to the encoder twice, stored once
    encoded: list[Any] = field(default_factory=list)  # [EncodedBatch ref, group 1 ref, ..., group N ref]
    result: Any = None  # ref of the finished batch, once routed
    decoding: list[tuple[int, int, Any]] = field(default_factory=list)  # (depth, pool actor, ref) once routed
    fallback: str | None = None  # why the batch went the fused way, once it has
    observed: bool = False  # its exit depths are in the mix (a re-encoded batch is not counted again)

    def label(self) -> str:
        return batch_label([f.key for f in self.batch])


@dataclass(frozen=True, kw_only=True)
class Watch:
    """Who hears how a shard's batches fare: `progress` (the run's ProgressActor) each new pool plan,
    `on_wait` what an answer slower than `patience` seconds is waited on."""

    progress: Any = None
    on_wait: OnWait | None = None
    patience: float = 10.0


class DepthPoolRouter:
    """A RestoreFn over depth pools: `window` batches in flight, results in order, a batch whose actor
    or object is lost redone from the encoder up to `retries` times."""

    def __init__(self, pools: Pools, start: int, watch: Watch = Watch(), window: int = 3, retries: int = 3) -> None:
        self.pools, self.watch, self.window, self.retries = pools, watch, window, retries
        self.mix = ExitMix(pools.exit_table, pools.num_columns)
        self.turns: dict[tuple[str, int], int] = defaultdict(int)  # (node, depth) -> next actor of that pool
        self.encoder_turn = start
        self.last_plan: list[int] | None = None

    def __call__(self, batches: Iterable[list[FrameIn]]) -> Iterator[list[FrameOut | Rejected]]:
        pending: deque[_Flight] = deque()
        for batch in batches:
            flight = _Flight(batch)
            self._launch(flight)
            pending.append(flight)
            for waiting in pending:  # route every batch whose encoder has answered, without blocking
                if waiting.result is None and ray.wait([waiting.encoded[0]], timeout=0)[0]:
                    with contextlib.suppress(ray.exceptions.RayError):  # _resolve() redoes it and handles it
                        self._route(waiting)
            while len(pending) >= self.window:
                yield self._resolve(pending.popleft())
        while pending:
            yield self._resolve(pending.popleft())

    def _launch(self, flight: _Flight) -> None:
        pools = self.pools
        flight.encoder = self.encoder_turn % len(pools.encoders)
        self.encoder_turn += 1
        flight.frames = ray.put(flight.batch)
        actor = pools.encoders[flight.encoder]
        flight.encoded = actor.encode_by_depth.options(num_returns=pools.num_columns + 1).remote(flight.frames)
        flight.result, flight.decoding, flight.fallback = None, [], None

    def _encoding(self, flight: _Flight) -> str:
        return f"{self.pools.encoder_name(flight.encoder)} to encode batch {flight.label()}"

    def _waited_on(self, flight: _Flight) -> str:
        """What a routed batch is still waiting for: a depth pool's actor, or the encoder's stitch."""
        for depth, actor, ref in flight.decoding:
            if not ray.wait([ref], timeout=0)[0]:
                return f"depth-{depth} pool actor {self.pools.restorer_name(actor)} for batch {flight.label()}"
        return f"{self.pools.encoder_name(flight.encoder)} to stitch batch {flight.label()}"

    def _route(self, flight: _Flight) -> None:
        pools, watch = self.pools, self.watch
        encoded: EncodedBatch = patient_get(
            flight.encoded[0], partial(self._encoding, flight), watch.on_wait, watch.patience
        )
        if not flight.observed:
            self.mix.observe(encoded)
            flight.observed = True
        node = pools.encoder_nodes[flight.encoder]
        local = pools.local_restorers(node)
        sizes = self.mix.sizes(len(local))
        if watch.progress is not None and sizes != self.last_plan:
            self.last_plan = sizes
            watch.progress.plan.remote(sizes)
        members = assign(sizes, len(local))
        flight.decoding = []
        for depth in encoded.depths_present():
            pool = members[depth - 1]
            actor = local[pool[self.turns[node, depth] % len(pool)]]
            self.turns[node, depth] += 1
            flight.decoding.append((depth, actor, pools.restorers[actor].decode_depth.remote(flight.encoded[depth])))
        encoder = pools.encoders[flight.encoder]
        residuals = [ref for _, _, ref in flight.decoding]
        flight.result = encoder.finish_routed.remote(flight.frames, flight.encoded[0], *residuals)

    def _resolve(self, flight: _Flight) -> list[FrameOut | Rejected]:
        while True:
            try:
                if flight.result is None:
                    self._route(flight)
                waited_on = partial(self._waited_on, flight)
                results = patient_get(flight.result, waited_on, self.watch.on_wait, self.watch.patience)
                if flight.fallback is None:
                    return results
                note = f"decoded on the fused path: {flight.fallback}"
                return [replace(r, notes=(*r.notes, note)) if isinstance(r, FrameOut) else r for r in results]
            except LOST as e:
                if (failed := start_failure(e, restarted=True)) is not None:
                    raise failed from None  # Ray will not restart it again: stop, say why
                if flight.attempt >= self.retries:
                    raise
                flight.attempt += 1
                self._launch(flight)
            except ray.exceptions.RayTaskError as e:
                if flight.fallback is not None:
                    raise
                # A call failed inside (e.g. a pooled group ran out of memory): the fused path
                # decodes frame by frame and rejects only what fails.
                flight.fallback = f"{type(e.cause).__name__}: {e.cause}"[:300]
                flight.decoding = []
                flight.result = self.pools.encoders[flight.encoder].restore.remote(flight.batch)
