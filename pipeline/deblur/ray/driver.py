"""`adarevd deblur` on Ray: input shards -> deblurred shards + manifests + `_run.json`.

Ray lives in `deblur/ray/` (here, `workers.py`, `router.py`), `cluster/` and `train/ray_train.py`,
nowhere else in `pipeline/` (tests/test_layout.py checks). The driver lists the input shards, skips
those whose manifest is committed (resume), starts the restorer actors (the model, once per actor;
with `routing="depth-pools"` also encoder actors) and a few shard workers (`workers.py`) that each
stream one shard at a time, send batches of frames to the actors and write the output. Shard workers
ask for no CPU, so however the restorers fill a node, reads and writes still run: no starvation
deadlock on 2 CPUs. A stall (no frame finished for `stall_timeout_s`) stops the run with a report of
what waits on what.

One run at a time writes an output: the driver holds its lease (`store/lease.py`) for the whole run.

Faults: a restorer actor that dies is restarted by Ray and the call retried (`max_task_retries`); if
that fails too the shard worker sends the batch to another actor. A shard worker that dies is
restarted and its shard redone from the start; its output is committed whole, so nothing is written
twice.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import adarevd
from adarevd import AdaRevD, AdaRevDConfig, load_weights
from adarevd.errors import UserError
from pipeline.cluster.address import probe, unreachable
from pipeline.cluster.this_node import this_node
from pipeline.deblur.depth_pools import DepthGroup, EncodedBatch
from pipeline.deblur.input_shards import Listing
from pipeline.deblur.job import (
    DeblurJob,
    DeviceError,
    Resources,
    RestoreOptions,
    StallError,
    start_failure,
)
from pipeline.deblur.ray.router import Pools
from pipeline.deblur.ray.workers import ProgressActor, ShardWorker, WorkerRun
from pipeline.deblur.restorer import FrameRestorer
from pipeline.deblur.resume import check_resume, refuse_foreign, space_short
from pipeline.deblur.run_record import RunSummary, output_totals, run_json
from pipeline.deblur.shard import RUN_FILE, ShardReport, done_shards
from pipeline.formats.frames import FrameIn, FrameOut, Rejected
from pipeline.store.lease import OutputLock

Restorer = Callable[[list[FrameIn]], list[FrameOut | Rejected]]


@ray.remote
class RestorerActor:
    """A restorer in a Ray actor: built once by `make()` (the model loads once), then batches come and go."""

    def __init__(self, make: Callable[[], Restorer]) -> None:
        self.restorer = make()

    def restore(self, frames: list[FrameIn]) -> list[FrameOut | Rejected]:
        return self.restorer(frames)

    # The depth-pools layout (the restorer is a FrameRestorer): see pipeline/deblur/ray/router.py.
    def encode_by_depth(self, frames: list[FrameIn]) -> list[EncodedBatch | DepthGroup]:
        return self.restorer.encode_by_depth(frames)  # type: ignore[attr-defined]

    def decode_depth(self, group: DepthGroup) -> DepthGroup:
        return self.restorer.decode_depth(group)  # type: ignore[attr-defined]

    def finish_routed(
        self, frames: list[FrameIn], batch: EncodedBatch, *residuals: DepthGroup
    ) -> list[FrameOut | Rejected]:
        return self.restorer.finish_routed(frames, batch, *residuals)  # type: ignore[attr-defined]

    def node(self) -> str:
        """The id of the node this actor runs on (also: it has started)."""
        return ray.get_runtime_context().get_node_id()

    def runs_on(self) -> tuple[str, str]:
        """(where the model runs: 'cuda' or 'cpu'; what it runs in: 'fp32' or 'bf16', decided on that
        device); 'none' for what a stand-in restorer lacks."""
        # No torch name in this class's methods: a handle to this actor, unpickled in a torch-free shard
        # worker, made it import torch (about 1 s and hundreds of MB each) when one was here.
        device = getattr(getattr(self.restorer, "device", None), "type", "none")
        return str(device), str(getattr(self.restorer, "precision", "none"))


CLIENT_TRIES = 3  # connections to a Ray Client head whose per-client server failed to start
CLIENT_SERVER_FAILED = "Starting Ray client server failed"


@dataclass(frozen=True)
class ModelRestorer:
    """Builds a FrameRestorer inside an actor. `weights`: files every node can read (on one machine,
    the driver's own files), or [ObjectRef] of the state dict, which Ray leaves unresolved so that a
    restarted actor fetches it again."""

    config: AdaRevDConfig
    weights: tuple[str, ...] | list[Any]
    options: RestoreOptions

    def __call__(self) -> FrameRestorer:
        model = AdaRevD(self.config)
        if isinstance(self.weights, tuple):
            load_weights(model, *self.weights)
        else:
            model.load_state_dict(ray.get(self.weights[0]), strict=True)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        return FrameRestorer(model, self.options, device)


def actor_options(options: RestoreOptions, cpus: float) -> RestoreOptions:
    """An actor's restore options: unless given, torch threads are the actor's own CPUs (at least 1)."""
    return replace(options, threads=options.threads or max(1, int(cpus)))


def ensure_ray(address: str | None, num_cpus: float | None = None, source: str = "--address") -> None:
    """Connect to a cluster (`auto`, `ray://...`, `HOST:PORT`) or, with None, start an embedded local
    Ray. `source`: where the address came from (`pipeline.cluster.address.ray_address`), for messages."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address:
        probe(address, source=source)  # nothing answers there: say so at once, not after Ray's minutes of retries
        for attempt in range(1, CLIENT_TRIES + 1):
            try:
                ray.init(address=address, logging_level="WARNING")
                return
            except ConnectionError as e:  # `auto` without a cluster, a Ray Client that does not answer
                # A Ray Client head sometimes fails to start the server for one client (a busy node): retry.
                if attempt < CLIENT_TRIES and CLIENT_SERVER_FAILED in str(e):
                    time.sleep(2.0 * attempt)
                    continue
                raise unreachable(address, e, source) from None
    else:
        # Always a fresh embedded instance, whatever RAY_ADDRESS says (the caller read it).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")


@dataclass(frozen=True, kw_only=True)
class Hooks:
    """Seams for the command line, tests and benchmarks."""

    on_progress: Callable[[int, list[int]], None] | None = None  # frames done, patches per depth; ~1/s
    make_restorer: Callable[[], Restorer] | None = None  # replaces the model in the actors (a stand-in)
    on_warning: Callable[[str], None] | None = None  # a line for the user before the work starts


def run(
    job: DeblurJob,
    model: AdaRevD,
    *,
    weight_files: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
    listing: Listing | None = None,
    hooks: Hooks = Hooks(),
) -> RunSummary:
    """Run the job on the connected Ray cluster (call `ensure_ray` first). `model` carries the loaded
    weights; `weight_files` (the files it was loaded from) let actors on a one-node cluster read them
    directly instead of through the object store. `listing`: the input shards, where the caller has
    listed them already (`job.listing`, to refuse a bad input before it starts Ray)."""
    config, fingerprint = model.config, adarevd.fingerprint(model)
    job.restore.check_model(config.num_columns)
    options = dict(options or {})
    start = time.perf_counter()
    # Fused with no --workers: the restorers follow the cluster, also as nodes join during the run.
    follows = job.resources if job.routing == "fused" and not job.resources.workers and not job.max_frames else None
    job = job.resolved(ray.cluster_resources())  # GPU shares and actor counts for this cluster
    source, output = job.stores(options)
    listing = listing or job.listing(options)
    shards = listing.shards
    input_bytes = sum(stat.size for stat in source.stats(shards)) if job.restore.compile == "auto" else 0
    job = replace(job, restore=job.restore.compile_for(input_bytes))
    summary = RunSummary(shards_total=len(shards), inputs_passed_over=dict(listing.passed_over))
    summary.compiled = job.restore.compile == "on"
    refuse_foreign(output, shards)  # before the lease: nothing is written into another dataset's folder
    # One run at a time on an output: a second one refuses (or takes over a dead one's lease).
    lock = OutputLock(output, summary.run_id, stale_after_s=job.lock_stale_s)
    with lock.held(job.take_over):
        summary.took_over, summary.parts_cleared = lock.took_over, lock.swept
        finished = done_shards(output, shards)
        todo, done = [s for s in shards if s not in finished], [s for s in shards if s in finished]
        short = space_short(source, output, todo)
        if short and hooks.on_warning:
            hooks.on_warning(short)
        summary.input_moved_from = check_resume(output, source, done, job.made_with(fingerprint, config))
        summary.shards_skipped = len(done)
        if todo:
            lock.mark_unfinished()  # until it finishes, whatever happens to it
            _process(_Run(job, model, fingerprint, weight_files, options, hooks, lock, summary, follows), todo)
        summary.seconds = time.perf_counter() - start
        totals = output_totals(output, config.num_columns)
        summary.shared_keys = totals["shared_keys"]
        lock.confirm()  # taken over meanwhile: the summary is the new holder's to write
        output.commit_bytes(RUN_FILE, run_json(job, summary, fingerprint, config, totals))
    return summary


def _process(run: _Run, todo: list[str]) -> None:
    """Start the actors, run every shard in `todo`, stop the actors; fills `run.summary`."""
    job, model, summary = run.job, run.model, run.summary
    config = model.config
    resources = job.resources
    summary.workers, summary.encoders = resources.workers, resources.encoders
    weights: tuple[str, ...] | list[Any]
    if run.weight_files and len(ray.nodes()) == 1:
        weights = tuple(os.path.abspath(f) for f in run.weight_files)
    else:
        # Held by this driver for the whole run (Ray warns that a restarted actor needs it: it has it).
        weights = [ray.put(model.state_dict())]

    def maker(cpus: float, weights: tuple[str, ...] | list[Any] = weights) -> Callable[[], Restorer]:
        return run.hooks.make_restorer or ModelRestorer(config, weights, actor_options(job.restore, cpus))

    pin = {resources.worker_resource: 1} if resources.worker_resource else None
    # Depth pools: spread encoders and pool actors over the nodes, so that each node holds encoders
    # and pool actors and a batch's features stay on the node that encoded it.
    spread = "SPREAD" if job.routing == "depth-pools" else None

    def names(role: str, count: int, first: int = 0) -> list[str]:
        return [f"adarevd-{role}-{summary.run_id}-{i}" for i in range(first, first + count)]

    def start(role: str, count: int, cpus: float, gpus: float, first: int = 0) -> list[Any]:
        # Restorers started mid-run may land on a node that joined: they take the weights from the object store.
        made = maker(cpus) if not first else maker(cpus, [ray.put(model.state_dict())])
        return [
            RestorerActor.options(
                name=name,
                num_cpus=cpus,
                num_gpus=gpus,
                resources=pin,
                scheduling_strategy=spread,
                max_restarts=-1,
                max_task_retries=3,
            ).remote(made)
            for name in names(role, count, first)
        ]

    actors = start("restorer", resources.workers, resources.cpus_per_worker, resources.gpus_per_worker)
    encoders = start("encoder", resources.encoders, resources.cpus_per_encoder, resources.gpus_per_encoder)
    # The progress counter lives beside the driver: losing a worker node must not lose it.
    driver = this_node()
    here = NodeAffinitySchedulingStrategy(driver.node_id, soft=False)
    progress = ProgressActor.options(scheduling_strategy=here).remote()
    # With a frame budget, shards run one at a time so that the budget is exact.
    shard_workers = [
        ShardWorker.options(name=f"adarevd-shards-{summary.run_id}-{i}").remote(driver)
        for i in range(1 if job.max_frames else resources.shards_in_flight)
    ]
    try:
        nodes = _wait_ready([*actors, *encoders], shard_workers, resources, job.stall_timeout_s)
        summary.worker_nodes = dict(Counter(nodes[: len(actors)]))
        summary.encoder_nodes = dict(Counter(nodes[len(actors) :]))
        devices = _count_devices(summary, [*actors, *encoders])
        _check_devices(
            devices,
            [resources.gpus_per_worker or 0.0] * len(actors) + [resources.gpus_per_encoder or 0.0] * len(encoders),
        )
        pools = Pools(
            actors,
            nodes[: len(actors)],
            encoders,
            nodes[len(actors) :],
            config.num_columns,
            tuple(config.exit_table),
            names("restorer", len(actors)),
            names("encoder", len(encoders)),
        )
        ready = time.perf_counter()
        workers_run = WorkerRun(job=job, options=run.options, pools=pools, progress=progress, fence=run.lock.fence())
        more = partial(start, "restorer", cpus=resources.cpus_per_worker, gpus=resources.gpus_per_worker)
        growth = _Growth(run, pools, (more, partial(names, "restorer")), actors) if run.follows is not None else None
        summary.reports = _drive(run, workers_run, todo, shard_workers, growth)
        summary.processing_seconds = time.perf_counter() - ready
        summary.pool_plans = ray.get(progress.pool_plans.remote())
    finally:
        for actor in [*actors, *encoders, *shard_workers, progress]:
            ray.kill(actor)


def _wait_ready(actors: list[Any], shard_workers: list[Any], resources: Resources, timeout: float) -> list[str]:
    """Node of each restorer actor, once all actors and shard workers are up."""
    try:
        nodes = ray.get([a.node.remote() for a in actors], timeout=timeout)
        ray.get([w.node.remote() for w in shard_workers], timeout=timeout)
        return nodes
    except RayActorError as e:
        failed = start_failure(e, restarted=False)
        if failed is None:
            raise
        raise failed from None
    except GetTimeoutError:
        encoders = (
            f" and {resources.encoders} encoder(s) asking for {resources.cpus_per_encoder} CPU and "
            f"{resources.gpus_per_encoder} GPU each"
            if resources.encoders
            else ""
        )
        raise StallError(
            f"{resources.workers} restorer actor(s) asking for {resources.cpus_per_worker} CPU and "
            f"{resources.gpus_per_worker} GPU each{encoders} did not start within {timeout:.0f} s; the "
            f"cluster has {ray.available_resources()} free of {ray.cluster_resources()}. Ask for fewer "
            f"workers (--workers, --encoders) or less per worker (--cpus-per-worker, --gpus-per-worker, "
            f"--cpus-per-encoder, --gpus-per-encoder)."
        ) from None


def _count_devices(summary: RunSummary, actors: list[Any]) -> list[str]:
    """Add the actors' devices and precisions to the summary's counts; returns their devices."""
    runs_on = ray.get([a.runs_on.remote() for a in actors])
    devices = [device for device, _ in runs_on]
    summary.devices = dict(Counter(summary.devices) + Counter(devices))
    summary.precisions = dict(Counter(summary.precisions) + Counter(precision for _, precision in runs_on))
    return devices


def _check_devices(devices: list[str], gpu_shares: list[float]) -> None:
    """An actor given a GPU share whose model runs on the CPU: stop before any shard, saying why."""
    if any(share and device == "cpu" for device, share in zip(devices, gpu_shares, strict=True)):
        raise DeviceError(
            f"the model actors were given GPU shares (up to {max(gpu_shares):g} each) but torch in them sees "
            f"no CUDA device: a CPU build of torch (the driver has {torch.__version__}) or no driver where "
            "they run. Install a CUDA build of torch there, or run on CPUs with --gpus-per-worker 0."
        )


@dataclass(frozen=True)
class _Run:
    """One run of a job, as `run` passes it on."""

    job: DeblurJob
    model: AdaRevD
    fingerprint: str
    weight_files: Sequence[str]
    options: Mapping[str, Any]
    hooks: Hooks
    lock: OutputLock
    summary: RunSummary  # filled in as the run goes
    follows: Resources | None = None  # the unresolved resources, when the restorers follow the cluster


class _Growth:
    """Restorers for the CPUs (or GPUs) of nodes that join the cluster while a run goes: checked every
    `EVERY_S`, sized as at the start (`Resources.resolve`), started like the first ones."""

    EVERY_S = 2.0

    def __init__(
        self,
        run: _Run,
        pools: Pools,
        start: tuple[Callable[..., list[Any]], Callable[[int, int], list[str]]],
        actors: list[Any],
    ) -> None:
        """`start`: (start(count=, first=) -> restorers, names(count, first) -> their names)."""
        self.run, self.pools, self.actors = run, pools, actors
        self.start, self.names = start
        self.next_check = time.monotonic() + self.EVERY_S

    def check(self) -> tuple[Pools, list[Any]] | None:
        """(the pools with the new restorers, the new restorers), or None when the cluster did not grow."""
        if time.monotonic() < self.next_check or self.run.follows is None:
            return None
        self.next_check = time.monotonic() + self.EVERY_S
        wanted = self.run.follows.resolve(ray.cluster_resources()).workers
        have = len(self.pools.restorers)
        if wanted <= have:
            return None
        new = self.start(count=wanted - have, first=have)
        self.actors += new  # (stopped with the others)
        nodes = ray.get([a.node.remote() for a in new], timeout=self.run.job.stall_timeout_s)
        summary = self.run.summary
        summary.workers = wanted
        summary.worker_nodes = dict(Counter([*self.pools.restorer_nodes, *nodes]))
        _count_devices(summary, new)
        self.pools = replace(
            self.pools,
            restorers=[*self.pools.restorers, *new],
            restorer_nodes=[*self.pools.restorer_nodes, *nodes],
            restorer_names=[*self.pools.restorer_names, *self.names(wanted - have, have)],
        )
        return self.pools, new


def _drive(
    run: _Run, workers_run: WorkerRun, todo: list[str], shard_workers: list[Any], growth: _Growth | None
) -> list[ShardReport]:
    """Hand shards to free shard workers until all are done; watch progress and stalls. `growth`: starts
    restorers (and a shard worker each) for nodes that join; later shards use them."""
    queue = deque(enumerate(todo))
    free = deque(shard_workers)
    running: dict[Any, tuple[str, Any]] = {}
    reports: list[ShardReport] = []
    job, progress = run.job, workers_run.progress
    budget = job.max_frames
    made_with = job.made_with(run.fingerprint, run.model.config)  # the same for every shard
    last_total, last_change = -1, time.monotonic()
    while queue or running:
        if queue and growth is not None and (grown := growth.check()) is not None:
            pools, added = grown
            workers_run = replace(workers_run, pools=pools)
            added_workers = [ShardWorker.remote(this_node()) for _ in added]
            shard_workers += added_workers  # (stopped with the others)
            free.extend(added_workers)
        while queue and free and (budget is None or budget > 0):
            index, shard = queue.popleft()
            worker = free.popleft()
            task = job.task(shard, index, made_with=made_with, run_id=run.summary.run_id, max_frames=budget)
            ref = worker.process.remote(task, workers_run)
            running[ref] = (shard, worker)
        if not running:
            break
        done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        for ref in done:
            try:
                report = ray.get(ref)
            except RayTaskError as e:
                # A store that stayed down, a shard that cannot be read, an actor that could not be
                # restarted, another run that took the output over: each has its own clear message.
                if isinstance(e.cause, UserError):
                    raise e.cause from None
                raise
            free.append(running.pop(ref)[1])
            reports.append(report)
            if budget is not None:
                budget -= report.frames + report.quarantined
        run.lock.check()
        counts, depths = ray.get(progress.snapshot.remote())
        total = sum(counts.values())
        if run.hooks.on_progress:
            run.hooks.on_progress(total, depths)
        if total != last_total or done:
            last_total, last_change = total, time.monotonic()
        elif time.monotonic() - last_change > job.stall_timeout_s:
            waits = ray.get(progress.waiting.remote())
            shards = [s for s, _ in running.values()]
            raise StallError(_stall_report(shards, counts, waits, job.stall_timeout_s))
    return sorted(reports, key=lambda r: r.shard)


def _stall_report(running: list[str], counts: Mapping[str, int], waits: Mapping[str, str], timeout: float) -> str:
    lines = [f"no frame finished for {timeout:.0f} s. Waiting:"]
    for shard in running:
        what = waits.get(shard, "reading its input or starting (no call outstanding for long)")
        lines.append(f"  shard {shard}: {counts.get(shard, 0)} frames done, waiting on {what}")
    lines.append(f"  cluster resources free: {ray.available_resources()} of {ray.cluster_resources()}")
    return "\n".join(lines)
