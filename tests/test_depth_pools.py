"""The depth-pools layout: pool sizing (no Ray), the restorer's three steps against its fused path
(no Ray), and the job on a real local Ray with `routing="depth-pools"`."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.deblur.depth_pools import (
    DepthGroup,
    EncodedBatch,
    EncodedFrame,
    ExitMix,
    assign,
    pool_sizes,
    prior_histogram,
    work_per_depth,
)
from pipeline.deblur.job import RestoreOptions
from pipeline.deblur.manifests import read_manifests
from pipeline.deblur.ray import driver
from pipeline.deblur.restorer import FrameRestorer
from pipeline.formats.frames import FrameIn, FrameOut
from pipeline.formats.shards import Sample
from pipeline.store.storage import Store
from tests.deblur_setup import (
    ActorKiller,
    Model,
    input_shards,
    pixels,
    restore_u8,
    routing_model,
    run_record,
    tar_bytes,
)
from tests.media import read_samples
from tests.s3server import S3Server


def encoded(*depths: list[int]) -> EncodedBatch:
    frames = tuple(EncodedFrame(f"k{i}", (64, 64), np.array(d, dtype=np.int64), 1.0) for i, d in enumerate(depths))
    return EncodedBatch(frames, ())


def test_pools_follow_the_work_and_every_busy_depth_gets_an_actor() -> None:
    assert work_per_depth([5, 10, 0, 2, 1]) == [10.0, 0.0, 6.0, 4.0]
    assert pool_sizes([10, 0, 30, 0], 4) == [1, 0, 3, 0]
    assert pool_sizes([10, 20, 30, 40], 4) == [1, 1, 1, 1]
    assert pool_sizes([1, 2, 30, 40], 2) == [0, 0, 1, 1]  # scarce actors go to the busiest depths
    assert sum(pool_sizes([3, 1, 4, 1], 7)) == 7
    assert pool_sizes([0, 0, 0, 0], 2) == [2, 0, 0, 0]
    # Consecutive actor runs per depth; a depth without actors of its own borrows one.
    assert assign([1, 0, 2, 0], 3) == [[0], [1], [1, 2], [0]]
    # The prior: every class equally likely at its exit-table depth.
    assert prior_histogram((4, 4, 3, 3, 2, 1), 4) == pytest.approx([0, 64 / 6, 64 / 6, 128 / 6, 128 / 6])


def test_pools_rebalance_when_the_exit_mix_shifts() -> None:
    mix = ExitMix((4, 4, 3, 3, 2, 1), 4, window=8)
    assert mix.sizes(4) == [1, 1, 1, 1]  # the prior alone: work at every depth
    for _ in range(8):  # easy frames: everything leaves after column 1
        mix.observe(encoded([1] * 40))
    easy = mix.sizes(6)
    for _ in range(8):  # then hard ones: everything runs all 4 columns
        mix.observe(encoded([4] * 40))
    hard = mix.sizes(6)
    assert easy[0] == max(easy) >= 3 and hard[3] == max(hard) >= 3, (easy, hard)
    assert mix.histogram()[1] == pytest.approx(64 / 6)  # the easy frames left the window


def test_each_actor_runs_as_many_torch_threads_as_it_has_cpus_unless_told() -> None:
    # Encoders and pool actors may differ in size (--cpus-per-encoder, --cpus-per-worker).
    assert driver.actor_options(RestoreOptions(), 3).threads == 3
    assert driver.actor_options(RestoreOptions(), 0.5).threads == 1
    assert driver.actor_options(RestoreOptions(threads=2, exit=3), 6) == RestoreOptions(threads=2, exit=3)


def test_batch_summaries() -> None:
    batch = encoded([0, 1, 3, 3], [3, 1])
    assert batch.depths_present() == [1, 3]
    assert batch.histogram(4) == [1, 2, 0, 3, 0]


@pytest.fixture(scope="module")
def model() -> Model:
    return routing_model()


def test_the_three_steps_give_what_the_fused_restorer_gives(model: Model) -> None:
    rng = np.random.default_rng(3)
    sizes = [(72, 88), (72, 88), (17, 23), (1, 1), (61, 97)]  # shared, odd, smaller than a patch
    frames = [
        FrameIn(f"f{i}", "png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), Sample(f"f{i}", {"png": b""}))
        for i, (h, w) in enumerate(sizes)
    ]
    restorer = FrameRestorer(model.model)
    fused = restorer(frames)
    batch, *groups = restorer.encode_by_depth(frames)
    assert isinstance(batch, EncodedBatch) and all(isinstance(g, DepthGroup) for g in groups)
    assert len(groups) == model.model.num_columns
    residuals = [restorer.decode_depth(g) for g in groups if isinstance(g, DepthGroup) and g.parts]
    routed = restorer.finish_routed(frames, batch, *residuals)
    for frame, a, b in zip(frames, fused, routed, strict=True):
        assert isinstance(a, FrameOut) and isinstance(b, FrameOut)
        assert a.depth_histogram == b.depth_histogram and a.patches == b.patches
        got, want = pixels(b.sample.members), pixels(a.sample.members)
        assert np.abs(got.astype(int) - want).max() <= 1, frame.key
        assert np.abs(got.astype(int) - restore_u8(model.model, frame.rgb)).max() <= 1, frame.key


class FailingDecoder(FrameRestorer):
    """Decodes every depth but 3 in its pool; a depth-3 group fails as an out-of-memory would."""

    def decode_depth(self, group: DepthGroup) -> DepthGroup:
        if group.depth == 3:
            raise RuntimeError("depth 3 pool: out of memory (test)")
        return super().decode_depth(group)


def make_failing() -> FailingDecoder:
    m = routing_model().model
    return FailingDecoder(m)


# ---- the job on a real local Ray -----------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, dict[str, np.ndarray]]:
    return input_shards(tmp_path_factory, "pools-in")


def pools_job(source: Store, output: Store, **kw: object) -> driver.DeblurJob:
    resources = driver.Resources(workers=2, cpus_per_worker=0.5, cpus_per_encoder=0.5)
    return driver.DeblurJob(
        source.url,
        output.url,
        frames_per_batch=3,
        stall_timeout_s=120,
        routing="depth-pools",
        resources=resources,
        **kw,
    )


def run(job: driver.DeblurJob, model: Model) -> driver.RunSummary:
    return driver.run(job, model.model)


@pytest.fixture(scope="module")
def reference(local_ray: None, inputs: tuple[Store, dict], model: Model, tmp_path_factory: pytest.TempPathFactory):
    output = Store(str(tmp_path_factory.mktemp("pools-ref")))
    return output, run(pools_job(inputs[0], output), model)


@pytest.mark.ray
def test_depth_pools_job_deblurs_every_frame_and_reruns_byte_identical(
    reference: tuple[Store, driver.RunSummary], inputs: tuple[Store, dict], model: Model, tmp_path: Path
) -> None:
    output, summary = reference
    source, originals = inputs
    out = read_samples(output)
    assert sorted(out) == sorted(originals) and summary.frames == 10 and summary.quarantined == 0
    source_samples = read_samples(source)
    for key, rgb in originals.items():
        tolerance = 4 if "jpg" in out[key] else 1  # JPEG members are re-encoded as JPEG
        assert np.abs(pixels(out[key]).astype(int) - restore_u8(model.model, rgb)).mean() <= tolerance, key
        assert {m: v for m, v in out[key].items() if m not in ("png", "jpg")} == {
            m: v for m, v in source_samples[key].items() if m not in ("png", "jpg")
        }
    record = run_record(output)
    assert record["options"]["routing"] == "depth-pools" and record["encoders"] == 1 and record["workers"] == 2
    assert record["devices"] == {"cpu": 3}  # 2 pool actors + 1 encoder, all with the model on the CPU
    assert record["precisions"] == {"fp32": 3}  # auto: fp32 on the CPU
    assert record["pool_plans"] and all(sum(p) == 2 for p in record["pool_plans"])
    again = Store(str(tmp_path / "again"))
    run(pools_job(source, again), model)
    assert tar_bytes(again) == tar_bytes(output)


@pytest.mark.ray
def test_a_killed_pool_actor_and_a_killed_encoder_lose_and_duplicate_nothing(
    reference: tuple[Store, driver.RunSummary], inputs: tuple[Store, dict], model: Model, tmp_path: Path
) -> None:
    faulty = Store(str(tmp_path / "faulty"))
    with ActorKiller("adarevd-restorer-", "adarevd-encoder-") as killer:
        summary = run(pools_job(inputs[0], faulty), model)
    assert len(killer.killed) == 2 and killer.mid_run
    assert summary.frames == 10 and summary.quarantined == 0
    assert tar_bytes(faulty) == tar_bytes(reference[0])


@pytest.mark.ray
def test_a_failing_depth_pool_falls_back_to_the_fused_path(
    local_ray: None, inputs: tuple[Store, dict], model: Model, tmp_path: Path
) -> None:
    source, originals = inputs
    output = Store(str(tmp_path / "fallback"))
    summary = driver.run(pools_job(source, output), model.model, hooks=driver.Hooks(make_restorer=make_failing))
    assert summary.frames == 10 and summary.quarantined == 0
    out = read_samples(output)
    for key, rgb in originals.items():
        tolerance = 4 if "jpg" in out[key] else 1
        assert np.abs(pixels(out[key]).astype(int) - restore_u8(model.model, rgb)).mean() <= tolerance, key
    # Every frame with depth-3 patches says how it was decoded (so do its batch-mates).
    rows = read_manifests(output)[0].to_pylist()
    noted = {r["key"] for r in rows if "decoded on the fused path: RuntimeError: depth 3 pool" in (r["notes"] or "")}
    deep = {r["key"] for r in rows if r["depth_histogram"][3] > 0}
    assert deep and deep <= noted, (deep, noted)


@pytest.mark.ray
@pytest.mark.s3
def test_depth_pools_from_and_to_s3_give_the_local_bytes(
    local_ray: None,
    s3: S3Server,
    inputs: tuple[Store, dict],
    reference: tuple[Store, driver.RunSummary],
    model: Model,
) -> None:
    prefix = f"s3://{s3.bucket}/pools-{time.time_ns()}"
    source, output = Store(f"{prefix}/in", s3.storage_options), Store(f"{prefix}/out", s3.storage_options)
    for name, data in tar_bytes(inputs[0]).items():
        source.commit_bytes(name, data)
    summary = driver.run(pools_job(source, output), model.model, options=s3.storage_options)
    assert summary.frames == 10 and tar_bytes(output) == tar_bytes(reference[0])
    assert s3.secret_key not in output.read_bytes("_run.json").decode()
