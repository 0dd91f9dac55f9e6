"""Batching, scaling and memory of the deblur dataflow with a GPU-like stand-in model.

The stand-in costs no CPU: a batch of n patches takes a + b*n seconds (it sleeps), for the encoder
(per frame) and for each column over the pooled patches that reach it, like a GPU kernel launch plus
per-item work. Everything else is the real job: shards read and written, frames decoded and encoded,
actors, shard tasks, the driver. Three measurements, side by side in one run:

- pooling: patches of `--pooled` frames per call vs one frame per call (goal: >= 1.5x);
- scaling: 16 stand-in workers vs their ideal, 16 x (frames per call / stand-in time per call)
  (goal: >= 90%);
- memory: peak memory (summed PSS) of every process of the run (driver + Ray) at 10x the frames vs
  1x (goal: <= 1.2x: memory must not grow with the archive).

    python -m benchmarks.pipeline_batching [--a 0.02 --b 0.002 --frames 1024 --scale-frames 2048]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import adarevd
from adarevd.tiling import PatchGrid
from benchmarks.common import write
from jobs.cli import DEFAULT_WEIGHTS
from pipeline.deblur.ray import driver
from pipeline.deblur.scores import blur_score
from pipeline.formats import images
from pipeline.formats.frames import FrameIn, FrameOut, Rejected
from pipeline.formats.shards import Sample, encode_shard
from pipeline.store.storage import Store

MARKER = "ADAREVD_BENCH_RUN"
COLUMNS, PATCH, OVERLAP = 4, 64, 16


@dataclass(frozen=True)
class StandIn:
    """Builds the stand-in restorer inside an actor."""

    a: float
    b: float

    def __call__(self) -> StandInRestorer:
        return StandInRestorer(self.a, self.b)


class StandInRestorer:
    def __init__(self, a: float, b: float) -> None:
        self.a, self.b = a, b

    def cost(self, patches_per_frame: list[np.ndarray]) -> float:
        """Seconds the stand-in sleeps for one call: an encoder launch per frame, a launch per column."""
        encode = sum(self.a + self.b * len(d) for d in patches_per_frame)
        depths = np.concatenate(patches_per_frame)
        decode = sum(self.a + self.b * int((depths > j).sum()) for j in range(COLUMNS) if (depths > j).any())
        return encode + decode

    def __call__(self, frames: list[FrameIn]) -> list[FrameOut | Rejected]:
        per_frame = []
        for frame in frames:
            h, w = frame.rgb.shape[:2]
            grid = PatchGrid.build(h + (-h % 16), w + (-w % 16), PATCH, OVERLAP)
            seed = int.from_bytes(frame.key.encode()[-4:], "little")
            per_frame.append(np.random.default_rng(seed).integers(1, COLUMNS + 1, grid.num_patches))
        time.sleep(self.cost(per_frame))
        out: list[FrameOut | Rejected] = []
        for frame, depths in zip(frames, per_frame, strict=True):
            h, w = frame.rgb.shape[:2]
            histogram = tuple(int((depths == d).sum()) for d in range(COLUMNS + 1))
            score = blur_score(frame.rgb)
            mean = float(depths.mean())
            out.append(
                FrameOut(
                    frame.sample,
                    frame.member,
                    w,
                    h,
                    "",
                    histogram,
                    mean,
                    1 - mean / COLUMNS,
                    score,
                    score,
                    1.0,
                    (0.0, 0.0, 0.0),
                    0.0,
                    0.0,
                    0.0,
                )
            )
        return out


def make_input(store: Store, frames: int, per_shard: int = 32) -> None:
    rng = np.random.default_rng(0)
    picture = images.encode(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    for s in range(0, frames, per_shard):
        samples = [Sample(f"v_{i:06d}", {"png": picture}) for i in range(s, min(s + per_shard, frames))]
        store.commit_bytes(f"in-{s // per_shard:06d}.tar", encode_shard(samples))


class MemorySampler:
    """Peaks of the memory of this process and every process carrying MARKER, summed: PSS (each shared
    page divided among the processes that map it, so the sum is what the run holds) and, for context,
    RSS (each shared page counted once per process: torch's libraries once per actor, the object
    store's pages once per worker that touched them)."""

    def __init__(self, run_id: str) -> None:
        self.marker = f"{MARKER}={run_id}".encode()
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            pss, rss = self._totals()
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            time.sleep(1.0)  # reading smaps_rollup walks page tables: at 0.2 s it took 0.3 of a core

    def _totals(self) -> tuple[int, int]:
        pss = rss = 0
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if int(proc.name) != os.getpid() and self.marker not in (proc / "environ").read_bytes().split(b"\0"):
                    continue
                fields = dict(line.split(":", 1) for line in (proc / "smaps_rollup").read_text().splitlines()[1:])
                pss += int(fields["Pss"].split()[0]) * 1024
                rss += int(fields["Rss"].split()[0]) * 1024
            except (OSError, ValueError, KeyError):  # gone meanwhile, or not ours to read
                continue
        return pss, rss

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_once(
    work: Path,
    name: str,
    frames: int,
    model: adarevd.AdaRevD,
    stand_in: StandIn,
    workers: int,
    frames_per_batch: int,
    run_id: str,
) -> tuple[float, MemorySampler]:
    source, output = Store(str(work / f"in-{name}")), Store(str(work / f"out-{name}"))
    make_input(source, frames)
    job = driver.DeblurJob(
        source.url,
        output.url,
        frames_per_batch=frames_per_batch,
        resources=driver.Resources(workers=workers, cpus_per_worker=0.1),
    )
    with MemorySampler(run_id) as memory:
        summary = driver.run(job, model, hooks=driver.Hooks(make_restorer=stand_in))
    assert summary.frames == frames, summary
    return summary.processing_seconds, memory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--a", type=float, default=0.02, help="stand-in seconds per call (launch)")
    p.add_argument("--b", type=float, default=0.002, help="stand-in seconds per patch")
    p.add_argument("--frames", type=int, default=1024, help="frames of the pooling runs (4 workers)")
    p.add_argument("--scale-frames", type=int, default=2048, help="frames of the 16-worker run (1x memory)")
    p.add_argument("--pooled", type=int, default=16, help="frames per call when pooling")
    args = p.parse_args()

    run_id = uuid.uuid4().hex
    os.environ[MARKER] = run_id  # inherited by every Ray process started below
    work = Path(tempfile.mkdtemp(prefix="adarevd-bench-batching-"))
    model = adarevd.AdaRevD(adarevd.read_config(DEFAULT_WEIGHTS))
    stand_in = StandIn(args.a, args.b)
    try:
        driver.ensure_ray(None, num_cpus=os.cpu_count())
        single, _ = run_once(work, "single", args.frames, model, stand_in, 4, 1, run_id)
        pooled, _ = run_once(work, "pooled", args.frames, model, stand_in, 4, args.pooled, run_id)
        scaled, memory_1x = run_once(work, "scaled", args.scale_frames, model, stand_in, 16, args.pooled, run_id)
        scaled10, memory_10x = run_once(
            work, "scaled10", 10 * args.scale_frames, model, stand_in, 16, args.pooled, run_id
        )
        # Ideal for 16 workers: each busy all the time with calls of `pooled` frames of 128x128.
        restorer = stand_in()
        grid = PatchGrid.build(128, 128, PATCH, OVERLAP)
        call = [np.random.default_rng(i).integers(1, COLUMNS + 1, grid.num_patches) for i in range(args.pooled)]
        ideal_fps = 16 * args.pooled / restorer.cost(call)
        write(
            "pipeline_batching",
            {
                "stand_in": {"a_s": args.a, "b_s": args.b, "patches_per_frame": grid.num_patches, "columns": COLUMNS},
                "frames": args.frames,
                "pooling": {
                    "fps_one_frame_per_call": round(args.frames / single, 2),
                    "fps_pooled": round(args.frames / pooled, 2),
                    "frames_per_call": args.pooled,
                    "speedup": round(single / pooled, 3),
                    "goal": ">= 1.5",
                },
                "scaling_16_workers": {
                    "frames": args.scale_frames,
                    "fps": round(args.scale_frames / scaled, 2),
                    "ideal_fps": round(ideal_fps, 2),
                    "fraction_of_ideal": round(args.scale_frames / scaled / ideal_fps, 3),
                    # The short run pays the ramp-up and the tail (about one call each) on 8 rounds of
                    # calls; the 10x run is the steady state.
                    "fps_10x_frames": round(10 * args.scale_frames / scaled10, 2),
                    "fraction_of_ideal_10x_frames": round(10 * args.scale_frames / scaled10 / ideal_fps, 3),
                    "goal": ">= 0.9",
                },
                "memory": {
                    "peak_pss_bytes_1x": memory_1x.peak_pss,
                    "peak_pss_bytes_10x": memory_10x.peak_pss,
                    "ratio": round(memory_10x.peak_pss / memory_1x.peak_pss, 3),
                    "goal": "<= 1.2",
                    # Shared pages counted once per process that maps them: grows as more workers
                    # touch more of the object store's pages, which PSS shows are the same pages.
                    "peak_rss_sum_bytes_1x": memory_1x.peak_rss,
                    "peak_rss_sum_bytes_10x": memory_10x.peak_rss,
                    "rss_sum_ratio": round(memory_10x.peak_rss / memory_1x.peak_rss, 3),
                },
            },
        )
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
