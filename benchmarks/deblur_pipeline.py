"""The deblur job vs its compute bound and vs a naive Ray Data pipeline, on the same frames, one run.

- compute bound (the goal's): `model.restore` frame by frame in this process (all cores), frames
  already decoded in memory, no I/O. The job's default layout runs `--repeats` times, each run between
  two measurements of the bound (bound, run, bound, run, ..., bound), and each run's ratio is taken
  against the mean of the bounds on either side, so a machine that speeds up or slows down (a shared
  host) tilts no run; the median run's ratio is the headline and every run's is written. Also, for
  context, the same restores split over one process per core with one thread each (how the
  pipeline's actors spread the work), which on small frames can be faster than one process with
  every thread.
- pipeline: `adarevd deblur`'s `run()` on an embedded local Ray, reading and writing local shards, in
  three layouts: fused with N actors x 1 CPU and with 1 actor x N CPUs, and `--routing depth-pools`
  (one encoder and 2N - 1 depth-pool actors at 0.5 CPU each), the latter with the job's default
  batch for the device and with the depth-k patches of `--pool-frames` frames per call. Reported on
  its whole wall time and on its processing time (after the actors are up: start-up is paid once per
  run, not per frame).
- naive Ray Data: `read_webdataset -> map_batches(model.restore) -> write_webdataset`, with an actor
  pool of the same size, fractional CPUs (a pool that takes every CPU starves its read/write tasks).

    python -m benchmarks.deblur_pipeline [--frames 64 --size 320x240 --exit adaptive] [--device cuda]

On a GPU (`--device cuda`, results in `deblur_pipeline_gpu.json`) every contender runs the model on
the card: the bound on it, the fused layout with 1, 2 and 4 actors sharing it, depth pools with an
encoder and three pool actors at a quarter each, and the naive pipeline with 4 actors at a quarter.
Every contender runs the job's default precision on the device (`--precision auto`: bf16 autocast on
cards with bf16 tensor cores, fp32 on the CPU), recorded as `precision`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

import adarevd
from adarevd.speed import autocast_dtype, precision_for
from benchmarks.common import write
from jobs.cli import DEFAULT_WEIGHTS
from jobs.data import frame_size
from pipeline.deblur.job import RestoreOptions
from pipeline.deblur.ray import driver
from pipeline.formats.shards import iter_samples
from pipeline.formats.sink import ShardLimits
from pipeline.ingest.run import IngestConfig, ingest
from pipeline.store.storage import Store
from pipeline.synth.pairs import ClipConfig, write_clip


def load_frames(store: Store) -> list[np.ndarray]:
    import cv2

    frames = []
    for name in store.glob("*.tar"):
        with store.open(name) as stream:
            for sample in iter_samples(stream, name):
                bgr = cv2.imdecode(np.frombuffer(sample.members["png"], np.uint8), cv2.IMREAD_COLOR)
                frames.append(np.ascontiguousarray(bgr[..., ::-1]))
    return frames


def _restore_share(frames: list[np.ndarray], exit: str | int, ready: Any, go: Any, done: Any) -> None:
    torch.set_num_threads(1)
    model = adarevd.AdaRevD(adarevd.read_config(DEFAULT_WEIGHTS))
    adarevd.load_weights(model, DEFAULT_WEIGHTS)
    tensors = [torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255 for f in frames]
    with torch.no_grad():
        model.eval().restore(tensors[0], exit=exit)  # warm-up
        ready.release()
        go.wait()
        for t in tensors:
            model.restore(t, exit=exit)
    done.release()


def compute_bound_processes(frames: list[np.ndarray], exit: str | int, processes: int) -> float:
    """The same restores split over `processes` processes of one thread each (frames in memory):
    what this machine does with the model when the work is spread like the pipeline's actors."""
    context = multiprocessing.get_context("spawn")
    ready, done, go = context.Semaphore(0), context.Semaphore(0), context.Event()
    workers = [
        context.Process(target=_restore_share, args=(frames[i::processes], exit, ready, go, done))
        for i in range(processes)
    ]
    for w in workers:
        w.start()
    for _ in workers:
        ready.acquire()
    start = time.perf_counter()
    go.set()
    for _ in workers:
        done.acquire()
    seconds = time.perf_counter() - start
    for w in workers:
        w.join()
    return seconds


def default_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype the job's default precision (`auto`) runs on `device`: every contender uses it."""
    return autocast_dtype(precision_for("auto", device))


def compute_bound(model: adarevd.AdaRevD, frames: list[np.ndarray], exit: str | int) -> float:
    """Frame-by-frame `restore` on the model's device, the frames already there."""
    device = next(model.parameters()).device
    tensors = [(torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255).to(device) for f in frames]
    dtype = default_dtype(device)
    with torch.no_grad():
        model.restore(tensors[0], exit=exit, autocast_dtype=dtype)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for t in tensors:
            model.restore(t, exit=exit, autocast_dtype=dtype)
        synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RestoreUDF:
    """The naive pipeline's map_batches callable: model.restore on each decoded image."""

    def __init__(self, exit: str | int) -> None:
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.model = adarevd.AdaRevD(adarevd.read_config(DEFAULT_WEIGHTS))
        adarevd.load_weights(self.model, DEFAULT_WEIGHTS)
        self.model.to(self.device).eval()
        self.exit = exit
        self.dtype = default_dtype(self.device)

    def __call__(self, batch: dict) -> dict:
        out = []
        with torch.no_grad():
            for image in batch["png"]:
                x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().to(self.device) / 255
                y = self.model.restore(x, exit=self.exit, autocast_dtype=self.dtype).images[0]
                out.append(y.mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
        batch["png"] = np.stack(out)
        return batch


def naive_ray_data(source: Store, output: Path, exit: str | int, actors: int, cpus: float, gpus: float) -> float:
    start = time.perf_counter()
    # Fractional CPUs everywhere: a pool holding whole CPUs starves the read/write tasks (ENV.md).
    ds = ray.data.read_webdataset([source.path(n) for n in source.glob("*.tar")], num_cpus=0.1)
    ds = ds.map_batches(
        RestoreUDF,
        fn_constructor_kwargs={"exit": exit},
        batch_size=8,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    ds.write_webdataset(str(output), ray_remote_args={"num_cpus": 0.1})
    return time.perf_counter() - start


Layouts = dict[str, tuple[str, driver.Resources, int]]  # name -> (routing, resources, frames per batch)


def layouts(device: torch.device, cpus: int, frames_per_batch: int, pool_frames: int) -> Layouts:
    if device.type == "cuda":

        def gpu(n: int) -> driver.Resources:
            """n actors sharing the card in fractions, as on a cluster's GPU node."""
            return driver.Resources(workers=n, cpus_per_worker=2.0, gpus_per_worker=1 / n)

        pools = driver.Resources(
            workers=3, cpus_per_worker=1, gpus_per_worker=0.25, encoders=1, cpus_per_encoder=1, gpus_per_encoder=0.25
        )
        return {
            "1x1gpu": ("fused", gpu(1), frames_per_batch),
            "2x0.5gpu": ("fused", gpu(2), frames_per_batch),
            "4x0.25gpu": ("fused", gpu(4), frames_per_batch),
            "depth-pools": ("depth-pools", pools, frames_per_batch),
        }
    pools = driver.Resources(workers=2 * cpus - 1, cpus_per_worker=0.5, cpus_per_encoder=0.5)
    return {
        f"{cpus}x1cpu": ("fused", driver.Resources(workers=cpus, cpus_per_worker=1.0), frames_per_batch),
        f"1x{cpus}cpu": ("fused", driver.Resources(workers=1, cpus_per_worker=float(cpus)), frames_per_batch),
        "depth-pools": ("depth-pools", pools, pool_frames),
        "depth-pools-default-batch": ("depth-pools", pools, frames_per_batch),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--size", type=frame_size, default=(240, 320), help="WIDTHxHEIGHT")
    p.add_argument("--exit", default="adaptive")
    p.add_argument("--frames-per-batch", type=int, default=0, help="0: the job's default for the device")
    p.add_argument("--pool-frames", type=int, default=4, help="depth-pools layout on CPU: frames per batch")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: the model on the GPU in every contender")
    p.add_argument("--repeats", type=int, default=3, help="runs of the default layout, each between two bounds")
    args = p.parse_args()
    exit = args.exit if args.exit == "adaptive" else int(args.exit)
    cpus = os.cpu_count() or 1
    device = torch.device(args.device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0

    work = Path(tempfile.mkdtemp(prefix="adarevd-bench-deblur-"))
    try:
        clip = work / "clip.mkv"
        write_clip(clip, ClipConfig(frames=args.frames, size=args.size, seed=7))
        source = Store(str(work / "shards"))
        ingest([str(clip)], source, IngestConfig(limits=ShardLimits(max_samples=16)))
        model = adarevd.AdaRevD(adarevd.read_config(DEFAULT_WEIGHTS))
        adarevd.load_weights(model, DEFAULT_WEIGHTS)
        model.eval()

        frames = load_frames(source)

        def bound_s() -> float:
            seconds = compute_bound(model.to(device), frames, exit)
            model.cpu()
            print(f"compute bound on {device}: {args.frames / seconds:.2f} frames/s", flush=True)
            return seconds

        driver.ensure_ray(None, num_cpus=cpus)
        table = layouts(device, cpus, args.frames_per_batch, args.pool_frames)
        default = next(iter(table))  # the job's default layout: fused, an actor per CPU (per GPU)

        def run_layout(name: str) -> dict[str, Any]:
            routing, resources, batch = table[name]
            job = driver.DeblurJob(
                source.url,
                str(work / f"out-{name}-{time.monotonic_ns()}"),
                restore=RestoreOptions(exit=exit),
                resources=resources,
                frames_per_batch=batch,
                routing=routing,  # type: ignore[arg-type]
            )
            summary = driver.run(job, model, weight_files=[str(DEFAULT_WEIGHTS)])
            assert summary.frames == args.frames
            if device.type == "cuda":
                assert set(summary.devices) == {"cuda"}, summary.devices
            result = {
                "wall_s": summary.seconds,
                "processing_s": summary.processing_seconds,
                "pool_plans": summary.pool_plans[-3:],
                "routing": routing,
            }
            print(f"pipeline {name}: {result}", flush=True)
            return result

        # The default layout between two measurements of the bound, `--repeats` times (bound, run,
        # bound, run, ..., bound): each run's ratio is against the mean of the bounds on either side, so
        # a machine that drifts (a shared host) tilts no run, and the median run is the headline.
        bounds = [bound_s()]
        runs = []
        for _ in range(args.repeats):
            runs.append(run_layout(default))
            bounds.append(bound_s())
        pairs = [((bounds[i] + bounds[i + 1]) / 2, run) for i, run in enumerate(runs)]
        spread = None
        if device.type == "cpu":
            spread = compute_bound_processes(frames, exit, cpus)
            print(f"{cpus} processes x 1 thread: {args.frames / spread:.2f} frames/s", flush=True)
        pipeline = {
            default: {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "processing_s")}
            | {"pool_plans": runs[-1]["pool_plans"], "routing": runs[-1]["routing"]}
        }
        pipeline |= {name: run_layout(name) for name in table if name != default}
        bound = statistics.median(b for b, _ in pairs)  # for context; each ratio uses its own pair
        naive_actors = 4 if gpus else cpus
        naive = naive_ray_data(source, work / "naive", exit, actors=naive_actors, cpus=0.9, gpus=gpus / naive_actors)
        best = min(pipeline, key=lambda k: pipeline[k]["wall_s"])
        default_s = pipeline[default]["processing_s"]
        fps = lambda s: args.frames / s  # noqa: E731
        per_run = {k: [round(b / r[f"{k}_s"], 3) for b, r in pairs] for k in ("processing", "wall")}

        def fastest(routing: str) -> float:
            return min(v["processing_s"] for v in pipeline.values() if v["routing"] == routing)

        write(
            "deblur_pipeline" if device.type == "cpu" else "deblur_pipeline_gpu",
            {
                "frames": args.frames,
                "size": {"width": args.size[1], "height": args.size[0]},
                "exit": args.exit,
                "device": str(device),
                "precision": precision_for("auto", device),  # the job's, the bound's and the naive pipeline's
                "frames_per_batch": args.frames_per_batch,
                "repeats": args.repeats,
                "compute_bound_fps": round(fps(bound), 3),  # the median over the runs of their pair's mean
                "compute_bound_fps_each": [round(fps(b), 3) for b in bounds],  # before, between, after the runs
                **({f"restore_{cpus}_processes_x_1_thread_fps": round(fps(spread), 3)} if spread else {}),
                "pool_frames": args.pool_frames,
                "pipeline": {
                    k: {
                        "fps_wall": round(fps(v["wall_s"]), 3),
                        "fps_processing": round(fps(v["processing_s"]), 3),
                        **({"last_pool_plans": v["pool_plans"]} if v["pool_plans"] else {}),
                    }
                    for k, v in pipeline.items()
                },
                "fused_over_depth_pools": round(fastest("depth-pools") / fastest("fused"), 3),
                "naive_ray_data_fps": round(fps(naive), 3),
                "naive_ray_data_actors": naive_actors,
                "best_layout": best,
                "ratio_vs_compute_bound": {  # the default layout, each run against its own pair of bounds
                    "layout": default,
                    "processing": statistics.median(per_run["processing"]),
                    "wall": statistics.median(per_run["wall"]),
                    "processing_per_run": per_run["processing"],
                    "wall_per_run": per_run["wall"],
                    "goal": ">= 0.9",
                },
                **({"ratio_vs_processes_x_1_thread": round(spread / default_s, 3)} if spread else {}),
                "ratio_vs_naive_ray_data": {  # the default layout's median wall time
                    "wall": round(naive / pipeline[default]["wall_s"], 3),
                    "goal": ">= 1.3 on a GPU" if gpus else ">= 1.0 on CPU",
                },
            },
        )
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
