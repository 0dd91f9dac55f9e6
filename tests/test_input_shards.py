"""Which shards a deblur run reads: a folder's, or those a pattern names (local and on S3)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import pipeline.deblur.ray.driver
from jobs.cli import main
from jobs.deblur import expected_frames
from pipeline.deblur.input_shards import list_folder, list_shards, split_input, without_output
from pipeline.deblur.job import DeblurJob
from pipeline.deblur.shard import output_names
from pipeline.formats.sink import ShardLimits
from pipeline.ingest.run import IngestConfig, ingest
from pipeline.store.storage import Store
from tests.media import frames, write_video
from tests.s3server import S3Server

NAMES = [
    "a/video-000000.tar",
    "a/video-000001.tar",
    "a/video-000002.tar",
    "b/images-000000.tar",
    "notes.txt",
    "_manifest/a/video-000000.parquet",
    "_quarantine/a/video-000001.tar",
]


def filled(store: Store) -> Store:
    for name in NAMES:
        store.commit_bytes(name, name.encode())
    return store


@pytest.mark.parametrize(
    ("url", "split"),
    [
        ("s3://bucket/frames", ("s3://bucket/frames", None)),
        ("/data/clips [2020]", ("/data/clips [2020]", None)),  # a folder, brackets and all
        ("s3://bucket/frames/video-{000000..000099}.tar", ("s3://bucket/frames", "video-{000000..000099}.tar")),
        ("s3://bucket/frames/*/video-*.tar", ("s3://bucket/frames", "*/video-*.tar")),
        ("s3://bucket/frames/video-000003.tar", ("s3://bucket/frames", "video-000003.tar")),  # one shard
        ("video-*.tar", (".", "video-*.tar")),
    ],
)
def test_a_url_is_a_folder_or_a_pattern_under_its_root(url: str, split: tuple[str, str | None]) -> None:
    assert split_input(url) == split


@pytest.mark.parametrize("url", ["s3://buck*/x.tar", "s3://{a,b}/x.tar", "/*.tar", "file:///v-{0..2}.tar"])
def test_a_pattern_without_a_folder_before_its_wildcard_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="starts with the folder"):
        split_input(url)


def test_a_folder_gives_every_shard_but_the_runs_own_files(tmp_path: Path) -> None:
    store = filled(Store(str(tmp_path)))
    assert list_shards(store) == [
        "a/video-000000.tar",
        "a/video-000001.tar",
        "a/video-000002.tar",
        "b/images-000000.tar",
    ]
    with pytest.raises(FileNotFoundError, match=r"b/none: no such folder"):
        list_shards(Store(str(tmp_path / "b" / "none")))
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match=r"c: no \.tar, \.tar\.gz or \.tgz shards found"):
        list_shards(Store(str(tmp_path / "c")))


def test_a_pattern_gives_the_shards_it_names_once_each_in_order(tmp_path: Path) -> None:
    store = filled(Store(str(tmp_path)))
    assert list_shards(store, "a/video-{000002,000000}.tar") == ["a/video-000000.tar", "a/video-000002.tar"]
    assert list_shards(store, "{a/video-00000[01],*/*-000000}.tar") == [
        "a/video-000000.tar",
        "a/video-000001.tar",
        "b/images-000000.tar",
    ]
    assert list_shards(store, "b/images-000000.tar") == ["b/images-000000.tar"]
    assert list_shards(store, "**/*-000001.tar") == ["a/video-000001.tar"]  # not the _quarantine copy


def test_a_pattern_naming_missing_shards_says_which_and_what_to_do(tmp_path: Path) -> None:
    store = filled(Store(str(tmp_path)))
    with pytest.raises(FileNotFoundError) as caught:
        list_shards(store, "a/video-{000000..000009}.tar")
    message = str(caught.value)
    assert "7 of the shards a/video-{000000..000009}.tar names do not exist" in message
    assert "a/video-000003.tar, a/video-000004.tar" in message and "and 2 more" in message
    assert "mend the pattern" in message
    with pytest.raises(FileNotFoundError, match=r"c/\*\.tar"):  # a glob that matches nothing counts too
        list_shards(store, "{a/video-000000,c/*}.tar")
    with pytest.raises(ValueError, match=r"must name \.tar files"):
        list_shards(store, "{notes.txt,a/video-000000.tar}")


@pytest.mark.s3
def test_patterns_on_s3(s3: S3Server) -> None:
    store = filled(Store(f"s3://{s3.bucket}/shards-{time.time_ns()}", s3.storage_options))
    root, pattern = split_input(store.url + "/a/video-{000001..000002}.tar")
    assert (root, pattern) == (store.url + "/a", "video-{000001..000002}.tar")
    assert list_shards(Store(root, s3.storage_options), pattern) == ["video-000001.tar", "video-000002.tar"]
    assert list_shards(store, "*/*.tar") == [
        "a/video-000000.tar",
        "a/video-000001.tar",
        "a/video-000002.tar",
        "b/images-000000.tar",
    ]
    with pytest.raises(FileNotFoundError, match=r"a/video-000003\.tar"):
        list_shards(store, "a/video-{000002..000003}.tar")


def test_the_cli_refuses_a_bad_input_before_it_starts_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def not_yet(*_: object, **__: object) -> None:
        raise AssertionError("the input should have been refused before this")

    monkeypatch.setattr(pipeline.deblur.ray.driver, "ensure_ray", not_yet)
    filled(Store(str(tmp_path / "in")))
    out = tmp_path / "out"
    assert main(["deblur", f"{tmp_path}/in/a/video-{{000001..000004}}.tar", str(out)]) == 2
    assert "2 of the shards video-{000001..000004}.tar names do not exist" in capsys.readouterr().err
    assert main(["deblur", str(tmp_path / "in" / "b" / "none"), str(out)]) == 2
    assert "b/none: no such folder; run `adarevd ingest` first, or mend the URL" in capsys.readouterr().err
    (tmp_path / "in" / "empty").mkdir()
    assert main(["deblur", str(tmp_path / "in" / "empty"), str(out)]) == 2
    assert "empty: no .tar, .tar.gz or .tgz shards found; run `adarevd ingest` first" in capsys.readouterr().err
    assert not out.exists()


def test_the_progress_total_counts_the_frames_of_the_shards_a_run_reads(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4", frames(7))
    store = Store(str(tmp_path / "frames"))
    ingest([str(clip)], store, IngestConfig(limits=ShardLimits(max_samples=3)))  # shards of 3, 3, 1 frames
    assert expected_frames(store, list_shards(store)) == 7
    assert expected_frames(store, list_shards(store, "frames-00000{0,2}.tar")) == 4
    store.commit_bytes("other-000000.tar", (tmp_path / "frames" / "frames-000002.tar").read_bytes())
    assert expected_frames(store, list_shards(store)) is None  # a shard the index does not list: no total
    assert expected_frames(Store(str(tmp_path / "no-index")), ["frames-000000.tar"]) is None


def test_an_output_inside_the_input_is_not_read_as_input_on_the_next_run(tmp_path: Path) -> None:
    filled(Store(str(tmp_path)))
    Store(str(tmp_path / "a" / "deblurred")).commit_bytes("video-000000.tar", b"a result")
    job = DeblurJob(f"{tmp_path}/a", f"{tmp_path}/a/x/../deblurred")  # '..' or not, the same folder
    assert job.shards({}) == ["video-000000.tar", "video-000001.tar", "video-000002.tar"]
    assert DeblurJob(f"{tmp_path}/a/*.tar", f"{tmp_path}/a/deblurred").shards({}) == job.shards({})
    assert DeblurJob(str(tmp_path), f"{tmp_path}/a/deblurred").shards({}) == [
        "a/video-000000.tar",
        "a/video-000001.tar",
        "a/video-000002.tar",
        "b/images-000000.tar",
    ]
    apart = Store("memory://adarevd-test-apart" + str(tmp_path))  # another filesystem: nothing to leave out
    assert without_output(["a/video-000000.tar"], Store(str(tmp_path)), apart) == ["a/video-000000.tar"]
    # A pattern that names only the output's shards: refused, as one naming nothing is (was: "0 in all", exit 0).
    with pytest.raises(FileNotFoundError, match=r"every shard it names is in the output folder"):
        DeblurJob(f"{tmp_path}/a/*/video-*.tar", f"{tmp_path}/a/deblurred").shards({})


def test_an_output_that_would_overwrite_input_shards_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = filled(Store(str(tmp_path / "in")))
    assert main(["deblur", f"{tmp_path}/in/a", f"{tmp_path}/in/b/../a/"]) == 2  # the input folder itself
    error = capsys.readouterr().err
    assert "video-000000.tar: the deblurred shard would be written over an input shard (3 of 3" in error
    assert f"e.g. {tmp_path}/in/a-deblurred" in error
    # An input inside the output clashes where the input holds a folder named like itself: the output
    # of input shard a/video-000000.tar of in/a would be in/a/video-000000.tar, another input shard.
    store.commit_bytes("a/a/video-000000.tar", b"nested")
    with pytest.raises(ValueError, match=r"in/a/video-000000.tar: the deblurred shard would be written over"):
        DeblurJob(f"{tmp_path}/in/a", f"{tmp_path}/in").shards({})
    assert DeblurJob(f"{tmp_path}/in/b", f"{tmp_path}/in").shards({}) == ["images-000000.tar"]  # no clash
    files = {str(f.relative_to(tmp_path / "in")): f.read_bytes() for f in (tmp_path / "in").rglob("*") if f.is_file()}
    assert files == {name: name.encode() for name in NAMES} | {"a/a/video-000000.tar": b"nested"}  # nothing written


def test_a_folder_lists_compressed_shards_and_passes_over_hidden_ones(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    for name in ("a.tar", "b.tar.gz", "sub/c.tgz", "_x.tar", ".cache/y.tar", "out/_quarantine/z.tar", "notes.txt"):
        store.commit_bytes(name, b"x")
    listing = list_folder(store)
    assert listing.shards == ["a.tar", "b.tar.gz", "sub/c.tgz"]
    # a deblur output's own files are not named
    assert listing.passed_over == {".cache/y.tar": "a hidden or _ name", "_x.tar": "a hidden or _ name"}
    assert [output_names(name)[0] for name in listing.shards] == ["a.tar", "b.tar", "sub/c.tar"]
    store.commit_bytes("b.tar", b"x")
    with pytest.raises(ValueError, match=r"b.tar.gz and b.tar would both be written as b.tar;"):
        list_folder(store)
