"""How a deblur job's resources are decided for a cluster: GPU shares by default where there are GPUs,
actor counts by what fits, the batch default by device; and a GPU share that torch cannot use stops the
run before any shard, saying what to do."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from adarevd.speed import precision_for
from pipeline.deblur.job import DeblurJob, Resources, RestoreOptions
from pipeline.store.storage import Store
from tests.deblur_setup import bundled_model, input_shards, run_record


def resolved(cluster: dict[str, float], routing: str = "fused", **kw: float) -> Resources:
    return Resources(**kw).resolve(cluster, routing)  # type: ignore[arg-type]


def test_a_cpu_cluster_gets_one_restorer_per_cpu_and_no_gpu() -> None:
    r = resolved({"CPU": 4})
    assert (r.workers, r.gpus_per_worker, r.gpus_per_encoder, r.encoders, r.shards_in_flight) == (4, 0, 0, 0, 5)
    assert not r.uses_gpus()
    assert DeblurJob("in", "out").resolved({"CPU": 4}).batch_frames() == 1


def test_a_gpu_cluster_gets_a_gpu_per_restorer_and_gpu_batches_by_default() -> None:
    r = resolved({"CPU": 16, "GPU": 2})
    assert (r.workers, r.gpus_per_worker, r.gpus_per_encoder) == (2, 1.0, 0.0)
    assert DeblurJob("in", "out").resolved({"CPU": 16, "GPU": 2}).batch_frames() == 16
    # Fewer CPUs than GPUs: the CPUs limit the actors.
    assert resolved({"CPU": 1, "GPU": 4}).workers == 1


def test_depth_pools_on_a_gpu_share_each_card_in_quarters() -> None:
    r = resolved({"CPU": 16, "GPU": 1}, "depth-pools")
    assert (r.encoders, r.gpus_per_encoder, r.workers, r.gpus_per_worker) == (1, 0.25, 3, 0.25)
    assert DeblurJob("in", "out", routing="depth-pools").resolved({"CPU": 16, "GPU": 1}).batch_frames() == 16


def test_given_gpu_shares_are_kept_and_the_other_defaults_to_zero() -> None:
    cpus_only = resolved({"CPU": 8, "GPU": 2}, gpus_per_worker=0)
    assert (cpus_only.workers, cpus_only.gpus_per_worker, cpus_only.uses_gpus()) == (8, 0.0, False)
    pools = resolved({"CPU": 8, "GPU": 1}, "depth-pools", gpus_per_worker=0.5)
    assert (pools.gpus_per_worker, pools.gpus_per_encoder, pools.workers) == (0.5, 0.0, 2)
    assert resolved({"CPU": 8, "GPU": 2}, gpus_per_worker=0.5).workers == 4
    assert resolved({"CPU": 8, "GPU": 1}, gpus_per_worker=1 / 3).workers == 3  # not 2 by float rounding
    # Given counts stay as given; a fused job holds no encoder share.
    assert resolved({"CPU": 8}, "fused", workers=3, gpus_per_encoder=0.5) == Resources(
        workers=3, gpus_per_worker=0.0, gpus_per_encoder=0.0, encoders=0, shards_in_flight=4
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RestoreOptions(exit=-1), "--exit must be 'adaptive' or a depth >= 0, got -1"),
        (lambda: RestoreOptions(exit="fast"), "--exit must be 'adaptive' or a depth >= 0, got 'fast'"),  # type: ignore[arg-type]
        (lambda: RestoreOptions(exit=True), "--exit must be"),
        (lambda: RestoreOptions(jpeg_quality=0), "jpeg_quality must be 1..100, got 0"),
        (lambda: RestoreOptions(max_frame_pixels=-5), "--max-frame-pixels must be >= 0 (0: no limit), got -5"),
        (lambda: Resources(workers=-2), "--workers must be >= 0, got -2"),
        (lambda: Resources(cpus_per_encoder=-0.5), "--cpus-per-encoder must be >= 0, got -0.5"),
        (lambda: Resources(gpus_per_worker=-1), "--gpus-per-worker must be >= 0 (fractions are fine), got -1"),
        (lambda: DeblurJob("in", "out", routing="pools"), "--routing must be 'fused' or 'depth-pools', got 'pools'"),  # type: ignore[arg-type]
        (lambda: DeblurJob("in", "out", frames_per_batch=-1), "--frames-per-batch must be >= 0 (0: by device)"),
        (lambda: DeblurJob("in", "out", flush_timeout_s=-1), "--flush-timeout must be seconds >= 0 (0: off)"),
        (lambda: DeblurJob("in", "out", max_frames=0), "--max-frames must be >= 1, got 0"),
        (lambda: DeblurJob("in", "out", stall_timeout_s=0), "--stall-timeout must be seconds > 0, got 0"),
        (lambda: DeblurJob("in", "out", lock_stale_s=-1), "lock_stale_s must be seconds > 0, got -1"),
        (lambda: DeblurJob("in", "out", storage_retry_s=-3), "--storage-retry must be seconds >= 0, got -3"),
    ],
)
def test_a_bad_setting_is_refused_by_its_flag_when_the_job_is_made(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        make()
    assert str(caught.value).startswith(message), caught.value


def test_the_defaults_and_every_edge_value_are_accepted() -> None:
    edges = DeblurJob(
        "in",
        "out",
        RestoreOptions(exit=0, jpeg_quality=100, max_frame_pixels=0),
        Resources(workers=0, cpus_per_worker=0, gpus_per_worker=0, encoders=0, gpus_per_encoder=0.25),
        routing="depth-pools",
        max_frames=1,
        storage_retry_s=0,
        stall_timeout_s=0.5,
    )
    assert edges.resolved({"CPU": 2}).resources.encoders == 1  # 0 encoders: one, as before
    RestoreOptions(exit=4).check_model(4)
    with pytest.raises(
        ValueError, match=r"--exit must be 'adaptive' or a depth 0\.\.4 for this model \(4 columns\), got 5"
    ):
        RestoreOptions(exit=5).check_model(4)


@pytest.fixture(scope="module")
def ray_with_a_gpu() -> Iterator[None]:
    """An embedded Ray that offers one GPU: on a machine without CUDA, a GPU torch cannot use."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.ray
def test_the_job_takes_the_clusters_gpu_by_default_and_stops_if_torch_cannot_use_it(
    ray_with_a_gpu: None, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from pipeline.deblur.ray import driver

    source, originals = input_shards(tmp_path_factory, "gpu-default-in")
    output = Store(str(tmp_path / "out"))
    job = DeblurJob(source.url, output.url, stall_timeout_s=120)
    if torch.cuda.is_available():  # on the device machine: the default run is on the card
        summary = driver.run(job, bundled_model().model)
        assert summary.frames == len(originals) and summary.devices == {"cuda": 1}
        assert summary.precisions == {precision_for("auto", torch.device("cuda")): 1}
        assert run_record(output)["options"]["frames_per_batch"] == 16
        return
    with pytest.raises(driver.DeviceError, match=r"GPU shares \(up to 1 each\).*--gpus-per-worker 0"):
        driver.run(job, bundled_model().model)
    assert not output.glob("*.tar") and not output.glob("_manifest/*")  # stopped before any shard
    # The lease is free, and asking for CPUs runs the job on the same cluster.
    cpus = DeblurJob(source.url, output.url, resources=Resources(gpus_per_worker=0), stall_timeout_s=120)
    summary = driver.run(cpus, bundled_model().model)
    assert (summary.frames, summary.devices, summary.workers) == (len(originals), {"cpu": 2}, 2)
    assert summary.precisions == {"fp32": 2}
    assert run_record(output)["options"]["resources"]["gpus_per_worker"] == 0.0
