"""Training jobs: the paired-shard stream, stages, checkpoints and resume, calibration and eval."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import adarevd
from adarevd.calibration import propose_table
from adarevd.weights import read_state_dict
from jobs.cli import main
from pipeline.formats import images
from pipeline.formats.shards import Sample, encode_shard
from pipeline.formats.sink import ShardLimits
from pipeline.store.storage import Store
from pipeline.synth.pairs import SynthConfig, write_pairs
from pipeline.train import evaluate
from pipeline.train.pair_stream import PairDataError, PairStream, StreamConfig
from pipeline.train.trainer import HISTORY_KEY, TrainError, TrainSpec, train
from tests.s3server import S3Server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory) -> str:
    """8 synthetic 80x80 pairs in 4 shards."""
    url = str(tmp_path_factory.mktemp("paired") / "pairs")
    write_pairs(Store(url), SynthConfig(count=8, size=(80, 80), limits=ShardLimits(max_samples=2)))
    return url


@pytest.fixture(scope="module")
def encoder_weights(paired: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("enc") / "encoder.safetensors")
    train(TrainSpec(kind="encoder", data=paired, output=out, iterations=3, batch=2, crop=64))
    return out


def spec(paired: str, tmp: Path, **kw: object) -> TrainSpec:
    fields: dict = dict(data=paired, output=str(tmp / "out.safetensors"), iterations=6, batch=2, crop=64) | kw
    return TrainSpec(**fields)


# --- the stream ------------------------------------------------------------------------------------


def test_stream_is_reproducible_and_skips_to_any_step(paired: str) -> None:
    config = StreamConfig(batch=3, crop=32, repeats=2, buffer=3, seed=5)
    first = PairStream(Store(paired), config).batches(0)
    run = [next(first) for _ in range(9)]  # 27 crops: past one epoch of 8 pairs x 2
    again = PairStream(Store(paired), config).batches(0)
    for a, b in zip(run, (next(again) for _ in run), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for start in (1, 4, 8):
        skipped = next(PairStream(Store(paired), config).batches(start))
        assert torch.equal(skipped[0], run[start][0]) and torch.equal(skipped[1], run[start][1])
    assert run[0][0].shape == (3, 3, 32, 32)
    assert not torch.equal(run[0][0], run[0][1])  # blurry and sharp differ


def test_workers_stream_disjoint_shards(paired: str, capsys: pytest.CaptureFixture) -> None:
    config = StreamConfig(batch=4, crop=64, repeats=1, buffer=1)
    seen = []
    for rank in (0, 1):
        batches = PairStream(Store(paired), config, rank, 2).batches(0)
        seen.append({tuple(s.flatten()[:16].tolist()) for s in next(batches)[1]})  # 4 crops: its 2 shards
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    with pytest.raises(PairDataError, match="4 shard\\(s\\) for 5 workers") as refused:
        PairStream(Store(paired), config, 0, 5)
    flag = str(refused.value).split("`adarevd synth ")[1].split("`")[0]  # the option it says to use
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert f" {flag} " in capsys.readouterr().out  # synth's own name for it, not an abbreviation


def test_stream_names_shard_and_key_of_bad_pairs(memory_store: Store) -> None:
    png = images.encode(np.zeros((70, 70, 3), np.uint8))
    memory_store.commit_bytes("a.tar", encode_shard([Sample("k1", {"blur.png": png, "json": b"{}"})]))
    with pytest.raises(PairDataError, match=r"a\.tar: sample 'k1' has no sharp\.png"):
        next(PairStream(memory_store, StreamConfig(crop=64)).batches(0))
    small = images.encode(np.zeros((40, 70, 3), np.uint8))
    memory_store.commit_bytes("a.tar", encode_shard([Sample("k2", {"blur.png": small, "sharp.png": small})]))
    with pytest.raises(PairDataError, match="'k2' is 40x70, smaller than the 64 crop"):
        next(PairStream(memory_store, StreamConfig(crop=64)).batches(0))
    with pytest.raises(PairDataError, match=r"no \*\.tar shards"):
        PairStream(Store(memory_store.url + "/empty"), StreamConfig())


# --- stages ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "trained"), [("decoders", ("conv_features", "subdenets", "outputs")), ("classifier", ("ape",))]
)
def test_a_stage_changes_what_it_trains_and_nothing_else(
    kind: str, trained: tuple[str, ...], paired: str, encoder_weights: str, tmp_path: Path
) -> None:
    result = train(spec(paired, tmp_path, kind=kind, weights=(encoder_weights,), iterations=2))
    assert result is not None and math.isfinite(result.loss)
    before, after = load_file(encoder_weights), load_file(str(tmp_path / "out.safetensors"))
    assert before.keys() == after.keys()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(trained)  # every trained part moved; the frozen ones are bit-identical
    history = json.loads(read_state_dict(tmp_path / "out.safetensors")[1][HISTORY_KEY])
    assert [h["kind"] for h in history] == ["encoder", kind]


def test_decoders_tuned_on_the_psnr_loss_from_trained_decoders(
    paired: str, encoder_weights: str, tmp_path: Path
) -> None:
    """The recipe's tuning stage from the CLI's pieces: decoders on L1, then again on the PSNR loss."""
    l1 = str(tmp_path / "l1.safetensors")
    train(spec(paired, tmp_path, kind="decoders", weights=(encoder_weights,), iterations=2, output=l1))
    tuned = train(spec(paired, tmp_path, kind="decoders", weights=(l1,), iterations=2, loss_function="psnr"))
    assert tuned is not None and tuned.loss < -10  # minus a PSNR in dB, not an L1 of a few hundredths
    before, after = load_file(l1), load_file(str(tmp_path / "out.safetensors"))
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"conv_features", "subdenets", "outputs"}
    history = json.loads(read_state_dict(tmp_path / "out.safetensors")[1][HISTORY_KEY])
    assert [(h["kind"], h["loss_function"]) for h in history] == [
        ("encoder", "l1_fft"),
        ("decoders", "l1_fft"),
        ("decoders", "psnr"),
    ]
    with pytest.raises(TrainError, match="--loss is for the encoder and decoders"):
        spec(paired, tmp_path, kind="classifier", weights=(l1,), loss_function="psnr")
    with pytest.raises(TrainError, match="unknown loss 'l2'"):
        spec(paired, tmp_path, kind="encoder", loss_function="l2")


def test_encoder_pretraining_lowers_the_loss(paired: str, tmp_path: Path) -> None:
    losses = []
    train(
        spec(paired, tmp_path, kind="encoder", iterations=60, lr=3e-3, log_every=10),
        on_progress=lambda p: losses.append(p.loss),
    )
    assert len(losses) == 6 and np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])


def test_classifier_thresholds_go_into_the_output_config(paired: str, encoder_weights: str, tmp_path: Path) -> None:
    thresholds = (10.0, 20.0, 30.0, 40.0, 50.0)
    train(
        spec(paired, tmp_path, kind="classifier", weights=(encoder_weights,), iterations=1, psnr_thresholds=thresholds)
    )
    assert adarevd.read_config(tmp_path / "out.safetensors").psnr_thresholds == thresholds
    with pytest.raises(ValueError, match="psnr_thresholds needs 5 values"):
        train(spec(paired, tmp_path, kind="classifier", weights=(encoder_weights,), psnr_thresholds=(10.0, 20.0)))


def test_one_worker_asked_for_a_gpu_trains_on_it_or_is_refused_where_there_is_none(
    paired: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu.safetensors"
    argv = [
        "train",
        "encoder",
        paired,
        "--output",
        str(out),
        "--iterations",
        "2",
        "--batch",
        "2",
        "--crop",
        "64",
        "--gpus-per-worker",
        "1",
    ]
    code = main(argv)
    if torch.cuda.is_available():
        assert code == 0 and out.exists()
    else:  # not silently on the CPU
        assert code == 2 and not out.exists()
        assert "--gpus-per-worker 1: torch" in capsys.readouterr().err


def test_stages_that_need_an_encoder_say_so(paired: str, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="needs --weights with a trained encoder"):
        spec(paired, tmp_path, kind="decoders")
    code = main(["train", "classifier", paired, "--output", str(tmp_path / "x.safetensors")])
    assert code == 2


# --- checkpoints and resume ------------------------------------------------------------------------


class Killed(Exception):
    pass


@pytest.mark.parametrize("kind", ["encoder", "decoders", "classifier"])
def test_resume_reproduces_the_unbroken_run(kind: str, paired: str, encoder_weights: str, tmp_path: Path) -> None:
    weights = () if kind == "encoder" else (encoder_weights,)
    common = dict(kind=kind, weights=weights, checkpoint_every=3, log_every=1)
    unbroken = train(spec(paired, tmp_path, output=str(tmp_path / "a.safetensors"), **common))

    def die_at_5(p: object) -> None:
        if p.step == 5:  # type: ignore[attr-defined]
            raise Killed

    broken = spec(paired, tmp_path, output=str(tmp_path / "b.safetensors"), checkpoints=str(tmp_path / "ck"), **common)
    with pytest.raises(Killed):
        train(broken, on_progress=die_at_5)
    assert not (tmp_path / "b.safetensors").exists()
    resumed = train(broken)
    assert resumed is not None and unbroken is not None and resumed.resumed_from == 3
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.loss == unbroken.loss


def test_resume_refuses_checkpoints_of_another_job(paired: str, tmp_path: Path) -> None:
    first = spec(paired, tmp_path, kind="encoder", iterations=3, checkpoints=str(tmp_path / "ck"), checkpoint_every=3)
    train(first)
    with pytest.raises(TrainError, match="made by another job \\(batch: 2 there, 3 now\\)"):
        train(spec(paired, tmp_path, kind="encoder", iterations=3, batch=3, checkpoints=str(tmp_path / "ck")))


@pytest.mark.slow
def test_cli_training_killed_mid_run_resumes_to_the_same_weights(paired: str, tmp_path: Path) -> None:
    def command(out: str, checkpoints: str) -> list[str]:
        options = ["--iterations", "60", "--batch", "2", "--crop", "64", "--checkpoint-every", "20"]
        return [
            sys.executable,
            "-m",
            "jobs.cli",
            "train",
            "encoder",
            paired,
            "--output",
            out,
            "--checkpoints",
            checkpoints,
            *options,
        ]

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(command(str(tmp_path / "a.safetensors"), str(tmp_path / "ck-a")), cwd=ROOT, env=env, check=True)
    victim = subprocess.Popen(command(str(tmp_path / "b.safetensors"), str(tmp_path / "ck-b")), cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while not (tmp_path / "ck-b" / "latest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL and not (tmp_path / "b.safetensors").exists()
    again = subprocess.run(
        command(str(tmp_path / "b.safetensors"), str(tmp_path / "ck-b")),
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert "resumed at step" in again.stdout
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- calibration and eval --------------------------------------------------------------------------


def test_calibration_picks_the_cheapest_table_within_the_budget() -> None:
    # 2 classes, N = 2. Class 0 patches need both columns; class 1 patches gain nothing from any.
    hard = np.array([[0.04, 0.01, 0.001]])
    easy = np.array([[0.001, 0.001, 0.001]])
    frames = [(np.array([0, 1]), np.concatenate([hard, easy])) for _ in range(3)]
    found = propose_table(frames, num_classes=3, budget_db=0.05)
    assert found.exit_table == (2, 0, 0)  # class 2 never seen: nothing shows columns help it, so depth 0
    assert found.patches_per_class == (3, 3, 0) and found.mean_depth == 1.0 and found.psnr_loss_db == 0.0
    strict = propose_table(frames, num_classes=3, budget_db=0.0)
    assert strict.exit_table == (2, 0, 0)
    # A looser budget buys a shallower exit for class 0: frame MSE (0.01 + 0.001)/2 vs (0.001 + 0.001)/2.
    loose = propose_table(frames, num_classes=3, budget_db=8.0)
    assert loose.exit_table == (1, 0, 0) and loose.psnr_loss_db == pytest.approx(10 * math.log10(5.5), abs=1e-4)


def test_calibration_gives_depth_0_to_a_class_the_columns_make_worse() -> None:
    # Class 0 gains from columns; class 1 (sharp patches) loses at every depth: it must stay untouched,
    # even with a budget so loose that harming it would cost nothing against full depth.
    hard = np.array([[0.04, 0.01, 0.001]])
    sharp = np.array([[0.0001, 0.0004, 0.0002]])
    frames = [(np.array([0, 1]), np.concatenate([hard, sharp])) for _ in range(3)]
    for budget in (0.0, 0.5, 30.0):
        found = propose_table(frames, num_classes=2, budget_db=budget)
        assert found.exit_table[1] == 0, budget
    assert found.gain_per_column[1][0] < 0 and found.gain_per_column[0][1] > 0
    # Against the best table (2, 0), not against full depth (2, 2): the strict budget keeps class 0 at 2.
    assert propose_table(frames, num_classes=2, budget_db=0.0).exit_table == (2, 0)


def test_eval_on_known_pairs(memory_store: Store, tmp_path: Path) -> None:
    sharp = np.full((64, 64, 3), 100, np.uint8)
    sharp[16:48, 16:48] = 180
    shifted = np.clip(sharp.astype(int) + 25, 0, 255).astype(np.uint8)
    samples = [
        Sample("same", {"blur.png": images.encode(sharp), "sharp.png": images.encode(sharp)}),
        Sample("offset", {"blur.png": images.encode(shifted), "sharp.png": images.encode(sharp)}),
    ]
    memory_store.commit_bytes("pairs-000000.tar", encode_shard(samples))
    model = adarevd.AdaRevD(adarevd.PRESETS["adarevd-tiny"])  # fresh heads: the output is the input
    result = evaluate.evaluate(model, evaluate.frames_of(memory_store))
    expected = (80.0 + 20 * math.log10(255 / 25)) / 2  # identical images are capped at 80 dB
    assert result["frames"] == 2 and result["psnr_input"] == pytest.approx(expected, abs=1e-3)
    assert result["psnr_output"] == pytest.approx(expected, abs=1e-3)
    assert result["gain_db"] == pytest.approx(0, abs=1e-3)
    assert result["by_class"]["5"]["ssim_input"] == 1.0 and result["by_class"]["5"]["frames"] == 1
    assert result["by_class"]["1"]["psnr_input"] == pytest.approx(20 * math.log10(255 / 25), abs=1e-3)
    assert result["worst_class_gain_db"] == pytest.approx(0, abs=1e-3) and result["tone_shift"] == [0, 0, 0]
    # The identity pair ("same") is summarised on its own: untouched, so capped at 80 dB, no shift.
    assert result["sharp_in"] == {
        "frames": 1,
        "psnr_mean": 80.0,
        "psnr_worst": 80.0,
        "tone_shift": [0, 0, 0],
        "tone_shift_worst": 0,
    }


def test_eval_reports_the_tone_shift_of_a_model_that_brightens(memory_store: Store) -> None:
    sharp = np.random.default_rng(1).integers(40, 200, (64, 64, 3), dtype=np.uint8)
    samples = [Sample("same", {"blur.png": images.encode(sharp), "sharp.png": images.encode(sharp)})]
    memory_store.commit_bytes("pairs-000000.tar", encode_shard(samples))
    model = adarevd.AdaRevD(adarevd.PRESETS["adarevd-tiny"].with_overrides(exit_table=[4] * 6))
    with torch.no_grad():  # every head adds (+2, 0, -3) levels: a pure tone shift of the output
        for head in model.outputs:
            head[0].bias.copy_(torch.tensor([2.0, 0.0, -3.0]) / 255)
    result = evaluate.evaluate(model, evaluate.frames_of(memory_store))
    assert result["sharp_in"]["tone_shift"] == pytest.approx([2, 0, -3], abs=0.05)
    assert result["sharp_in"]["tone_shift_worst"] == pytest.approx(3, abs=0.05)
    assert result["sharp_in"]["psnr_worst"] == pytest.approx(10 * math.log10(255**2 / (13 / 3)), abs=0.1)
    assert result["worst_class_gain_db"] < -30  # from 80 dB (identical) to about 42


def test_eval_of_a_known_blur_matches_an_independent_computation(memory_store: Store) -> None:
    from skimage.metrics import structural_similarity

    sharp = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    blurred = cv2.blur(sharp, (5, 5))
    samples = [Sample("blur", {"blur.png": images.encode(blurred), "sharp.png": images.encode(sharp)})]
    memory_store.commit_bytes("pairs-000000.tar", encode_shard(samples))
    result = evaluate.evaluate(adarevd.AdaRevD(adarevd.PRESETS["adarevd-tiny"]), evaluate.frames_of(memory_store))
    mse = np.mean((blurred.astype(np.float64) - sharp) ** 2)
    assert result["psnr_input"] == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-3)
    ssim = structural_similarity(
        blurred, sharp, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert result["ssim_input"] == pytest.approx(ssim, abs=1e-4) and result["ssim_input"] < 0.5


def test_calibrate_and_eval_commands(paired: str, encoder_weights: str, tmp_path: Path) -> None:
    out, report = tmp_path / "cal.safetensors", tmp_path / "eval.json"
    assert main(["calibrate", paired, "--weights", encoder_weights, "--output", str(out), "--budget-db", "0.1"]) == 0
    metadata = read_state_dict(out)[1]
    calibration = json.loads(metadata["adarevd.calibration"])
    assert tuple(calibration["exit_table"]) == adarevd.read_config(out).exit_table
    assert json.loads(metadata[HISTORY_KEY])[0]["kind"] == "encoder"  # the history is kept
    assert main(["eval", paired, "--weights", str(out), "--json", str(report)]) == 0
    numbers = json.loads(report.read_text())
    for name in ("psnr_input", "psnr_output", "gain_db", "ssim_input", "ssim_output", "mean_depth", "frames"):
        assert name in numbers
    assert numbers["frames"] == 8 and numbers["mean_depth"] == pytest.approx(calibration["mean_depth"], abs=1e-3)


@pytest.mark.s3
def test_training_reads_pairs_and_writes_checkpoints_and_weights_on_s3(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"s3://{s3.bucket}/train-{tmp_path.name[-8:]}"
    options = s3.storage_options
    write_pairs(Store(f"{prefix}/pairs", options), SynthConfig(count=4, size=(72, 72), limits=ShardLimits(2)))
    common = dict(kind="encoder", data=f"{prefix}/pairs", iterations=4, batch=2, crop=64, checkpoint_every=2)
    train(TrainSpec(output=f"{prefix}/w.safetensors", checkpoints=f"{prefix}/ck", storage_options=options, **common))
    store = Store(prefix, options)
    assert store.glob("ck/step-*/state.json") == ["ck/step-00000002/state.json", "ck/step-00000004/state.json"]
    assert not store.glob("_tmp/*") and not store.glob("ck/_tmp/*")
    train(TrainSpec(output=str(tmp_path / "local.safetensors"), storage_options=options, **common))  # output local
    on_s3 = tmp_path / "s3.safetensors"
    on_s3.write_bytes(store.read_bytes("w.safetensors"))
    a, b = load_file(str(on_s3)), load_file(str(tmp_path / "local.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The next stage starts from the encoder's weights at their URL (fetched, sha256 verified).
    import hashlib

    monkeypatch.setenv("ADAREVD_CACHE", str(tmp_path / "cache"))
    digest = hashlib.sha256(on_s3.read_bytes()).hexdigest()
    start = f"{prefix}/w.safetensors#sha256={digest}"
    decoders = dict(common, kind="decoders", output=f"{prefix}/d.safetensors", checkpoints=None, iterations=2)
    train(TrainSpec(weights=(start,), storage_options=options, **decoders))  # type: ignore[arg-type]
    (tmp_path / "d.safetensors").write_bytes(store.read_bytes("d.safetensors"))
    history = json.loads(read_state_dict(tmp_path / "d.safetensors")[1][HISTORY_KEY])
    assert [h["kind"] for h in history] == ["encoder", "decoders"] and history[1]["weights"] == ["w.safetensors"]
