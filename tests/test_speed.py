"""The fast path (`adarevd.speed`): compiled restores match eager ones; auto compiles only long runs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from adarevd.speed import BF16_CAPABILITY, COMPILE_MIN_PIXELS, autocast_dtype, precision_for, worth_compiling
from jobs.cli import main
from pipeline.deblur.job import COMPILE_MIN_BYTES, DeblurJob, InvalidInput, Resources, RestoreOptions


def test_auto_compiles_only_runs_long_enough_to_repay_it() -> None:
    assert not worth_compiling("auto", COMPILE_MIN_PIXELS - 1) and worth_compiling("auto", COMPILE_MIN_PIXELS)
    assert worth_compiling("on", 0) and not worth_compiling("off", 10 * COMPILE_MIN_PIXELS)
    auto = RestoreOptions()
    assert auto.compile == "auto"
    assert auto.compile_for(COMPILE_MIN_BYTES - 1).compile == "off"
    assert auto.compile_for(COMPILE_MIN_BYTES).compile == "on"
    assert RestoreOptions(compile="off").compile_for(10 * COMPILE_MIN_BYTES).compile == "off"
    with pytest.raises(InvalidInput, match="--compile"):
        RestoreOptions(compile="fast")  # type: ignore[arg-type]


def test_precision_auto_is_fp32_on_the_cpu_and_a_given_precision_is_kept() -> None:
    cpu = torch.device("cpu")
    assert RestoreOptions().precision == "auto" and precision_for("auto", cpu) == "fp32"
    assert precision_for("bf16", cpu) == "bf16" and precision_for("fp32", cpu) == "fp32"
    assert autocast_dtype("bf16") == torch.bfloat16 and autocast_dtype("fp32") is None
    if torch.cuda.is_available():  # the rule on this machine's card
        native = torch.cuda.get_device_capability() >= BF16_CAPABILITY
        assert precision_for("auto", torch.device("cuda")) == ("bf16" if native else "fp32")
    with pytest.raises(ValueError, match="precision"):
        precision_for("fp16", cpu)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="--precision"):
        RestoreOptions(precision="fp16")  # type: ignore[arg-type]
    # The job decides auto where its resources do: fp32 without GPUs; with them each restorer decides.
    cpus, gpus = ({"CPU": 4.0}, {"CPU": 4.0, "GPU": 1.0})
    assert DeblurJob("in", "out").resolved(cpus).restore.precision == "fp32"
    assert DeblurJob("in", "out").resolved(gpus).restore.precision == "auto"
    assert DeblurJob("in", "out", restore=RestoreOptions(precision="bf16")).resolved(cpus).restore.precision == "bf16"
    no_gpu = DeblurJob("in", "out", resources=Resources(gpus_per_worker=0))
    assert no_gpu.resolved(gpus).restore.precision == "fp32"


@pytest.mark.slow
def test_a_compiled_restore_matches_the_eager_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for setting in ("off", "on"):
        arguments = ["restore", "--exit", "1", "--compile", setting, "--output", str(tmp_path / setting)]
        assert main(arguments) == 0  # the bundled demo image, full frame
        assert ("compiled with torch.compile" in capsys.readouterr().out) == (setting == "on")
    eager, compiled = (cv2.imread(str(tmp_path / s / "demo_blurry.deblurred.png")).astype(int) for s in ("off", "on"))
    assert np.abs(eager - compiled).max() <= 1  # float rounding of other kernels: at most one level
    assert (eager != compiled).mean() < 1e-3
