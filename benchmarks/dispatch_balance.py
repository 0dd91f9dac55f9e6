"""Dispatch with one slow restorer: does the work follow the restorers' speeds?

Two fused restorer actors run a stand-in model that sleeps per call (`pipeline_batching.StandIn`);
everything else is the real job (shards, shard workers, routers, the driver). Two runs side by side:

- both restorers at full speed: the throughput of two (T2);
- one of them 3x slower: the ideal, each restorer busy all the time, is T2 x (1 + 1/3) / 2; an even
  split of the batches would give half of that (the fast one idles while the slow one works through
  its half).

Goal: the run with the slow restorer at >= 0.9 of its ideal.

    python -m benchmarks.dispatch_balance [--frames 768 --slowdown 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import adarevd
from benchmarks.common import write
from benchmarks.pipeline_batching import StandIn, StandInRestorer, make_input
from jobs.cli import DEFAULT_WEIGHTS
from pipeline.deblur.ray import driver
from pipeline.store.storage import Store


@dataclass(frozen=True)
class OneSlow:
    """Builds the stand-in in an actor; the first actor to claim `marker` is `slowdown` times slower."""

    stand_in: StandIn
    slowdown: float
    marker: str

    def __call__(self) -> StandInRestorer:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return self.stand_in()
        return Slowed(self.stand_in.a, self.stand_in.b, self.slowdown)


class Slowed(StandInRestorer):
    def __init__(self, a: float, b: float, slowdown: float) -> None:
        super().__init__(a * slowdown, b * slowdown)


def run_once(work: Path, name: str, frames: int, make: object) -> float:
    source, output = Store(str(work / f"in-{name}")), Store(str(work / f"out-{name}"))
    make_input(source, frames)
    job = driver.DeblurJob(
        source.url,
        output.url,
        frames_per_batch=4,
        resources=driver.Resources(workers=2, cpus_per_worker=0.1),
    )
    model = adarevd.AdaRevD(adarevd.read_config(DEFAULT_WEIGHTS))
    summary = driver.run(job, model, hooks=driver.Hooks(make_restorer=make))  # type: ignore[arg-type]
    assert summary.frames == frames, summary
    return frames / summary.processing_seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=768)
    p.add_argument("--slowdown", type=float, default=3.0)
    p.add_argument("--a", type=float, default=0.02, help="stand-in seconds per call (launch)")
    p.add_argument("--b", type=float, default=0.002, help="stand-in seconds per patch")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adarevd-bench-dispatch-"))
    stand_in = StandIn(args.a, args.b)
    try:
        driver.ensure_ray(None, num_cpus=os.cpu_count())
        both_fast = run_once(work, "fast", args.frames, stand_in)
        one_slow = run_once(work, "slow", args.frames, OneSlow(stand_in, args.slowdown, str(work / "slow-claimed")))
        ideal = both_fast * (1 + 1 / args.slowdown) / 2
        write(
            "dispatch_balance",
            {
                "stand_in": {"a_s": args.a, "b_s": args.b, "frames_per_batch": 4, "restorers": 2},
                "frames": args.frames,
                "slowdown": args.slowdown,
                "fps_both_fast": round(both_fast, 2),
                "fps_one_slow": round(one_slow, 2),
                "ideal_fps_one_slow": round(ideal, 2),
                "fraction_of_ideal": round(one_slow / ideal, 3),
                "even_split_fraction_of_ideal": round((both_fast / 2) * 2 / args.slowdown / ideal, 3),
                "goal": ">= 0.9",
            },
        )
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
