"""Hostile and unlucky inputs that once lost frames with exit status 0, run through the `adarevd`
command on a local Ray. Each case counts in the ledger (docs/RELIABILITY.md)."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest

import adarevd
from jobs.cli import main
from pipeline.formats.shards import Sample, encode_shard, iter_samples
from pipeline.store.storage import Store
from tests.reliability.conftest import Entry
from tests.s3server import S3Server
from tests.test_node_view import unshare_works

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.reliability, pytest.mark.ray]
RUN = ["--workers", "1", "--cpus-per-worker", "1"]


def fixed_size_samples(prefix: str, count: int, seed: int) -> list[Sample]:
    """Random 24x32 frames as uncompressed PNGs: every shard of `count` such samples has one size."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        ok, png = cv2.imencode(
            ".png", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 0]
        )
        assert ok
        samples.append(Sample(f"{prefix}_{i:06d}", {"png": png.tobytes()}))
    return samples


def keys(store: Store, name: str) -> list[str]:
    with store.open(name) as stream:
        return [s.key for s in iter_samples(stream, name)]


def test_another_input_with_shards_of_the_same_names_and_sizes_is_not_taken_for_a_moved_one(
    local_ray: None, tmp_path: Path, ledger: Entry, capsys: pytest.CaptureFixture
) -> None:
    a, b, out = Store(str(tmp_path / "a")), Store(str(tmp_path / "b")), Store(str(tmp_path / "out"))
    same = encode_shard(fixed_size_samples("same", 2, seed=0))
    for store, prefix, seed in ((a, "aaa", 1), (b, "bbb", 2)):
        store.commit_bytes("s-000000.tar", same)
        store.commit_bytes("s-000001.tar", encode_shard(fixed_size_samples(prefix, 2, seed)))
    assert a.stat("s-000001.tar").size == b.stat("s-000001.tar").size  # size alone cannot tell them apart
    assert main(["deblur", a.url, out.url, *RUN]) == 0
    capsys.readouterr()
    assert main(["deblur", b.url, out.url, *RUN]) == 2  # was: "resuming ... same bytes", exit 0
    said = capsys.readouterr().err
    assert "s-000001.tar" in said and "is another file" in said and "another output folder" in said
    assert keys(out, "s-000001.tar") == ["aaa_000000", "aaa_000001"]  # A's output stands, untouched
    ledger.bad_inputs, ledger.frames = 1, 4
    ledger.lost = sum(key not in keys(out, "s-000001.tar") for key in ("aaa_000000", "aaa_000001"))


def test_compressed_shards_are_read_and_hidden_ones_and_folders_are_named(
    local_ray: None, tmp_path: Path, ledger: Entry, capsys: pytest.CaptureFixture
) -> None:
    source, out = Store(str(tmp_path / "in")), Store(str(tmp_path / "out"))
    plain = {"a.tar": "plain"}
    compressed = {"b.tar.gz": "gzip", "c.tgz": "tgz"}
    hidden = ["_private/d.tar", ".hidden/e.tar", "_x-000000.tar", ".y-000000.tar"]
    (tmp_path / "in" / "folder.tar").mkdir(parents=True)  # was: the whole run stopped, exit 2, on every re-run
    for i, name in enumerate([*plain, *compressed, *hidden]):
        data = encode_shard(fixed_size_samples(f"k{i}", 2, seed=i))
        source.commit_bytes(name, gzip.compress(data, mtime=0) if name in compressed else data)
    assert main(["deblur", source.url, out.url, *RUN]) == 0
    printed = capsys.readouterr().out
    # was: the compressed shards skipped ("1 in all"), the hidden ones without a word
    assert "3 in all" in printed and "not read: 5 input entries (.hidden/e.tar: a hidden or _ name" in printed
    passed_over = json.loads(out.read_bytes("_run.json"))["inputs_passed_over"]
    assert passed_over == {**{name: "a hidden or _ name" for name in hidden}, "folder.tar": "not a file"}
    assert {name: keys(out, name) for name in ("a.tar", "b.tar", "c.tar")} == {
        "a.tar": ["k0_000000", "k0_000001"],
        "b.tar": ["k1_000000", "k1_000001"],
        "c.tar": ["k2_000000", "k2_000001"],
    }
    ledger.bad_inputs, ledger.frames = 3 + len(hidden), 6
    ledger.lost = 6 - sum(len(keys(out, name)) for name in ("a.tar", "b.tar", "c.tar"))


def test_a_folder_of_only_hidden_shards_says_so(local_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = Store(str(tmp_path / "in"))
    source.commit_bytes("_x-000000.tar", encode_shard(fixed_size_samples("k", 1, seed=0)))
    assert main(["deblur", source.url, str(tmp_path / "out"), *RUN]) == 2
    assert "no .tar, .tar.gz or .tgz shards found (1 not read, e.g. _x-000000.tar: a hidden or _ name)" in (
        capsys.readouterr().err
    )


def test_a_key_in_two_shards_is_named_and_recorded(
    local_ray: None, tmp_path: Path, ledger: Entry, capsys: pytest.CaptureFixture
) -> None:
    source, out = Store(str(tmp_path / "in")), Store(str(tmp_path / "out"))
    first, second = fixed_size_samples("k", 2, seed=0), fixed_size_samples("k", 2, seed=1)
    source.commit_bytes("a.tar", encode_shard(first))
    source.commit_bytes("b.tar", encode_shard([second[1], Sample("other_000000", second[0].members)]))
    assert main(["deblur", source.url, out.url, *RUN]) == 0
    # was: both copies written without a word
    assert "warning: 1 key(s) are in more than one shard (e.g. 'k_000001' in a.tar and b.tar" in capsys.readouterr().out
    shared = json.loads(out.read_bytes("_run.json"))["output_totals"]["shared_keys"]
    assert shared == {"count": 1, "examples": {"k_000001": ["a.tar", "b.tar"]}}
    assert keys(out, "a.tar") == ["k_000000", "k_000001"] and keys(out, "b.tar") == ["k_000001", "other_000000"]
    ledger.bad_inputs, ledger.frames = 1, 4


def test_weights_that_are_text_a_folder_or_another_model_are_refused_clearly(
    tmp_path: Path, ledger: Entry, capsys: pytest.CaptureFixture
) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n" * 40)
    tiny = str(Path(adarevd.__file__).parent / "assets" / "adarevd-tiny.safetensors")
    tried = {
        # was: a KeyError traceback from torch's unpickler
        ("--weights", str(text)): f"{text}: not a PyTorch checkpoint (neither a zip archive nor a pickle)",
        # was: "does not exist"
        ("--weights", str(tmp_path)): f"{tmp_path} is a folder, not a weights file",
        # was: the tiny model ran as if it were adarevd-b
        (
            "--model",
            "adarevd-b",
            "--weights",
            tiny,
        ): "holds another model than --model adarevd-b: width 8 (--model: 64)",
    }
    for args, says in tried.items():
        assert main(["restore", *args, "--output", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (args, err)
    ledger.bad_inputs = len(tried)


def test_a_jpeg_with_an_exif_orientation_comes_out_turned_as_viewers_show_it(
    local_ray: None, tmp_path: Path, ledger: Entry
) -> None:
    source, out = Store(str(tmp_path / "in")), Store(str(tmp_path / "out"))
    stored = np.zeros((24, 40, 3), np.uint8)
    stored[:6, :10] = 255  # a white block at the stored picture's top left
    picture = PIL.Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the block at the top right
    jpeg = io.BytesIO()
    picture.save(jpeg, "JPEG", exif=exif.tobytes(), quality=95)
    source.commit_bytes("s.tar", encode_shard([Sample("photo", {"jpg": jpeg.getvalue()})]))
    assert main(["deblur", source.url, out.url, *RUN]) == 0
    with out.open("s.tar") as stream:
        (sample,) = iter_samples(stream, "s.tar")
    member = next(m for m in sample.members if m != "json")
    shown = cv2.imdecode(np.frombuffer(sample.members[member], np.uint8), cv2.IMREAD_GRAYSCALE)
    assert shown.shape == (40, 24)  # was: 24 x 40, as stored, and no note
    assert shown[:10, -6:].mean() > 200 and shown[:10, :8].mean() < 50
    (row,) = pq.read_table(io.BytesIO(out.read_bytes("_manifest/s.parquet"))).to_pylist()
    assert "EXIF orientation 6 applied" in row["notes"]
    ledger.bad_inputs, ledger.frames = 1, 1


FULL_DISK = """
import json, os, subprocess, sys
disk = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", disk], check=True)
from pipeline.store.storage import Store
store = Store(disk, retry_seconds=0)
try:
    store.commit_bytes("big.tar", os.urandom(1 << 20))
    failed = ""
except Exception as e:
    failed = f"{type(e).__name__}: {e}"
left = sorted(os.path.relpath(os.path.join(r, f), disk) for r, _, files in os.walk(disk) for f in files)
store.commit_bytes("small.tar", b"x" * 100_000)  # was: no space left, the failed write's part kept it
# A run killed mid-write left a part that fills the disk: the next run's lease clears it first.
os.makedirs(os.path.join(disk, "_tmp"), exist_ok=True)
dead = os.path.join(disk, "_tmp", "s-000001.tar.0123.part")
try:
    with open(dead, "wb") as handle:
        handle.write(os.urandom(1 << 20))
except OSError:
    pass
os.utime(dead, (0, 0))
from pipeline.deblur.resume import space_short
from pipeline.store.lease import OutputLock
short = space_short(Store(sys.argv[2]), store, ["in.tar"])  # the full disk, before the run
lock = OutputLock(store, "rerun")
with lock.held():
    store.commit_bytes("after.tar", b"y" * 100_000)  # was: every re-run failed at once, the part stayed
print(json.dumps({
    "failed": failed, "left": left, "small": os.path.getsize(os.path.join(disk, "small.tar")),
    "swept": lock.swept, "after": os.path.getsize(os.path.join(disk, "after.tar")), "short": short,
    "tmp": os.path.exists(os.path.join(disk, "_tmp")),
}))
"""


def test_a_full_disk_leaves_no_partial_file_and_a_dead_runs_parts_are_cleared(tmp_path: Path, ledger: Entry) -> None:
    if not unshare_works():
        pytest.skip("needs a mount namespace (`unshare -m`, e.g. as root) for a small disk of its own")
    disk = tmp_path / "disk"
    disk.mkdir()
    source = tmp_path / "in"
    Store(str(source)).commit_bytes("in.tar", b"z" * 400_000)
    command = ["unshare", "-m", sys.executable, "-c", FULL_DISK, str(disk), str(source)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "No space left on device" in result["failed"] and "big.tar" in result["failed"]
    assert result["left"] == [] and result["small"] == 100_000
    files, size = result["swept"]
    assert files == 1 and 100_000 < size < 256_000 and result["after"] == 100_000 and not result["tmp"]
    assert "0.0 MB free on its disk; the 1 shard(s) left take 0.4 MB as input" in result["short"], result["short"]
    ledger.bad_inputs = 2


@pytest.mark.s3
def test_a_bucket_that_does_not_exist_is_named(
    s3: S3Server, tmp_path: Path, ledger: Entry, capsys: pytest.CaptureFixture
) -> None:
    assert main(["deblur", "s3://no-such-bucket-here/frames", str(tmp_path / "out"), *s3.cli_options()]) == 2
    said = capsys.readouterr().err  # was: "The specified bucket does not exist", naming none
    assert "s3://no-such-bucket-here/frames" in said and "Traceback" not in said, said
    ledger.bad_inputs = 1


def test_the_report_reads_past_an_entry_the_run_refused(
    local_ray: None, tmp_path: Path, ledger: Entry, capsys: pytest.CaptureFixture
) -> None:
    source, out = Store(str(tmp_path / "in")), Store(str(tmp_path / "out"))
    samples = fixed_size_samples("f", 4, seed=3)
    link = tarfile.TarInfo("f_000099.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for i, sample in enumerate(samples):
            if i == 2:
                tar.addfile(link)  # refused by the run; the report must read on past it
            info = tarfile.TarInfo(f"{sample.key}.png")
            info.size = len(sample.members["png"])
            tar.addfile(info, io.BytesIO(sample.members["png"]))
    source.commit_bytes("s-000000.tar", shard.getvalue())
    assert main(["deblur", source.url, out.url, *RUN]) == 3  # 3: one entry quarantined, 4 frames deblurred
    capsys.readouterr()
    assert main(["report", out.url, "--to", str(tmp_path / "page"), "--samples", "4"]) == 0
    said = capsys.readouterr()
    # was: "cannot read it (... link or device); pass --input if the input moved", then "input n/a"
    assert "moved" not in said.out + said.err and "cannot read" not in said.out + said.err
    pictures = sorted((tmp_path / "page" / "frames").glob("*.png"))
    assert len(pictures) == 4
    for picture, sample in zip(pictures, samples, strict=True):
        drawn = cv2.imread(str(picture))
        blurry = cv2.imdecode(np.frombuffer(sample.members["png"], np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(drawn[28:, :32], blurry), picture.name  # the blurry input is drawn
    ledger.bad_inputs, ledger.frames = 1, 4


@pytest.mark.parametrize(
    ("url", "option", "named"),
    [
        ("s3://Bad_Bucket!/x", "client_kwargs.region_name=us-east-1", "Invalid bucket name"),
        ("s3://b/x", "client_kwargs.endpoint_url=not-a-url", "Invalid endpoint: not-a-url"),
        ("s3://b/x", "client_kwargs.endpoint_url=ftp://KEYID:SECRETX@127.0.0.1:1", "ftp://127.0.0.1:1"),
        ("s3://b/x", "no_such_option=1", "no_such_option"),
    ],
)
def test_a_storage_library_refusing_the_url_or_options_is_one_line_not_a_traceback(
    url: str,
    option: str,
    named: str,
    tmp_path: Path,
    ledger: Entry,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    endpoint = "--storage-option=client_kwargs.endpoint_url=http://127.0.0.1:9"  # nothing is reached
    assert main(["deblur", url, str(tmp_path / "out"), endpoint, f"--storage-option={option}"]) == 2
    said = capsys.readouterr().err  # was: botocore's / aiobotocore's traceback, exit 1
    assert said.startswith(f"adarevd deblur: error: {url}") and named in said, said
    assert "Check the URL and the storage options" in said and "Traceback" not in said
    assert "SECRETX" not in said and "KEYID" not in said
    ledger.bad_inputs = 1


def test_a_rerun_clears_the_partial_files_a_killed_run_left(
    local_ray: None, tmp_path: Path, ledger: Entry, capsys: pytest.CaptureFixture
) -> None:
    source, out = Store(str(tmp_path / "in")), Store(str(tmp_path / "out"))
    source.commit_bytes("s-000000.tar", encode_shard(fixed_size_samples("f", 2, seed=4)))
    dead = tmp_path / "out" / "_tmp" / "s-000000.tar.0123abcd.part"  # as a killed run leaves it
    dead.parent.mkdir(parents=True)
    dead.write_bytes(b"\0" * 3_000_000)
    os.utime(dead, (time.time() - 600, time.time() - 600))
    assert main(["deblur", source.url, out.url, *RUN]) == 0
    said = capsys.readouterr().out  # was: the part stayed for good
    assert f"cleared 1 partial files (3.0 MB) that stopped runs left in {out.url}/_tmp" in said, said
    assert not dead.exists() and keys(out, "s-000000.tar") == ["f_000000", "f_000001"]
    ledger.bad_inputs, ledger.frames = 1, 2
