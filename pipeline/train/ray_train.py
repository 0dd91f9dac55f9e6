"""`adarevd train` on Ray Train: N TorchTrainer workers each run `trainer.train` on their rank.

Ray Train starts the workers and the process group (gloo on CPU, NCCL on GPUs); everything else (data
split, gradient averaging, checkpoints on fsspec, resume) is `pipeline.train.trainer`'s, so one worker on
one machine and N workers on a cluster give the same kind of result. Rank 0 prints progress (Ray
forwards worker output to the driver). Workers report to Ray Train once, at the end: a report is a
barrier through the Ray Train controller, too slow to pay every few steps.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any

import ray.train
import torch
from ray.train.torch import TorchTrainer, get_device

from pipeline.cluster.node_view import NodeCannotSee, check_files
from pipeline.cluster.this_node import this_node
from pipeline.store.scratch import scratch
from pipeline.store.storage import StorageError, Store, file_store
from pipeline.train.pair_stream import paired_shards
from pipeline.train.trainer import Progress, TrainResult, TrainSpec, read_result, train

Seen = tuple[str, str, str]  # (folder URL, file name, what it is): a file every worker must see
# A worker's error with a message of its own (ValueError: PairDataError, TrainError, WeightsError),
# raised as it is instead of Ray Train's WorkerGroupError.
WORKER_ERRORS = (NodeCannotSee, StorageError, ValueError, FileNotFoundError)


@dataclass(frozen=True)
class TrainResources:
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


def format_progress(p: Progress, kind: str) -> str:
    metric = f"acc {p.metric:5.1f}%" if kind == "classifier" else f"psnr {p.metric:6.2f} dB"
    return f"{kind}: step {p.step}/{p.iterations} loss {p.loss:.4f} {metric} {p.crops_per_s:6.1f} crops/s"


def _worker(config: dict[str, Any]) -> None:
    spec: TrainSpec = config["spec"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report
    files = [(Store(url, spec.storage_options), name, what) for url, name, what in config["seen"]]
    check_files(files, this_node(), config["driver"])  # before any step: a local path only the driver has

    def progress(p: Progress) -> None:
        if rank == 0:
            print(format_progress(p, spec.kind), flush=True)

    result = train(spec, rank, world, device=get_device(), on_progress=progress)
    ray.train.report({"final": asdict(result) if result is not None else {}})  # every worker reports


def fit(spec: TrainSpec, resources: TrainResources) -> TrainResult:
    """Run the stage on the connected Ray cluster (`pipeline.deblur.ray.driver.ensure_ray` first)."""
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker} | ({"GPU": resources.gpus_per_worker} if use_gpu else {})
    data = Store(spec.data, spec.storage_options)
    first = paired_shards(data)[0]  # no data: say so here, before Ray Train starts any worker
    seen = [(data.url, first, "the training data, which the driver lists")]
    for weights in spec.weights:
        folder, name = file_store(weights, {})
        seen.append((folder.url, name, "these starting weights, which the driver read"))
    with scratch("train") as storage, _marks(spec) as marks:
        config = {"spec": spec, "threads": resources.cpus_per_worker, "seen": seen + marks, "driver": this_node()}
        trainer = TorchTrainer(
            _worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=resources.workers, use_gpu=use_gpu, resources_per_worker=per_worker
            ),
            run_config=ray.train.RunConfig(storage_path=storage, name="adarevd-train"),
        )
        try:
            trainer.fit()
        except ray.train.WorkerGroupError as e:
            failures = [e.worker_failures[rank] for rank in sorted(e.worker_failures)]
            known = [f for f in failures if isinstance(f, WORKER_ERRORS)]
            if known:
                raise known[0] from None  # (its message names the file, the shard or the node)
            raise
    return read_result(spec)


@contextmanager
def _marks(spec: TrainSpec) -> Iterator[list[Seen]]:
    """Write a mark beside the output and in the checkpoints folder, for the workers to find there
    (rank 0 writes both: a node that does not see them would keep the weights on its own disk); remove
    them afterwards."""
    token = uuid.uuid4().hex[:12]
    output, name = file_store(spec.output, spec.storage_options)
    places = [(output, f"{name}.seen-{token}", "the mark the driver wrote beside the output")]
    if spec.checkpoints:
        checkpoints = Store(spec.checkpoints, spec.storage_options)
        places.append((checkpoints, f"_seen-{token}", "the mark the driver wrote in the checkpoints folder"))
    written = []
    try:
        for store, mark, _ in places:
            store.commit_bytes(mark, token.encode())
            written.append((store, mark))
        yield [(store.url, mark, what) for store, mark, what in places]
    finally:
        for store, mark in written:
            with suppress(FileNotFoundError, StorageError):
                store.remove(mark)
                store.remove_tmp_folder()  # (the mark's commit made it)
