"""The recipe behind the bundled weights: it runs end to end on the test device (CUDA with
ADAREVD_TEST_DEVICE=cuda), and the bundled file says it was made by the `cpu` preset."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import adarevd
from jobs.cli import DEFAULT_WEIGHTS, RECIPE_FIELDS, main, parser, recipe_overrides
from jobs.default_weights import RECIPES, Recipe, device_name, make_default_weights
from jobs.models import load_model


def provenance(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["adarevd.provenance"])


def test_a_short_recipe_trains_calibrates_and_writes_loadable_weights(device: torch.device, tmp_path: Path) -> None:
    recipe = Recipe(images=("camera",), batch=2, crop=64, pretrain_iterations=4, stage1_iterations=3,
                    stage2_iterations=3)  # fmt: skip
    out = tmp_path / "tiny.safetensors"
    lines: list[str] = []
    metrics = make_default_weights(out, recipe, lines.append, device=str(device))

    model, _, _ = load_model("adarevd-tiny", [str(out)], torch.device("cpu"))  # strict
    # Parameters with a fixed start (zeros, ones, 0.5) in each stage's part: all of them moved.
    untrained = adarevd.AdaRevD(adarevd.PRESETS["adarevd-tiny"]).state_dict()
    trained = model.state_dict()
    for name in ("encoder.encoders.0.0.beta", "conv_features.0", "subdenets.0.alpha0", "outputs.3.0.weight",
                 "ape.1.beta"):  # fmt: skip
        assert not torch.equal(trained[name], untrained[name]), f"{name} was not trained"
    made = provenance(out)
    assert made["trained_on"] == device_name(str(device))
    assert made["recipe"] == json.loads(json.dumps(asdict(recipe)))
    assert made["held_out_metrics"] == metrics and metrics["frames"] == 2  # camera x 2 held-out seeds
    assert tuple(model.config.exit_table) == tuple(made["calibration"]["exit_table"])
    assert any(line.startswith("columns: 3/3") for line in lines)


def test_the_bundled_weights_come_from_the_cpu_recipe() -> None:
    made = provenance(DEFAULT_WEIGHTS)
    cpu = asdict(RECIPES["cpu"])
    # Files written before `images` joined the recipe recorded it beside the recipe; before `ema_warmup`
    # joined it, every EMA was plain.
    recorded = made["recipe"] | {"images": made.get("images", made["recipe"].get("images"))}
    assert {"ema_warmup": False} | recorded == json.loads(json.dumps(cpu))


def test_the_cli_offers_every_recipe_and_overrides_its_fields() -> None:
    for name in RECIPES:
        assert parser().parse_args(["make-default-weights", "--recipe", name]).recipe == name
    with pytest.raises(SystemExit):
        parser().parse_args(["make-default-weights", "--recipe", "nonesuch"])
    args = parser().parse_args(["make-default-weights", "--recipe", "gpu", "--stage1-iterations", "7"])
    assert recipe_overrides(args) == {"stage1_iterations": 7}
    args = parser().parse_args(["make-default-weights", "--recipe", "cpu", "--ema-warmup"])
    assert recipe_overrides(args) == {"ema_warmup": True}
    assert set(RECIPE_FIELDS) <= set(asdict(Recipe()))


def test_a_device_this_machine_lacks_is_refused_before_any_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last card: "cuda:0" where there is none
    for device, message in ((missing, "CUDA device(s) visible"), ("bogus", "not a device"), ("meta", "only cpu")):
        out = tmp_path / f"{device}.safetensors"
        assert main(["make-default-weights", "--device", device, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.exists()


class Stopped(Exception):
    pass


def test_a_recipe_stopped_after_each_stage_resumes_from_its_work_folder_to_the_unbroken_weights(
    tmp_path: Path,
) -> None:
    recipe = Recipe(images=("camera",), batch=2, crop=64, pretrain_iterations=3, stage1_iterations=3,
                    stage2_iterations=3)  # fmt: skip
    make_default_weights(tmp_path / "unbroken.safetensors", recipe, lambda line: None)

    def stop_when(prefix: str) -> Callable[[str], None]:
        def log(line: str) -> None:
            if line.startswith(prefix):
                raise Stopped(line)

        return log

    work, out = tmp_path / "work", tmp_path / "resumed.safetensors"
    for stage in ("columns", "classifier"):  # the first line of a stage comes after the one before is kept
        with pytest.raises(Stopped):
            make_default_weights(out, recipe, stop_when(stage), work=work)
    assert sorted(p.name for p in work.iterdir()) == ["columns.safetensors", "encoder.safetensors"]
    lines: list[str] = []
    make_default_weights(out, recipe, lines.append, work=work)
    assert [line.split(":")[0] for line in lines if "not trained again" in line] == ["encoder", "columns"]
    a, b = load_file(str(tmp_path / "unbroken.safetensors")), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match=r"encoder.safetensors was made with another recipe.*another --work folder"):
        make_default_weights(out, replace(recipe, seed=1), lines.append, work=work)
    (work / "columns.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"columns.safetensors is not a kept stage"):
        make_default_weights(out, recipe, lines.append, work=work)
