"""The deblur job on a real local Ray (2 CPUs, fractional resources), the bundled tiny weights."""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

import adarevd
from adarevd.calibration import with_exit_table
from jobs.cli import DEFAULT_WEIGHTS, main
from pipeline.deblur.manifests import read_manifests
from pipeline.deblur.ray import driver
from pipeline.deblur.shard import output_names
from pipeline.formats import images
from pipeline.formats.shards import Sample, encode_shard
from pipeline.report.page import write_report
from pipeline.store.storage import Store
from tests.deblur_setup import (
    ActorKiller,
    Model,
    bundled_model,
    input_shards,
    pixels,
    restore_u8,
    run_record,
    tar_bytes,
)
from tests.media import read_samples
from tests.s3server import S3Server

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def model() -> Model:
    return bundled_model()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, dict[str, np.ndarray]]:
    return input_shards(tmp_path_factory, "deblur-in")


def job(source: Store, output: Store, **kw: object) -> driver.DeblurJob:
    return driver.DeblurJob(source.url, output.url, frames_per_batch=3, stall_timeout_s=120, **kw)


def run(j: driver.DeblurJob, model: Model) -> driver.RunSummary:
    return driver.run(j, model.model, weight_files=[str(DEFAULT_WEIGHTS)])  # one node: actors read the file


@pytest.fixture(scope="module")
def reference(local_ray: None, inputs: tuple[Store, dict], model: Model, tmp_path_factory: pytest.TempPathFactory):
    source, _ = inputs
    output = Store(str(tmp_path_factory.mktemp("deblur-ref")))
    summary = run(job(source, output), model)
    return output, summary


def test_every_frame_comes_out_deblurred_with_members_passed_through(
    reference: tuple[Store, driver.RunSummary], inputs: tuple[Store, dict], model: Model
) -> None:
    output, summary = reference
    source, originals = inputs
    out = read_samples(output)
    assert sorted(out) == sorted(originals)
    assert summary.frames == len(originals) == 10 and summary.quarantined == 0
    source_samples = read_samples(source)
    for key, rgb in originals.items():
        got = pixels(out[key])
        want = restore_u8(model.model, rgb)
        tolerance = 4 if "jpg" in out[key] else 1  # JPEG members are re-encoded as JPEG
        assert np.abs(got.astype(int) - want).mean() <= tolerance, key
        for member, data in source_samples[key].items():
            if member not in ("png", "jpg"):
                assert out[key][member] == data, (key, member)  # json, cls, txt byte for byte
    record = run_record(output)
    assert record["frames"] == 10 and record["shards"]["total"] == 3
    assert sum(record["exit_histogram"]) == sum(summary.histogram) > 0
    assert record["model"]["fingerprint"] == model.fingerprint
    for shard in ("video-000000.tar", "video-000001.tar", "images-000000.tar"):
        assert output.exists(output_names(shard)[1])


def test_report_of_the_run(
    reference: tuple[Store, driver.RunSummary], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output, summary = reference
    assert main(["report", output.url, "--to", str(tmp_path), "--samples", "3", "--key", "img_tiny"]) == 0
    assert "warning" not in capsys.readouterr().out  # the input was found where _run.json says
    pictures = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert len(pictures) == 4 and pictures[-1].endswith("img_tiny.png"), pictures
    rows = read_manifests(output)[0].to_pylist()
    assert {r["run_id"] for r in rows} == {run_record(output)["run_id"]}
    page = (tmp_path / "index.html").read_text()
    assert f"run {summary.run_id} (10 frames)" in page  # the throughput line of this run


def test_a_rerun_gives_the_same_bytes_and_resume_redoes_only_missing_shards(
    reference: tuple[Store, driver.RunSummary], inputs: tuple[Store, dict], model: Model, tmp_path: Path
) -> None:
    output, _ = reference
    source, _ = inputs
    again = Store(str(tmp_path / "again"))
    run(job(source, again), model)
    assert tar_bytes(again) == tar_bytes(output)
    # Resume: one shard lost its manifest (never finished) -> only it is redone, same bytes.
    again.remove(output_names("video-000001.tar")[1])
    again.remove("video-000001.tar")
    summary = run(job(source, again), model)
    assert (summary.shards_skipped, len(summary.reports)) == (2, 1)
    assert tar_bytes(again) == tar_bytes(output)
    record = run_record(again)
    assert record["frames"] == summary.frames < 10  # this run
    assert record["output_totals"]["frames"] == 10  # the whole output
    assert record["output_totals"]["exit_histogram"] == run_record(output)["exit_histogram"]


def test_a_shard_pattern_deblurs_only_the_shards_it_names(
    reference: tuple[Store, driver.RunSummary],
    inputs: tuple[Store, dict],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    source, _ = inputs
    out = Store(str(tmp_path / "some"))
    missing = f"{source.url}/video-{{000001..000003}}.tar"  # 000002 and 000003 do not exist
    assert main(["deblur", missing, out.url]) == 2
    assert "2 of the shards video-{000001..000003}.tar names do not exist" in capsys.readouterr().err
    assert not out.glob("**/*")  # refused before anything was written
    assert main(["deblur", f"{source.url}/{{video-000001,images-*}}.tar", out.url, "--frames-per-batch", "3"]) == 0
    want = {k: v for k, v in tar_bytes(reference[0]).items() if k in ("video-000001.tar", "images-000000.tar")}
    assert tar_bytes(out) == want  # same names and bytes as the whole-folder run's shards
    record = run_record(out)
    assert (record["input"], record["input_pattern"]) == (source.url, "{video-000001,images-*}.tar")
    assert main(["report", out.url, "--to", str(tmp_path / "report"), "--key", "img_tiny"]) == 0
    assert "warning" not in capsys.readouterr().out  # the blurry frames found under the recorded root


def test_an_output_folder_holding_another_datasets_shards_is_refused(
    local_ray: None, inputs: tuple[Store, dict], model: Model, tmp_path: Path
) -> None:
    source, _ = inputs
    (tmp_path / "other").mkdir()  # someone's frames under a name this run would write
    (tmp_path / "other" / "video-000001.tar").write_bytes(tar_bytes(source)["video-000001.tar"])
    other = Store(str(tmp_path / "other"))
    with pytest.raises(
        FileExistsError, match=r"other/video-000001.tar: the output folder already holds this shard \(1 of"
    ):
        run(job(source, other), model)
    assert [f.name for f in (tmp_path / "other").rglob("*")] == ["video-000001.tar"]  # nothing written
    assert other.read_bytes("video-000001.tar") == tar_bytes(source)["video-000001.tar"]


def test_a_resume_refuses_other_weights_options_or_an_input_with_the_same_names(
    reference: tuple[Store, driver.RunSummary], inputs: tuple[Store, dict], model: Model, tmp_path: Path
) -> None:
    source, _ = inputs
    copy = Store(str(shutil.copytree(reference[0].url, tmp_path / "out")))
    copy.remove(output_names("video-000001.tar")[1])  # one shard left to do: a resume
    before = {f: f.read_bytes() for f in (tmp_path / "out").rglob("*") if f.is_file()}
    with pytest.raises(ValueError, match=r"deblurred with exit 'adaptive' \(this run: 2\); resuming would mix"):
        run(job(source, copy, restore=driver.RestoreOptions(exit=2)), model)
    # The default precision on CPUs is fp32, recorded as such: bf16 would mix, fp32 resumes (below).
    with pytest.raises(ValueError, match=r"deblurred with precision 'fp32' \(this run: 'bf16'\)"):
        run(job(source, copy, restore=driver.RestoreOptions(precision="bf16")), model)
    # The same tensors re-calibrated (another exit table): the config is part of what made the pixels.
    table = model.model.config.exit_table
    recalibrated = with_exit_table(model.model, tuple(min(d + 1, 4) for d in table))
    assert adarevd.fingerprint(recalibrated) == model.fingerprint  # the tensors alone cannot tell
    with pytest.raises(ValueError, match=re.escape(f"model_config.exit_table {list(table)!r} (this run: [")):
        driver.run(job(source, copy), recalibrated)
    # Another input with the same shard names (the first done one, images-000000.tar, differs): refused,
    # whether its size differs or only its bytes (sha256).
    first = tmp_path / "other-input" / "images-000000.tar"
    shutil.copytree(source.url, first.parent)
    data = bytearray(first.read_bytes())
    first.write_bytes(bytes(data) + bytes(512))
    refused = (
        rf"images-000000.tar was deblurred from file://.*deblur-in.* \({len(data)} bytes, sha256 \w+\); "
        rf"this run's .*other-input.* \({len(data) + 512} bytes\) is another file"
    )
    with pytest.raises(FileExistsError, match=refused):
        run(job(Store(str(first.parent)), copy), model)
    data[len(data) // 2] ^= 1
    first.write_bytes(bytes(data))
    with pytest.raises(
        FileExistsError, match=rf"other-input/images-000000.tar \({len(data)} bytes, sha256 \w+\) is another"
    ):
        run(job(Store(str(first.parent)), copy), model)
    assert {f: f.read_bytes() for f in (tmp_path / "out").rglob("*") if f.is_file()} == before  # nothing written
    (tmp_path / "link").symlink_to(source.url)
    # The same input, through a link, with fp32 given (the CPU's auto): resumes.
    summary = run(job(Store(str(tmp_path / "link")), copy, restore=driver.RestoreOptions(precision="fp32")), model)
    assert (summary.shards_skipped, len(summary.reports), summary.input_moved_from) == (2, 1, None)
    assert tar_bytes(copy) == tar_bytes(reference[0])


def test_a_moved_input_resumes_and_a_replaced_one_is_refused(
    reference: tuple[Store, driver.RunSummary], inputs: tuple[Store, dict], model: Model, tmp_path: Path
) -> None:
    source, _ = inputs
    copy = Store(str(shutil.copytree(reference[0].url, tmp_path / "out")))
    copy.remove(output_names("video-000001.tar")[1])
    moved = Store(str(shutil.copytree(source.url, tmp_path / "moved")))  # the same bytes at another place
    summary = run(job(moved, copy), model)
    assert (summary.shards_skipped, len(summary.reports)) == (2, 1)
    assert summary.input_moved_from == f"file://{Path(source.url).resolve()}/images-000000.tar"
    assert run_record(copy)["input_moved_from"] == summary.input_moved_from
    assert tar_bytes(copy) == tar_bytes(reference[0])
    # video-000001.tar was read here: written again since, its bytes are read to see whether they changed.
    redone = tmp_path / "moved" / "video-000001.tar"
    data = bytearray(redone.read_bytes())
    redone.write_bytes(bytes(data))  # the same bytes (a re-ingest that gave the same shard): resumes
    assert run(job(moved, copy), model).shards_skipped == 3
    data[len(data) // 2] ^= 1
    redone.write_bytes(bytes(data))  # the same size, other bytes: refused, saying how to redo it
    with pytest.raises(
        FileExistsError, match=r"moved/video-000001.tar \(\d+ bytes, sha256 \w+\) is another file.*remove the manif"
    ):
        run(job(moved, copy), model)
    # Replaced where it is (re-ingested with other frames): its size differs from the record -> refused,
    # for any done shard (video-000000.tar is not the first).
    copy.remove(output_names("video-000001.tar")[1])
    shard = tmp_path / "moved" / "video-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    with pytest.raises(FileExistsError, match=r"moved/video-000000.tar \(\d+ bytes\) is another file"):
        run(job(moved, copy), model)


def test_a_flush_timeout_run_gives_every_frame(
    reference: tuple[Store, driver.RunSummary], inputs: tuple[Store, dict], model: Model, tmp_path: Path
) -> None:
    source, originals = inputs
    out = Store(str(tmp_path / "flush"))
    summary = run(job(source, out, flush_timeout_s=0.01), model)
    assert summary.frames == len(originals)
    got, want = read_samples(out), read_samples(reference[0])
    assert sorted(got) == sorted(want)
    for key in want:  # batches may differ from the reference run's: equal up to pooling's float rounding
        assert np.abs(pixels(got[key]).astype(int) - pixels(want[key])).max() <= 2, key
        assert {m: v for m, v in got[key].items() if m not in ("png", "jpg")} == {
            m: v for m, v in want[key].items() if m not in ("png", "jpg")
        }


def test_a_killed_actor_loses_and_duplicates_nothing(
    reference: tuple[Store, driver.RunSummary], inputs: tuple[Store, dict], model: Model, tmp_path: Path
) -> None:
    output, _ = reference
    source, _ = inputs
    faulty = Store(str(tmp_path / "faulty"))
    with ActorKiller("adarevd-restorer-", "adarevd-restorer-") as killer:
        summary = run(job(source, faulty, resources=driver.Resources(workers=2, cpus_per_worker=0.5)), model)
    assert len(killer.killed) == 2 and killer.mid_run
    assert summary.frames == 10 and summary.quarantined == 0
    assert tar_bytes(faulty) == tar_bytes(output)


def test_undecodable_frame_is_quarantined_and_fails_the_exit_status(
    local_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = Store(str(tmp_path / "in"))
    good = Sample("ok_000000", {"png": images.encode(np.full((20, 30, 3), 90, np.uint8)), "json": b"{}"})
    bad = Sample("bad_000000", {"png": b"\x89PNG\r\n\x1a\n broken", "json": b'{"frame_index": 0}'})
    source.commit_bytes("s-000000.tar", encode_shard([good, bad]))
    out = tmp_path / "out"
    assert main(["deblur", source.url, str(out), "--frames-per-batch", "2"]) == 3
    printed = capsys.readouterr().out
    assert "quarantined: 1 frame(s)" in printed
    assert sorted(read_samples(Store(str(out)))) == ["ok_000000"]
    quarantine = read_samples(Store(str(out / "_quarantine")))
    assert quarantine == {"bad_000000": dict(bad.members)}
    # With --quarantine-ok the same run into a new folder quarantines the same frame and exits 0.
    assert main(["deblur", source.url, str(tmp_path / "out-ok"), "--frames-per-batch", "2", "--quarantine-ok"]) == 0
    assert "quarantined: 1 frame(s)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.s3
def test_s3_in_and_out(
    local_ray: None,
    s3: S3Server,
    inputs: tuple[Store, dict],
    reference: tuple[Store, driver.RunSummary],
    model: Model,
    tmp_path: Path,
) -> None:
    local_source, _ = inputs
    prefix = f"s3://{s3.bucket}/deblur-{time.time_ns()}"
    source, output = Store(f"{prefix}/in", s3.storage_options), Store(f"{prefix}/out", s3.storage_options)
    for name, data in tar_bytes(local_source).items():
        source.commit_bytes(name, data)
    summary = driver.run(job(source, output), model.model, options=s3.storage_options)
    assert summary.frames == 10
    assert tar_bytes(output) == tar_bytes(reference[0])
    assert s3.secret_key not in output.read_bytes("_run.json").decode()
    report = write_report(output, tmp_path, samples=2)  # blurry frames from the S3 input in _run.json
    assert report.warnings == [] and len(report.pictures) == 2
    assert s3.secret_key not in report.page.read_text()
    # The local input moved to S3: an output of the local one resumes from there (size + sha256 on S3).
    resumed = Store(str(shutil.copytree(reference[0].url, tmp_path / "resumed")))
    resumed.remove(output_names("video-000001.tar")[1])
    summary = driver.run(job(source, resumed), model.model, options=s3.storage_options)
    assert (summary.shards_skipped, len(summary.reports)) == (2, 1)
    assert summary.input_moved_from is not None and summary.input_moved_from.startswith("file://")
    assert tar_bytes(resumed) == tar_bytes(reference[0])
    data = bytearray(source.read_bytes("video-000001.tar"))  # read from S3 by the resume: its ETag recorded
    data[len(data) // 2] ^= 1
    source.commit_bytes("video-000001.tar", bytes(data))
    with pytest.raises(FileExistsError, match=r"/in/video-000001.tar \(\d+ bytes, sha256 \w+\) is another file"):
        driver.run(job(source, resumed), model.model, options=s3.storage_options)


@ray.remote(num_cpus=0)
class _ModuleProbe:
    """A fresh worker, torch-free like a shard worker: which heavy modules does a handle pull in?"""

    def loaded(self, *handles: object) -> bool:
        return "torch" in sys.modules


def test_shard_workers_stay_torch_free_when_given_restorer_handles(local_ray: None) -> None:
    # Shard workers receive the restorer actors' handles; unpickling one must not import torch
    # (a torch name in a RestorerActor method once did: about 1 s and hundreds of MB per worker).
    from pipeline.deblur.ray.driver import RestorerActor

    probe = _ModuleProbe.remote()
    assert not ray.get(probe.loaded.remote()), "the probe's worker already had torch: the test proves nothing"
    actor = RestorerActor.options(num_cpus=0).remote(lambda: lambda frames: frames)
    assert not ray.get(probe.loaded.remote([actor]))
    ray.kill(actor)
    ray.kill(probe)
