"""`adarevd deblur` on Ray: input shards -> deblurred shards + manifests + `_run.json`.

Ray lives here and nowhere else in `pipeline/`. The driver lists the input shards, skips those whose
manifest is committed (resume), starts the restorer actors (the model, once per actor) and runs one
lightweight task per shard (`process_shard`, bounded in number) that streams its shard, sends batches
of frames to the actors and writes its output. Shard tasks ask for no CPU, so however the actors fill
a node, reads and writes still run: no starvation deadlock on a 2-CPU node. A stall (no frame
finished for `stall_timeout_s`) stops the run with a report of what is waiting on what.

Faults: a restorer actor that dies is restarted by Ray and the call retried (`max_task_retries`); if
that fails too the shard task sends the batch to another actor. A shard task that dies is re-run by
Ray from the start of its shard; its output is committed whole, so nothing is written twice.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import adarevd
from adarevd import AdaRevD, AdaRevDConfig, load_weights
from pipeline.frames import FrameIn, Rejected
from pipeline.restorer import FrameOut, FrameRestorer, RestoreOptions
from pipeline.shard_job import ShardReport, add_histogram, is_done, process_shard
from pipeline.storage import Store, redact

RUN_FILE = "_run.json"


class StallError(RuntimeError):
    """No progress for too long; the message says what is waiting on what."""


@dataclass(frozen=True)
class Resources:
    workers: int = 0  # restorer actors; 0 = as many as fit the cluster's CPUs (or GPUs)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    shards_in_flight: int = 0  # 0 = workers + 1
    worker_resource: str | None = None  # a custom node resource the actors need (1 each): pins them to nodes

    def resolve(self, cluster: Mapping[str, float]) -> Resources:
        workers = self.workers
        if not workers:
            limits = [int(cluster.get("CPU", 1) // self.cpus_per_worker) if self.cpus_per_worker else 1]
            if self.gpus_per_worker:
                limits.append(int(cluster.get("GPU", 0) // self.gpus_per_worker))
            if self.worker_resource:
                limits.append(int(cluster.get(self.worker_resource, 0)))
            workers = max(1, min(limits))
        return Resources(
            workers,
            self.cpus_per_worker,
            self.gpus_per_worker,
            self.shards_in_flight or workers + 1,
            self.worker_resource,
        )


@dataclass(frozen=True)
class DeblurJob:
    input_url: str
    output_url: str
    restore: RestoreOptions = field(default_factory=RestoreOptions)
    resources: Resources = field(default_factory=Resources)
    frames_per_batch: int = 8
    image_member: str | None = None
    max_frames: int | None = None
    stall_timeout_s: float = 600.0


@dataclass
class RunSummary:
    shards_total: int = 0
    shards_skipped: int = 0  # already done (resume)
    reports: list[ShardReport] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 0
    worker_nodes: dict[str, int] = field(default_factory=dict)  # node id -> restorer actors placed there

    @property
    def frames(self) -> int:
        return sum(r.frames for r in self.reports)

    @property
    def quarantined(self) -> int:
        return sum(r.quarantined for r in self.reports)

    @property
    def histogram(self) -> list[int]:
        total: list[int] = []
        for r in self.reports:
            add_histogram(total, r.histogram)
        return total

    @property
    def shard_errors(self) -> list[str]:
        return [e for r in self.reports for e in r.errors]


@ray.remote
class RestorerActor:
    """A FrameRestorer in a Ray actor: the model is built once, then batches come and go."""

    def __init__(self, config: AdaRevDConfig, weights: tuple[str, ...] | list[Any], options: RestoreOptions) -> None:
        # `weights`: files every node can read (on one machine: the driver's own files), or [ObjectRef]
        # of the state dict, which Ray does not resolve for us: a restarted actor fetches it again.
        model = AdaRevD(config)
        if isinstance(weights, tuple):
            load_weights(model, *weights)
        else:
            model.load_state_dict(ray.get(weights[0]), strict=True)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.restorer = FrameRestorer(model, options, device)

    def restore(self, frames: list[FrameIn]) -> list[FrameOut | Rejected]:
        return self.restorer(frames)

    def node(self) -> str:
        """The id of the node this actor runs on (also: it has started)."""
        return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
class ProgressActor:
    """Counts finished frames per shard so the driver can draw a bar and spot a stall."""

    def __init__(self) -> None:
        self.frames: dict[str, int] = {}

    def add(self, shard: str, frames: int) -> None:
        self.frames[shard] = self.frames.get(shard, 0) + frames

    def snapshot(self) -> dict[str, int]:
        return dict(self.frames)


def actor_restore(actors: Sequence[Any], start: int, window: int, retries: int = 3) -> Callable:
    """A RestoreFn over Ray actors: `window` batches in flight, results in order, a dead actor's batch
    resent to the next actor."""

    def run(batches: Iterable[list[FrameIn]]) -> Iterator[list[FrameOut | Rejected]]:
        pending: deque[tuple[Any, list[FrameIn], int]] = deque()
        turn = start

        def submit(batch: list[FrameIn], attempt: int) -> tuple[Any, list[FrameIn], int]:
            nonlocal turn
            actor = actors[turn % len(actors)]
            turn += 1
            return actor.restore.remote(batch), batch, attempt

        def resolve(item: tuple[Any, list[FrameIn], int]) -> list[FrameOut | Rejected]:
            ref, batch, attempt = item
            while True:
                try:
                    return ray.get(ref)
                except (RayActorError, ActorDiedError, ActorUnavailableError):
                    if attempt >= retries:
                        raise
                    ref, batch, attempt = submit(batch, attempt + 1)

        for batch in batches:
            pending.append(submit(batch, 0))
            if len(pending) >= window:
                yield resolve(pending.popleft())
        while pending:
            yield resolve(pending.popleft())

    return run


@ray.remote(num_cpus=0, max_retries=3)
def shard_task(
    shard: str,
    index: int,
    job: DeblurJob,
    options: Mapping[str, Any],
    actors: list[Any],
    fingerprint: str,
    progress: Any,
    max_frames: int | None,
) -> ShardReport:
    source, output = Store(job.input_url, options), Store(job.output_url, options)
    return process_shard(
        shard,
        source,
        output,
        actor_restore(actors, start=index, window=2),
        frames_per_batch=job.frames_per_batch,
        image_member=job.image_member,
        fingerprint=fingerprint,
        max_frames=max_frames,
        on_frames=lambda n: progress.add.remote(shard, n),
    )


def list_shards(source: Store) -> list[str]:
    shards = [name for name in source.glob("**/*.tar") if not name.startswith(("_", "."))]
    if not shards:
        raise FileNotFoundError(f"{redact(source.url)}: no .tar shards found; run `adarevd ingest` first")
    return shards


def ensure_ray(address: str | None, num_cpus: float | None = None) -> None:
    """Connect to a cluster (`auto`, `ray://...`, `HOST:PORT`) or start an embedded local Ray."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        # "local": always a fresh embedded instance, whatever RAY_ADDRESS says.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")


def run(
    job: DeblurJob,
    model: AdaRevD,
    *,
    weight_files: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
    on_progress: Callable[[int, dict[str, int]], None] | None = None,
) -> RunSummary:
    """Run the job on the connected Ray cluster (call `ensure_ray` first). `model` carries the loaded
    weights; `weight_files` (the files it was loaded from) let actors on a one-node cluster read them
    directly instead of through the object store."""
    config, fingerprint = model.config, adarevd.fingerprint(model)
    options = dict(options or {})
    start = time.perf_counter()
    source, output = Store(job.input_url, options), Store(job.output_url, options)
    shards = list_shards(source)
    todo = [s for s in shards if not is_done(output, s)]
    summary = RunSummary(shards_total=len(shards), shards_skipped=len(shards) - len(todo))
    resources = job.resources.resolve(ray.cluster_resources())
    summary.workers = resources.workers
    restore = job.restore
    if not restore.threads:
        restore = RestoreOptions(**{**asdict(restore), "threads": max(1, int(resources.cpus_per_worker))})
    weights: tuple[str, ...] | list[Any]
    if weight_files and len(ray.nodes()) == 1:
        weights = tuple(os.path.abspath(f) for f in weight_files)
    else:
        # Held by this driver for the whole run (Ray warns that a restarted actor needs it: it has it).
        weights = [ray.put(model.state_dict())]
    run_id = uuid.uuid4().hex[:8]
    actors = [
        RestorerActor.options(
            name=f"adarevd-restorer-{run_id}-{i}",
            num_cpus=resources.cpus_per_worker,
            num_gpus=resources.gpus_per_worker,
            resources={resources.worker_resource: 1} if resources.worker_resource else None,
            max_restarts=-1,
            max_task_retries=3,
        ).remote(config, weights, restore)
        for i in range(resources.workers)
    ]
    # The progress counter lives beside the driver: losing a worker node must not lose it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = ProgressActor.options(scheduling_strategy=here).remote()
    try:
        for node in _wait_ready(actors, resources, job.stall_timeout_s):
            summary.worker_nodes[node] = summary.worker_nodes.get(node, 0) + 1
        summary.reports = _drive(job, todo, options, actors, fingerprint, progress, resources, on_progress)
    finally:
        for actor in [*actors, progress]:
            ray.kill(actor)
    summary.seconds = time.perf_counter() - start
    output.commit_bytes(RUN_FILE, run_json(job, summary, fingerprint, config))
    output.remove_tmp_folder()
    return summary


def _wait_ready(actors: list[Any], resources: Resources, timeout: float) -> list[str]:
    try:
        return ray.get([a.node.remote() for a in actors], timeout=timeout)
    except GetTimeoutError:
        raise StallError(
            f"{len(actors)} restorer actor(s) asking for {resources.cpus_per_worker} CPU and "
            f"{resources.gpus_per_worker} GPU each did not start within {timeout:.0f} s; the cluster has "
            f"{ray.available_resources()} free of {ray.cluster_resources()}. Ask for fewer workers "
            f"(--workers) or less per worker (--cpus-per-worker, --gpus-per-worker)."
        ) from None


def _drive(
    job: DeblurJob,
    todo: list[str],
    options: Mapping[str, Any],
    actors: list[Any],
    fingerprint: str,
    progress: Any,
    resources: Resources,
    on_progress: Callable[[int, dict[str, int]], None] | None,
) -> list[ShardReport]:
    queue = deque(enumerate(todo))
    running: dict[Any, str] = {}
    reports: list[ShardReport] = []
    budget = job.max_frames
    # With a frame budget, shards run one at a time so the budget is exact.
    in_flight = 1 if budget is not None else resources.shards_in_flight
    last_total, last_change = -1, time.monotonic()
    while queue or running:
        while queue and len(running) < in_flight and (budget is None or budget > 0):
            index, shard = queue.popleft()
            ref = shard_task.remote(shard, index, job, options, actors, fingerprint, progress, budget)
            running[ref] = shard
        if not running:
            break
        done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        for ref in done:
            report = ray.get(ref)
            running.pop(ref)
            reports.append(report)
            if budget is not None:
                budget -= report.frames + report.quarantined
        counts = ray.get(progress.snapshot.remote())
        total = sum(counts.values())
        if on_progress:
            on_progress(total, counts)
        if total != last_total or done:
            last_total, last_change = total, time.monotonic()
        elif time.monotonic() - last_change > job.stall_timeout_s:
            raise StallError(_stall_report(running, counts, job.stall_timeout_s))
    return sorted(reports, key=lambda r: r.shard)


def _stall_report(running: Mapping[Any, str], counts: Mapping[str, int], timeout: float) -> str:
    lines = [f"no frame finished for {timeout:.0f} s. Waiting:"]
    for shard in running.values():
        lines.append(f"  shard {shard}: {counts.get(shard, 0)} frames done, waiting on restorer actors")
    lines.append(f"  cluster resources free: {ray.available_resources()} of {ray.cluster_resources()}")
    return "\n".join(lines)


def run_json(job: DeblurJob, summary: RunSummary, fingerprint: str, config: AdaRevDConfig) -> bytes:
    frames = summary.frames
    histogram = summary.histogram
    patches = sum(histogram)
    mean_depth = sum(d * n for d, n in enumerate(histogram)) / patches if patches else 0.0
    record = {
        "input": redact(job.input_url),
        "output": redact(job.output_url),
        "model": {"fingerprint": fingerprint, "config": json.loads(config.to_json())},
        "options": {
            "restore": asdict(job.restore),
            "resources": asdict(job.resources),
            "frames_per_batch": job.frames_per_batch,
            "image_member": job.image_member,
            "max_frames": job.max_frames,
        },
        "workers": summary.workers,
        "worker_nodes": summary.worker_nodes,
        "shards": {
            "total": summary.shards_total,
            "skipped_done": summary.shards_skipped,
            "processed": len(summary.reports),
        },
        "frames": frames,
        "quarantined": summary.quarantined,
        "shard_errors": summary.shard_errors,
        "seconds": round(summary.seconds, 3),
        "frames_per_second": round(frames / summary.seconds, 4) if summary.seconds else None,
        "exit_histogram": histogram,
        "mean_depth": round(mean_depth, 4),
        "compute_saved": round(1 - mean_depth / config.num_columns, 4) if patches else None,
    }
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
