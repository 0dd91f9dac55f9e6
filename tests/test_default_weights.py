"""The recipe behind the bundled weights: it runs end to end on the test device (CUDA with
ADAREVD_TEST_DEVICE=cuda), and the bundled file says it was made by the `cpu` preset."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import adarevd
from adarevd.metrics import psnr
from jobs.cli import DEFAULT_WEIGHTS, RECIPE_FIELDS, main, parser, recipe_overrides
from jobs.default_weights import (
    ASSETS,
    DEMO_IMAGE,
    RECIPES,
    SHARP_STATES,
    TEST_SEEDS,
    Marks,
    Recipe,
    device_name,
    identity_pairs,
    make_default_weights,
    sharp_frames,
    to_tensor,
)
from jobs.models import load_model
from pipeline.synth.scenes import SAMPLE_IMAGES, load_sample
from pipeline.train.evaluate import evaluate

# Small photos, one per split, and a few steps of each stage.
SHORT = Recipe(
    train_images=("camera",),
    validation_images=("coins",),
    test_images=("page",),
    identity_per_image=2,
    batch=2,
    crop=64,
    pretrain_iterations=4,
    stage1_iterations=3,
    tune_iterations=3,
    stage2_iterations=3,
)


def provenance(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["adarevd.provenance"])


def test_the_bundled_weights_come_from_the_cpu_recipe() -> None:
    made = provenance(DEFAULT_WEIGHTS)
    assert made["recipe"] == json.loads(json.dumps(asdict(RECIPES["cpu"])))


def test_photos_are_split_by_image_and_the_demo_scenes_are_held_out() -> None:
    recipe = RECIPES["cpu"]
    splits = [set(recipe.train_images), set(recipe.validation_images), set(recipe.test_images)]
    assert all(a.isdisjoint(b) for i, a in enumerate(splits) for b in splits[i + 1 :])
    assert set().union(*splits) <= set(SAMPLE_IMAGES)
    assert {"motorcycle_left", "motorcycle_right"} <= splits[0]  # one scene, two views: one split
    clip = json.loads((ASSETS / "demo_clip.json").read_text())
    assert {clip["scene"], DEMO_IMAGE} <= splits[2]


def test_identity_pairs_are_identical_and_sharp_states_stay_close_to_the_photo() -> None:
    pairs = identity_pairs(("page",), per_image=3)
    assert len(pairs) == 3 and all(a is b for a, b in pairs)
    assert not torch.equal(pairs[0][0], pairs[1][0])  # as shot, then worn
    photo = to_tensor(load_sample("page"))
    for name, frame in sharp_frames(("page",)):
        crop = photo[:, : frame.shape[1], : frame.shape[2]]  # H.264 needs even sides
        assert 28 < psnr(frame[None], crop[None]).item() <= 80, name


def test_every_recipe_field_belongs_to_one_stage() -> None:
    """A field no kept stage names would let a changed recipe re-use stages it changes."""
    named = [f for names in Marks.STAGE_FIELDS.values() for f in names] + list(Marks.LATER_FIELDS)
    assert sorted(named) == sorted(f.name for f in fields(Recipe))


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


@pytest.mark.slow
def test_a_short_recipe_writes_trained_calibrated_weights_and_resumes_a_stopped_run_to_them(
    device: torch.device, tmp_path: Path
) -> None:
    recipe = SHORT
    unbroken = tmp_path / "unbroken.safetensors"
    lines: list[str] = []
    metrics = make_default_weights(unbroken, recipe, lines.append, device=str(device))

    model, _, _ = load_model("adarevd-tiny", [str(unbroken)], torch.device("cpu"))  # strict
    # Parameters with a fixed start (zeros, ones, 0.5) in each stage's part: all of them moved.
    untrained = adarevd.AdaRevD(adarevd.PRESETS["adarevd-tiny"]).state_dict()
    trained = model.state_dict()
    for name in (
        "encoder.encoders.0.0.beta",
        "conv_features.0",
        "subdenets.0.alpha0",
        "outputs.3.0.weight",
        "ape.1.beta",
    ):
        assert not torch.equal(trained[name], untrained[name]), f"{name} was not trained"
    made = provenance(unbroken)
    assert made["trained_on"] == device_name(str(device))
    assert made["recipe"] == json.loads(json.dumps(asdict(recipe)))
    assert made["test_metrics"] == metrics and metrics["blurred"]["frames"] == len(TEST_SEEDS)  # page x 8 seeds
    assert metrics["sharp_in"]["frames"] == len(SHARP_STATES) and "worst_class_gain_db" in metrics["blurred"]
    assert tuple(model.config.exit_table) == tuple(made["calibration"]["exit_table"])
    assert any(line.startswith("columns: 3/3") for line in lines)

    # Stopped after each stage, then re-run with the same work folder: the unbroken run's weights.
    def stop_when(prefix: str) -> Callable[[str], None]:
        def log(line: str) -> None:
            if line.startswith(prefix):
                raise Stopped(line)

        return log

    work, out = tmp_path / "work", tmp_path / "resumed.safetensors"
    for stage in ("columns", "tuned", "classifier"):  # the first line of a stage comes after the one before is kept
        with pytest.raises(Stopped):
            make_default_weights(out, recipe, stop_when(stage), device=str(device), work=work)
    assert sorted(p.name for p in work.iterdir()) == ["columns.safetensors", "encoder.safetensors", "tuned.safetensors"]
    lines.clear()
    make_default_weights(out, recipe, lines.append, device=str(device), work=work)
    assert [line.split(":")[0] for line in lines if "not trained again" in line] == ["encoder", "columns", "tuned"]
    a, b = load_file(str(unbroken)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Another classifier schedule trains the classifier only; another tuning is refused at its stage.
    lines.clear()
    longer = replace(recipe, stage2_iterations=recipe.stage2_iterations + 1)
    make_default_weights(tmp_path / "longer.safetensors", longer, lines.append, device=str(device), work=work)
    assert [line.split(":")[0] for line in lines if "not trained again" in line] == ["encoder", "columns", "tuned"]
    with pytest.raises(ValueError, match=r"tuned.safetensors was made with another recipe"):
        make_default_weights(out, replace(recipe, tune_lr=1e-4), lines.append, device=str(device), work=work)

    # Another recipe's folder, or a file that is no kept stage, is refused before any pair is made.
    made_pairs: list[str] = []
    with pytest.raises(ValueError, match=r"encoder.safetensors was made with another recipe.*another --work folder"):
        make_default_weights(out, replace(recipe, seed=1), made_pairs.append, device=str(device), work=work)
    (work / "columns.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"columns.safetensors is not a kept stage"):
        make_default_weights(out, recipe, made_pairs.append, device=str(device), work=work)
    assert made_pairs == []  # not even "... training frames on ..."


def test_the_bundled_weights_leave_held_out_sharp_frames_alone() -> None:
    """Sharp frames in, sharp frames out: photos the recipe never trained or calibrated on, as shot,
    JPEG'd, noisy and through H.264, come back within 40 dB of themselves (35 dB for the worst) with no
    tone shift, through the bundled weights at the default (adaptive) exit."""
    model, _, _ = load_model("adarevd-tiny", [], torch.device("cpu"))
    frames = [(frame, frame) for _, frame in sharp_frames(RECIPES["cpu"].test_images)]
    sharp = evaluate(model, frames)["sharp_in"]
    assert sharp["frames"] == 3 * len(SHARP_STATES)
    assert sharp["psnr_mean"] >= 40 and sharp["psnr_worst"] >= 35, sharp
    assert max(abs(v) for v in sharp["tone_shift"]) < 0.5, sharp
