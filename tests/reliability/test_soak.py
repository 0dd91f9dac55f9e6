"""Load: the same job on 1x and 10x the frames, sampled while it runs. Memory of every process of the
run (driver + Ray) must stay flat (peak at 10x <= 1.2x the peak at 1x), throughput steady across the
long run, and neither the driver's open files nor Ray's object store may grow with the number of frames."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from jobs.cli import DEFAULT_WEIGHTS
from pipeline.deblur.manifests import read_manifests
from pipeline.deblur.ray import driver
from pipeline.formats import images
from pipeline.formats.shards import Sample, encode_shard
from pipeline.store.storage import Store
from tests.deblur_setup import bundled_model
from tests.reliability.conftest import Entry, audit

pytestmark = [pytest.mark.reliability, pytest.mark.ray, pytest.mark.slow]
PER_SHARD, BASE = 16, 64  # 1x = 64 frames in 4 shards; 10x = 640 in 40


def make_frames(store: Store, count: int) -> set[str]:
    rng = np.random.default_rng(0)
    pictures = [images.encode(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(8)]
    keys = set()
    for s in range(0, count, PER_SHARD):
        samples = [Sample(f"soak_{i:06d}", {"png": pictures[i % 8]}) for i in range(s, s + PER_SHARD)]
        store.commit_bytes(f"soak-{s // PER_SHARD:06d}.tar", encode_shard(samples))
        keys.update(x.key for x in samples)
    return keys


class Sampler:
    """Every 0.25 s: summed RSS of this process and all its descendants (Ray's workers, raylet, GCS),
    and the bytes in Ray's object store."""

    def __init__(self) -> None:
        self.rss: list[int] = []
        self.store: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.25):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
            self.rss.append(total)
            self.store.append(store_used())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def open_files() -> int:
    """Descriptors of the driver: what lives across shards and runs (Ray's worker pool, whose idle
    processes come and go, would hide a leak in noise)."""
    return psutil.Process().num_fds()


def store_used() -> float:
    return ray.cluster_resources().get("object_store_memory", 0) - ray.available_resources().get(
        "object_store_memory", 0
    )


def soak(tmp_path: Path, count: int) -> tuple[Sampler, Store, set[str], driver.RunSummary]:
    source, output = Store(str(tmp_path / f"in{count}")), Store(str(tmp_path / f"out{count}"))
    keys = make_frames(source, count)
    # 16 frames a call: each call's frames (~190 KB) go through Ray's shared object store, not inline.
    job = driver.DeblurJob(
        source.url,
        output.url,
        stall_timeout_s=300,
        frames_per_batch=16,
        resources=driver.Resources(workers=2, cpus_per_worker=1.0),
    )
    with Sampler() as sampler:
        summary = driver.run(job, bundled_model().model, weight_files=[str(DEFAULT_WEIGHTS)])
    return sampler, output, keys, summary


def test_memory_throughput_files_and_objects_stay_flat(local_ray: None, tmp_path: Path, ledger: Entry) -> None:
    soak(tmp_path / "warm", 16)  # Ray's worker pool and imports settle first
    files_before, store_before = open_files(), store_used()
    small, _, small_keys, small_run = soak(tmp_path, BASE)
    files_small = open_files()
    large, output, keys, large_run = soak(tmp_path, 10 * BASE)
    files_large, store_after = open_files(), store_used()
    assert small_run.frames == BASE and large_run.frames == 10 * BASE
    peak_small, peak_large = max(small.rss), max(large.rss)
    ratio = peak_large / peak_small
    # Steady throughput: the second half of the long run is as fast as the first (within 25%).
    done = sorted(r["finished_at"] for r in read_manifests(output)[0].to_pylist())
    half = len(done) // 2
    first, second = half / (done[half] - done[0]), (len(done) - half) / (done[-1] - done[half])
    print(
        f"soak: peak RSS {peak_small / 2**30:.2f} GiB at {BASE} frames, {peak_large / 2**30:.2f} GiB at "
        f"{10 * BASE} ({ratio:.3f}x); frames/s {first:.1f} then {second:.1f}; open files {files_before} -> "
        f"{files_small} -> {files_large}; object store peak {max(small.store):.0f} / {max(large.store):.0f} B, "
        f"after {store_after:.0f} B"
    )
    assert ratio <= 1.2, ratio
    assert second >= 0.75 * first, (first, second)
    # One descriptor leaked per shard would add 36 (40 shards vs 4).
    assert files_large <= files_small + 4, (files_small, files_large)
    assert max(large.store) > 0  # frames did go through the object store...
    assert store_after <= store_before + 2**20, (store_before, store_after)  # ...and nothing was left there
    assert max(large.store) <= 1.5 * max(small.store) + 2**20  # in flight: bounded, not growing with the input
    ledger.frames = len(keys) + len(small_keys)
    ledger.lost, ledger.duplicates = audit(output, keys)
    assert (ledger.lost, ledger.duplicates) == (0, 0)
