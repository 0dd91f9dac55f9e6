"""The deblur job with its actors on fractional GPUs (run with ADAREVD_TEST_DEVICE=cuda on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adarevd.speed import precision_for
from jobs.cli import DEFAULT_WEIGHTS
from pipeline.deblur.ray import driver
from pipeline.store.storage import Store
from tests.deblur_setup import bundled_model, input_shards, pixels, restore_u8, run_record, tar_bytes
from tests.media import read_samples

pytestmark = [pytest.mark.gpu, pytest.mark.ray]


@pytest.fixture(scope="module")
def cuda(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("needs CUDA: run with ADAREVD_TEST_DEVICE=cuda on a machine with a GPU")


@pytest.mark.parametrize("routing", ["fused", "depth-pools"])
def test_the_job_on_fractional_gpus_deblurs_every_frame_reproducibly(
    cuda: None, local_ray: None, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, routing: str
) -> None:
    source, originals = input_shards(tmp_path_factory, f"gpu-in-{routing}")
    model = bundled_model()
    resources = driver.Resources(
        workers=2, cpus_per_worker=0.5, gpus_per_worker=0.25, cpus_per_encoder=0.5, gpus_per_encoder=0.25
    )

    def run(output: Store) -> driver.RunSummary:
        job = driver.DeblurJob(source.url, output.url, stall_timeout_s=300, resources=resources, routing=routing)  # type: ignore[arg-type]
        return driver.run(job, model.model, weight_files=[str(DEFAULT_WEIGHTS)])

    first = Store(str(tmp_path / "first"))
    summary = run(first)
    assert summary.frames == 10 and summary.quarantined == 0
    assert set(summary.devices) == {"cuda"}, summary.devices  # every actor's model is on the GPU
    assert set(summary.precisions) == {precision_for("auto", torch.device("cuda"))}  # bf16 from Ampere on
    assert run_record(first)["options"]["frames_per_batch"] == 16  # the GPU default
    out = read_samples(first)
    for key, rgb in originals.items():  # against restore on the CPU: float differences only
        tolerance = 4 if "jpg" in out[key] else 1
        assert np.abs(pixels(out[key]).astype(int) - restore_u8(model.model, rgb)).mean() <= tolerance, key
    again = Store(str(tmp_path / "again"))
    run(again)
    assert tar_bytes(again) == tar_bytes(first)
