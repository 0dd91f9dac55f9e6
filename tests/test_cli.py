from __future__ import annotations

import json
import re
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import adarevd
from jobs.cli import DEFAULT_WEIGHTS, main, parse
from pipeline.store.storage import Store


def test_restore_on_the_bundled_demo_writes_images_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["restore", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    restored = cv2.imread(str(tmp_path / "demo_blurry.deblurred.png"))
    blurry = cv2.imread(str(DEFAULT_WEIGHTS.parent / "demo_blurry.png"))
    assert restored is not None and restored.shape == blurry.shape
    assert cv2.imread(str(tmp_path / "demo_blurry.depth.png")).shape == blurry.shape
    assert "exit histogram" in out and "bundled adarevd-tiny.safetensors" in out
    psnr_in, psnr_out = map(float, re.search(r"([\d.]+) -> ([\d.]+) dB", out).groups())
    # Do no harm: the bundled weights must not make the held-out demo image worse.
    assert psnr_out >= psnr_in


def test_weights_before_the_positional_arguments_take_one_file_each(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--weights W IN OUT` once parsed as three weights files and no input (the demo ran instead)."""
    args = parse(["deblur", "--weights", "a.pth", "--weights", "a-cls.pth", "in/", "out/"])
    assert (args.weights, args.input, args.output) == (["a.pth", "a-cls.pth"], "in/", "out/")
    args = parse(["deblur", "in/", "--weights", "a.pth", "out/"])
    assert (args.weights, args.input, args.output) == (["a.pth"], "in/", "out/")
    image = tmp_path / "mine.png"
    image.write_bytes((DEFAULT_WEIGHTS.parent / "demo_sharp.png").read_bytes())
    out = tmp_path / "out"
    assert main(["restore", "--weights", str(DEFAULT_WEIGHTS), str(image), "--output", str(out)]) == 0
    assert (out / "mine.deblurred.png").exists() and not list(out.glob("demo*"))  # the user's image, not the demo
    assert "mine.png" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("adarevd 0.")


def test_bundled_weights_carry_config_and_provenance() -> None:
    config = adarevd.read_config(DEFAULT_WEIGHTS)
    _, metadata = adarevd.weights.read_state_dict(DEFAULT_WEIGHTS)
    provenance = json.loads(metadata["adarevd.provenance"])
    # The preset, with the exit table the recipe's calibration chose.
    assert config == adarevd.PRESETS["adarevd-tiny"].with_overrides(exit_table=provenance["calibration"]["exit_table"])
    # The recipe's numbers on its test photos: no PSNR class of blurred frames made worse, sharp frames
    # left alone (tests/test_default_weights.py measures the latter again).
    tested = provenance["test_metrics"]
    assert tested["blurred"]["worst_class_gain_db"] >= 0 and tested["blurred"]["gain_db"] >= 0
    assert tested["sharp_in"]["psnr_mean"] >= 40 and tested["sharp_in"]["psnr_worst"] >= 35
    assert DEFAULT_WEIGHTS.stat().st_size < 10 * 2**20


def test_unreadable_image_is_named_in_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["restore", str(bad), "--output", str(tmp_path / "out")]) == 2
    assert "broken.png: cannot read it as an image" in capsys.readouterr().err


def test_fixed_exit_depth_and_grey_16bit_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grey = cv2.imread(str(DEFAULT_WEIGHTS.parent / "demo_blurry.png"), cv2.IMREAD_GRAYSCALE)
    grey16 = grey[:50, :70].astype("uint16")
    cv2.imwrite(str(tmp_path / "grey16.png"), grey16 * 257)
    assert main(["restore", str(tmp_path / "grey16.png"), "--exit", "2", "--output", str(tmp_path / "o")]) == 0
    assert cv2.imread(str(tmp_path / "o" / "grey16.deblurred.png")).shape == (50, 70, 3)
    out = capsys.readouterr().out
    assert "[0, 0, 2, 0, 0]" in out and "bf16" not in out  # 2 patches, both at depth 2; auto is fp32 here
    arguments = ["restore", str(tmp_path / "grey16.png"), "--exit", "2", "--precision", "bf16"]
    assert main([*arguments, "--output", str(tmp_path / "b")]) == 0
    assert "eager; bf16 autocast" in capsys.readouterr().out
    fp32, bf16 = (cv2.imread(str(tmp_path / d / "grey16.deblurred.png")).astype(int) for d in "ob")
    assert np.abs(fp32 - bf16).max() <= 8  # the tolerance stated in tests/test_restorer.py
    with pytest.raises(SystemExit):
        main(["restore", "--exit", "deep"])


def test_presets_without_bundled_weights_ask_for_them(capsys: pytest.CaptureFixture) -> None:
    assert main(["restore", "--model", "adarevd-b"]) == 2
    assert "pass --weights" in capsys.readouterr().err


def test_info_prints_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(DEFAULT_WEIGHTS)]) == 0
    assert '"encoder": "nafnet"' in capsys.readouterr().out


def test_deblur_refuses_a_depth_the_model_lacks_and_bad_numbers_before_ray_or_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import ray

    missing, out = str(tmp_path / "no-such-input"), tmp_path / "out"
    assert main(["deblur", missing, str(out), "--exit", "9"]) == 2
    err = capsys.readouterr().err
    assert "--exit must be 'adaptive' or a depth 0..4 for this model (4 columns), got 9" in err, err
    assert main(["deblur", missing, str(out), "--workers", "-1"]) == 2
    assert "--workers must be >= 0, got -1" in capsys.readouterr().err
    assert main(["deblur", missing, str(out), "--stall-timeout", "0"]) == 2
    assert "--stall-timeout must be seconds > 0, got 0.0" in capsys.readouterr().err
    assert not ray.is_initialized() and not out.exists()  # refused before Ray started or anything was read


def test_the_summary_of_a_run_with_nothing_to_do_has_no_empty_exit_table(capsys: pytest.CaptureFixture) -> None:
    from jobs.deblur import print_summary
    from pipeline.deblur.run_record import RunSummary

    print_summary(RunSummary(shards_total=3, shards_skipped=3, workers=2), "out", wall=1.0)
    printed = capsys.readouterr().out
    assert "shards: 0 processed, 3 already done, 3 in all" in printed
    assert "nothing to do: every shard is already done here" in printed
    assert "exit depth" not in printed and "%" not in printed


def test_the_summary_says_which_precision_ran_and_when_the_cards_differ(capsys: pytest.CaptureFixture) -> None:
    from jobs.deblur import print_summary
    from pipeline.deblur.run_record import RunSummary
    from pipeline.deblur.shard import ShardReport

    def said(precisions: dict[str, int]) -> str:
        ran = RunSummary(shards_total=1, reports=[ShardReport("a.tar", frames=2, histogram=[4])], precisions=precisions)
        print_summary(ran, "out", wall=1.0)
        return capsys.readouterr().out

    assert "bf16" not in said({"fp32": 2})
    assert "; bf16 autocast\n" in said({"bf16": 2})
    assert "bf16 autocast on 1 of 3 actors (their cards differ: --precision pins one)" in said({"bf16": 1, "fp32": 2})


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:{port}", r"--address 127\.0\.0\.1:\d+: nothing answers there \(\[Errno 111\] Connection refused\)"),
        ("ray://127.0.0.1:{port}", r"--address ray://127\.0\.0\.1:\d+: nothing answers there"),
        ("http://127.0.0.1:{port}", r"an http:// address is a dashboard's, for `adarevd submit` and `adarevd jobs`"),
        ("head-node", r"--address head-node: expected HOST:PORT"),
        ("auto", r"--address auto: Could not find any running Ray instance"),  # (none in this RAY_TMPDIR)
    ],
)
def test_a_cluster_address_where_no_ray_answers_fails_at_once_saying_what_to_give(
    address: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, `HOST:PORT` waited minutes on Ray's retries, and `auto` or `ray://` ended in tracebacks."""
    import ray

    from pipeline.ingest.run import ingest
    from tests.media import frames, write_video
    from tests.s3server import free_port

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no cluster address file of another test's Ray here
    shards = tmp_path / "in"
    ingest([str(write_video(tmp_path / "v.mkv", frames(2)))], Store(str(shards)))
    start = time.monotonic()
    assert main(["deblur", str(shards), str(tmp_path / "out"), "--address", address.format(port=free_port())]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "give the head's address as `ray start --head` prints it (HOST:6379)" in err
    assert "Traceback" not in err and time.monotonic() - start < 30 and not ray.is_initialized()


def test_ray_address_is_read_as_rays_own_tools_read_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.cluster.address import RayAddress, ray_address
    from pipeline.ingest.run import ingest
    from tests.media import frames, write_video
    from tests.s3server import free_port

    assert ray_address("h:6379", {"RAY_ADDRESS": "auto"}) == RayAddress("h:6379", "--address")
    assert ray_address(None, {"RAY_ADDRESS": "auto"}) == RayAddress("auto", "RAY_ADDRESS")
    assert ray_address("local", {"RAY_ADDRESS": "auto"}).address is None
    assert ray_address(None, {}).address is None and ray_address(None, {"RAY_ADDRESS": "local"}).address is None
    # `ray job submit -- adarevd deblur ...` sets RAY_ADDRESS: the command joins that cluster (was: a Ray of its own).
    shards = tmp_path / "in"
    ingest([str(write_video(tmp_path / "v.mkv", frames(2)))], Store(str(shards)))
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    assert main(["deblur", str(shards), str(tmp_path / "out")]) == 2
    said = capsys.readouterr()
    assert "ray: the cluster at 127.0.0.1:" in said.out and "(RAY_ADDRESS)" in said.out
    assert re.search(r"RAY_ADDRESS 127\.0\.0\.1:\d+: nothing answers there", said.err), said.err


def test_restore_takes_folders_and_never_writes_over_an_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    demo = (DEFAULT_WEIGHTS.parent / "demo_blurry.png").read_bytes()
    for name in ("shots/a.png", "shots/day2/b.png", "shots/notes.txt", "c.png", "other/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(demo if name.endswith(".png") else b"not an image")
    out = tmp_path / "out"
    assert main(["restore", str(tmp_path / "shots"), str(tmp_path / "c.png"), "--output", str(out)]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    expected = ["a.deblurred.png", "a.depth.png", "c.deblurred.png", "c.depth.png"]
    assert written == [*expected, "day2/b.deblurred.png", "day2/b.depth.png"]
    capsys.readouterr()
    # Into the inputs' own folder: the outputs carry a suffix, so the inputs stay as they were.
    assert main(["restore", str(tmp_path / "c.png"), "--output", str(tmp_path)]) == 0
    assert (tmp_path / "c.png").read_bytes() == demo and (tmp_path / "c.deblurred.png").exists()
    capsys.readouterr()
    refused = {
        ("c.png", "other/c.png"): "would both be written to",  # was: the second overwrote the first
        ("c.png", "c.depth.png"): "would be written over the input of that name",  # the last run's map as an input
        ("missing.png",): "no such file or folder",
        ("empty",): "a folder with no images",
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    for names, message in refused.items():
        assert main(["restore", *(str(tmp_path / n) for n in names), "--output", str(tmp_path)]) == 2, names
        assert message in capsys.readouterr().err, names


def test_one_spelling_per_concept_with_the_old_ones_still_read() -> None:
    """--output names what a command writes; --jpeg-quality a JPEG quality; --threads a thread count."""
    for flag in ("--output", "--to"):
        assert parse(["report", "out/", flag, "page/"]).to == "page/"
        assert parse(["assemble", "out/", "--video", "v", flag, "v.mkv"]).to == "v.mkv"
    for flag in ("--jpeg-quality", "--quality"):
        assert parse(["ingest", "a.mp4", "--output", "o", flag, "80"]).quality == 80
    for flag in ("--jpeg-quality", "--jpeg"):
        assert parse(["synth", "--output", "o", flag, "70"]).jpeg == 70
    for flag in ("--threads", "--workers"):
        assert parse(["ingest", "a.mp4", "--output", "o", flag, "3"]).workers == 3
