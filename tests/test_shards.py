from __future__ import annotations

import gc
import hashlib
import io
import tarfile

import pytest
import webdataset as wds

from pipeline.formats.shards import Sample, ShardError, check_key, encode_shard, iter_samples, use_fsspec_for_webdataset
from pipeline.formats.sink import ShardSink
from pipeline.store.digests import Digest, DigestReader, digest_of
from pipeline.store.storage import Store

SAMPLES = [
    Sample("clip_000000", {"png": b"\x89PNG one", "json": b'{"frame_index": 0}'}),
    Sample("clip_000001", {"json": b'{"frame_index": 1}', "png": b"\x89PNG two", "label.txt": b"cat"}),
]


def test_writer_is_byte_reproducible_with_fixed_metadata_and_sorted_members() -> None:
    data = encode_shard(SAMPLES)
    assert data == encode_shard(SAMPLES)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [
        "clip_000000.json",
        "clip_000000.png",
        "clip_000001.json",
        "clip_000001.label.txt",
        "clip_000001.png",
    ]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}


def test_reader_round_trips_samples() -> None:
    back = list(iter_samples(io.BytesIO(encode_shard(SAMPLES)), "mem.tar"))
    assert [(s.key, dict(s.members)) for s in back] == [(s.key, dict(s.members)) for s in SAMPLES]


def _tar_with(entry: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        ok = tarfile.TarInfo("good_000000.png")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"abc"))
        entry.size = len(data) if entry.isfile() else 0
        tar.addfile(entry, io.BytesIO(data) if entry.isfile() else None)
    return buffer.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (_entry("evil_000000.png", tarfile.SYMTYPE, "/etc/passwd"), "link or device"),
        (_entry("evil_000000.png", tarfile.LNKTYPE, "good_000000.png"), "link or device"),
        (_entry("evil_000000.png", tarfile.CHRTYPE), "link or device"),
        (_entry("../evil_000000.png"), "'..'"),
        (_entry("/abs/evil_000000.png"), "absolute"),
        (_entry("nodot"), "is not <key>.<member>"),
    ],
)
def test_reader_refuses_unsafe_entries_after_yielding_the_good_ones(entry: tarfile.TarInfo, message: str) -> None:
    got = []
    with pytest.raises(ShardError, match=message) as error:
        for sample in iter_samples(io.BytesIO(_tar_with(entry, b"x")), "in-000003.tar"):
            got.append(sample)
    assert "in-000003.tar" in str(error.value)
    assert [s.key for s in got] == ["good_000000"]


def test_a_handler_skips_refused_entries_and_reading_goes_on() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind in [
            ("a_000000.png", tarfile.REGTYPE),
            ("../up_000000.png", tarfile.REGTYPE),
            ("b_000000.png", tarfile.REGTYPE),
            ("b_000000.json", tarfile.SYMTYPE),
            ("b_000000.cls", tarfile.REGTYPE),
            ("c_000000.png", tarfile.REGTYPE),
        ]:
            info = _entry(name, kind, "/etc/passwd" if kind == tarfile.SYMTYPE else "")
            info.size = 1 if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(b"x") if kind == tarfile.REGTYPE else None)
    refused: list[ShardError] = []
    keys = [s.key for s in iter_samples(io.BytesIO(buffer.getvalue()), "s.tar", on_bad_entry=refused.append)]
    # b lost its json to a refused link: it is left out whole rather than passed on without it.
    assert keys == ["a_000000", "c_000000"]
    assert [str(e) for e in refused] == [
        "s.tar: entry '../up_000000.png': key '../up_000000' has an empty, '.' or '..' path part; skipped",
        "s.tar: entry 'b_000000.json': is a link or device; shards may hold files only; skipped; "
        "sample 'b_000000' is left out with it",
    ]


@pytest.mark.parametrize("cut", ["truncated", "garbage", "empty"])
def test_reader_names_the_shard_of_a_broken_tar(cut: str) -> None:
    data = encode_shard([Sample("big_000000", {"png": bytes(range(256)) * 40}), *SAMPLES])
    broken = {"truncated": data[:3000], "garbage": b"\x13\x37" * 700, "empty": b""}[cut]
    with pytest.raises(ShardError, match=r"bad-000001\.tar: not a readable tar"):
        list(iter_samples(io.BytesIO(broken), "bad-000001.tar"))


@pytest.mark.parametrize(
    "key", ["", "a.b", "../x", "/abs", "a//b", "x/./y", "tab\there", "back\\slash", "caf\udce9", "bell\a"]
)
def test_check_key_rejects_unsafe_keys(key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        check_key(key)


def test_check_key_accepts_webdataset_keys() -> None:
    assert check_key("clip-1_000001") == "clip-1_000001"
    assert check_key("train/n01440764_10026") == "train/n01440764_10026"


def test_webdataset_reads_fsspec_urls(memory_store: Store) -> None:
    memory_store.commit_bytes("s-000000.tar", encode_shard(SAMPLES))
    use_fsspec_for_webdataset()
    dataset = wds.WebDataset(memory_store.url_of("s-000000.tar"), shardshuffle=False)
    assert [(s["__key__"], s["png"]) for s in dataset] == [(s.key, s.members["png"]) for s in SAMPLES]


def test_a_digest_taken_while_reading_samples_covers_the_whole_file() -> None:
    data = encode_shard(SAMPLES) + bytes(10240)  # padding after the end-of-archive blocks: tar never reads it
    reader = DigestReader(io.BytesIO(data))
    assert [s.key for s in iter_samples(reader, "x.tar")] == ["clip_000000", "clip_000001"]
    assert reader.digest() == Digest(len(data), hashlib.sha256(data).hexdigest())
    assert digest_of(io.BytesIO(data)) == reader.digest()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_sink_left_by_an_error_closes_its_tar_stream_before_its_file(memory_store: Store) -> None:
    # Before: the file was closed and the tar stream left open, which at collection wrote its end
    # into the closed file ("ValueError: write to closed file", raised where nobody catches it).
    sample = Sample("a_000000", {"png": b"x" * 100})
    with pytest.raises(RuntimeError, match="stop"), ShardSink(memory_store, "v") as sink:
        sink.add(sample)
        raise RuntimeError("stop")
    del sink
    gc.collect()
    assert memory_store.glob("v-*.tar") == []  # the partial shard was not committed
