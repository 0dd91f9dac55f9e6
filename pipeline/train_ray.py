"""`adarevd train` on Ray Train: N TorchTrainer workers each run `trainer.train` on their rank.

Ray Train starts the workers and the process group (gloo on CPU, NCCL on GPUs); everything else (data
split, gradient averaging, checkpoints on fsspec, resume) is `pipeline.trainer`'s, so one worker on
one machine and N workers on a cluster give the same kind of result. Rank 0 prints progress (Ray
forwards worker output to the driver). Workers report to Ray Train once, at the end: a report is a
barrier through the Ray Train controller, too slow to pay every few steps.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import ray.train
import torch
from ray.train.torch import TorchTrainer, get_device

from pipeline.scratch import scratch
from pipeline.trainer import Progress, TrainResult, TrainSpec, read_result, train


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

    def progress(p: Progress) -> None:
        if rank == 0:
            print(format_progress(p, spec.kind), flush=True)

    result = train(spec, rank, world, device=get_device(), on_progress=progress)
    ray.train.report({"final": asdict(result) if result is not None else {}})  # every worker reports


def fit(spec: TrainSpec, resources: TrainResources) -> TrainResult:
    """Run the stage on the connected Ray cluster (`pipeline.deblur.ensure_ray` first)."""
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker} | ({"GPU": resources.gpus_per_worker} if use_gpu else {})
    with scratch("train") as storage:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"spec": spec, "threads": resources.cpus_per_worker},
            scaling_config=ray.train.ScalingConfig(
                num_workers=resources.workers, use_gpu=use_gpu, resources_per_worker=per_worker
            ),
            run_config=ray.train.RunConfig(storage_path=storage, name="adarevd-train"),
        )
        trainer.fit()
    return read_result(spec)
