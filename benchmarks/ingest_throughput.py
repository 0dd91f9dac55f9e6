"""Ingest frames/s vs a bare loop (decode + PNG encode, nothing else) on the same video.

The bare loop is the floor of work any ingest must do: PyAV decode to BGR (ingest's decoder) and
cv2.imencode(".png") per frame, serially, results thrown away. The same loop with OpenCV's decoder
runs beside it, to show what decoding through PyAV costs. `adarevd ingest` adds the tar writing, SHA-256 of pixels and
bytes, JSON, the index and the commit, and overlaps encoding on a thread pool. Both run in this
process, alternately, and the median of the repeats is compared (goal: ingest >= 0.8x the bare loop).
Ingest is measured with one encode thread (like for like) and with the default (one per CPU), to a
local folder and, with --s3, to the real S3 server (SeaweedFS on loopback) as well.

    python -m benchmarks.ingest_throughput [--frames 60 --size 1280x720 --repeats 3 --s3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2

from benchmarks.common import write
from jobs.data import frame_size
from pipeline.formats.video import Reader, write_video
from pipeline.ingest.run import IngestConfig, ingest
from pipeline.store.storage import Store
from pipeline.synth.blur import synthesize_clip
from pipeline.synth.scenes import load_sample


def bare_loop(video: Path) -> int:
    count = 0
    for decoded in Reader(video, str(video)):
        ok, _ = cv2.imencode(".png", decoded.bgr)
        count += ok
    return count


def opencv_loop(video: Path) -> int:
    capture = cv2.VideoCapture(str(video))
    count = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        ok, _ = cv2.imencode(".png", frame)
        count += ok
    capture.release()
    return count


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--size", type=frame_size, default=(720, 1280), help="WIDTHxHEIGHT")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--s3", action="store_true", help="also ingest into a SeaweedFS bucket on loopback")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="adarevd-bench-ingest-"))
    server = None
    try:
        video = work / "clip.mp4"
        clip = synthesize_clip(load_sample("astronaut"), 0, frames=args.frames, size=args.size)
        write_video(video, (blurry for blurry, _ in clip), fps=24.0)
        del clip
        assert bare_loop(video) == args.frames

        def run_ingest(url: str, workers: int, options: dict | None = None) -> None:
            config = IngestConfig(workers=workers, overwrite=True)
            summary = ingest([str(video)], Store(url, options or {}), config, options=options)
            assert summary.frames == args.frames

        targets: dict[str, Callable[[], object]] = {
            "bare_loop": lambda: bare_loop(video),
            "bare_loop_opencv_decode": lambda: opencv_loop(video),
            "ingest_local_1_thread": lambda: run_ingest(str(work / "out1"), 1),
            "ingest_local_default": lambda: run_ingest(str(work / "outn"), 0),
        }
        if args.s3:
            from tests.s3server import S3Server

            server = S3Server(work / "s3").start()
            url = f"s3://{server.bucket}/bench"
            targets["ingest_s3_default"] = lambda: run_ingest(url, 0, server.storage_options)
        for fn in targets.values():  # warm-up: page cache, thread pool, connections
            fn()
        seconds = {name: median_seconds(fn, args.repeats) for name, fn in targets.items()}
        fps = {name: args.frames / s for name, s in seconds.items()}
        ratios = {name: fps[name] / fps["bare_loop"] for name in fps if name != "bare_loop"}
        print(f"PyAV decode loop vs OpenCV's: {fps['bare_loop'] / fps['bare_loop_opencv_decode']:.3f}x")
        write(
            "ingest_throughput",
            {
                "video": {"frames": args.frames, "width": args.size[1], "height": args.size[0], "codec": "H.264"},
                "repeats": args.repeats,
                "frames_per_second": {k: round(v, 2) for k, v in fps.items()},
                "ratio_vs_bare_loop": {k: round(v, 3) for k, v in ratios.items()},
                "goal": ">= 0.8 for every ingest variant (bare_loop_opencv_decode: for comparison only)",
                "encode_threads_default": os.cpu_count(),
            },
        )
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
