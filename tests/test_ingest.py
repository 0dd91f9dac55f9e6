from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.deblur.resume import refuse_foreign
from pipeline.formats import images
from pipeline.formats.parquet_rows import ParquetRows
from pipeline.formats.shards import Sample, encode_shard
from pipeline.formats.sink import ShardLimits
from pipeline.ingest.run import INDEX_NAME, INDEX_SCHEMA, IngestConfig, ingest
from pipeline.store.lease import LockLost, OutputLock, OutputLocked
from pipeline.store.storage import Store
from tests.media import decode_video, frames, read_samples, write_video


def index_rows(store: Store) -> list[dict]:
    return pq.read_table(io.BytesIO(store.read_bytes(INDEX_NAME))).to_pylist()


def test_video_round_trips_bit_exactly_with_metadata(tmp_path: Path, memory_store: Store) -> None:
    video = write_video(tmp_path / "clip.mkv", frames(7), fps=12.5)
    summary = ingest([str(video)], memory_store, IngestConfig(workers=2))
    assert (summary.videos, summary.frames, summary.skipped) == (1, 7, 0)
    samples = read_samples(memory_store)
    assert sorted(samples) == [f"clip_{i:06d}" for i in range(7)]
    for i, original in enumerate(decode_video(video)):
        sample = samples[f"clip_{i:06d}"]
        np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(sample["png"], np.uint8), cv2.IMREAD_COLOR), original)
        meta = json.loads(sample["json"])
        assert meta["video_id"] == "clip" and meta["frame_index"] == i
        assert meta["pts_ms"] == pytest.approx(i * 80.0) and meta["fps"] == pytest.approx(12.5)
        assert (meta["width"], meta["height"]) == (64, 48)
        assert meta["source"] == str(video)
        assert meta["source_sha256"] == hashlib.sha256(video.read_bytes()).hexdigest()
        assert meta["frame_sha256"] == hashlib.sha256(original[..., ::-1].tobytes()).hexdigest()
    rows = index_rows(memory_store)
    assert [r["key"] for r in rows] == [f"clip_{i:06d}" for i in range(7)]
    assert {r["shard"] for r in rows} == {"frames-000000.tar"}
    assert all(r["sha256"] == hashlib.sha256(samples[r["key"]]["png"]).hexdigest() for r in rows)
    assert not memory_store.exists("_tmp")


def test_reingest_is_byte_identical(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mkv", frames(9))
    limits = ShardLimits(max_samples=4)
    for out in ("a", "b"):
        ingest([str(video)], Store(str(tmp_path / out)), IngestConfig(limits=limits, workers=3))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [INDEX_NAME, "frames-000000.tar", "frames-000001.tar", "frames-000002.tar"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_shards_roll_over_by_bytes(tmp_path: Path, memory_store: Store) -> None:
    video = write_video(tmp_path / "clip.mkv", frames(6))
    one_frame = len(images.encode(frames(1)[0]))
    limits = ShardLimits(max_bytes=int(2.5 * one_frame) + 4096)
    summary = ingest([str(video)], memory_store, IngestConfig(limits=limits))
    assert len(summary.shards) == 3
    assert len(read_samples(memory_store)) == 6
    rows = index_rows(memory_store)
    assert [r["shard"] for r in rows] == [s for s in summary.shards for _ in range(2)]


def test_jpeg_members_with_quality(tmp_path: Path, memory_store: Store) -> None:
    video = write_video(tmp_path / "clip.mkv", frames(2))
    ingest([str(video)], memory_store, IngestConfig(image_format="jpg", quality=60))
    sample = read_samples(memory_store)["clip_000000"]
    assert set(sample) == {"jpg", "json"} and sample["jpg"][:2] == b"\xff\xd8"
    assert len(sample["jpg"]) < len(images.encode(frames(1)[0], "jpg", 95))


def test_bad_inputs_are_recorded_and_the_rest_is_ingested(tmp_path: Path, memory_store: Store) -> None:
    write_video(tmp_path / "good.mkv", frames(4))
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(write_video(tmp_path / "whole.mkv", frames(12)).read_bytes()[:60_000])
    (tmp_path / "whole.mkv").unlink()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.avi").write_bytes(np.random.default_rng(0).bytes(4000))
    folder = tmp_path / "stills"
    folder.mkdir()
    rgb = frames(1, seed=3)[0]
    cv2.imwrite(str(folder / "a1.png"), rgb)
    cv2.imwrite(str(folder / "a2.png"), (rgb[..., 0].astype(np.uint16) * 257))  # 16-bit grey
    cv2.imwrite(str(folder / "a3.png"), np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]))  # RGBA
    (folder / "a4.png").write_bytes(images.encode(rgb)[:200])  # truncated PNG
    (folder / "a5.jpg").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("camera log")
    summary = ingest([str(tmp_path)], memory_store)
    by_reason = {(r["source"].rsplit("/", 1)[-1], r["status"]): r["reason"] for r in index_rows(memory_store)}
    assert "truncated or damaged: decoded" in by_reason["cut.mkv", "note"]
    assert "0 bytes" in by_reason["empty.mp4", "skipped"]
    assert "cannot be opened as a video" in by_reason["junk.avi", "skipped"]
    assert by_reason["a2.png", "note"] == "16-bit converted to 8-bit; grey converted to RGB"
    assert by_reason["a3.png", "note"] == "alpha channel dropped"
    assert "truncated PNG" in by_reason["a4.png", "skipped"]
    assert "cannot be decoded" in by_reason["a5.jpg", "skipped"]
    assert "not a video, an image or a .tar shard" in by_reason["notes.txt", "skipped"]
    samples = read_samples(memory_store)
    decoded = {k: cv2.imdecode(np.frombuffer(v["png"], np.uint8), cv2.IMREAD_UNCHANGED) for k, v in samples.items()}
    np.testing.assert_array_equal(decoded["stills_000000"], rgb)
    np.testing.assert_array_equal(decoded["stills_000001"], np.repeat(rgb[..., :1], 3, axis=2))
    np.testing.assert_array_equal(decoded["stills_000002"], rgb)
    notes = json.loads(samples["stills_000001"]["json"])["notes"]
    assert notes == ["16-bit converted to 8-bit", "grey converted to RGB"]
    cut_frames = sorted(k for k in samples if k.startswith("cut_"))
    assert 0 < len(cut_frames) < 12
    assert sum(k.startswith("good_") for k in samples) == 4
    assert (summary.skipped, summary.frames) == (5, 4 + len(cut_frames) + 3)


def test_a_url_that_names_nothing_is_recorded_and_the_rest_is_ingested(tmp_path: Path, memory_store: Store) -> None:
    write_video(tmp_path / "a.mp4", frames(2))
    urls = [f"{tmp_path}/{{a,b}}.mp4", f"{tmp_path}/*.mkv", f"{tmp_path}/*.mp4"]  # b.mp4: none; no .mkv at all
    summary = ingest(urls, memory_store)
    skipped = {r["source"]: r["reason"] for r in index_rows(memory_store) if r["status"] == "skipped"}
    assert skipped == {f"{tmp_path}/b.mp4": "not found", f"{tmp_path}/*.mkv": "matches no file"}
    assert (summary.frames, summary.skipped) == (2, 2)  # a.mp4 once, though two URLs name it


def test_dotted_and_duplicate_names_get_safe_unique_ids(tmp_path: Path, memory_store: Store) -> None:
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        write_video(tmp_path / folder / "take 1.final.mkv", frames(2))
    ingest([str(tmp_path / "x"), str(tmp_path / "y")], memory_store)
    assert sorted(read_samples(memory_store)) == [
        "take-1-final-2_000000",
        "take-1-final-2_000001",
        "take-1-final_000000",
        "take-1-final_000001",
    ]
    notes = [r["reason"] for r in index_rows(memory_store) if r["status"] == "note"]
    assert any("made from the name 'take 1.final.mkv'" in n for n in notes)
    assert any("already taken by another source; renamed to 'take-1-final-2'" in n for n in notes)


def test_resharding_keeps_keys_and_bytes_and_drops_duplicates(memory_store: Store) -> None:
    source = Store(memory_store.url + "-src")
    first = [Sample(f"img_{i:04d}", {"jpg": b"\xff\xd8" + bytes([i]) * 10, "cls": b"%d" % i}) for i in range(5)]
    source.commit_bytes("in-000000.tar", encode_shard(first[:3]))
    source.commit_bytes("in-000001.tar", encode_shard([*first[3:], first[0]]))
    summary = ingest([source.url_of("in-{000000..000001}.tar")], memory_store, IngestConfig(limits=ShardLimits(2)))
    assert (summary.shards_read, summary.frames, summary.skipped) == (2, 5, 1)
    assert read_samples(memory_store) == {s.key: dict(s.members) for s in first}
    assert len(summary.shards) == 3
    assert any("duplicate key 'img_0000'" in p.reason for p in summary.problems)


def test_an_earlier_ingest_is_kept_unless_overwrite(tmp_path: Path, memory_store: Store) -> None:
    ingest([str(write_video(tmp_path / "long.mkv", frames(5)))], memory_store, IngestConfig(limits=ShardLimits(2)))
    short = write_video(tmp_path / "short.mkv", frames(1))
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        ingest([str(short)], memory_store)
    ingest([str(short)], memory_store, IngestConfig(limits=ShardLimits(2), overwrite=True))
    assert memory_store.glob("*.tar") == ["frames-000000.tar"]  # stale shards 1 and 2 removed
    assert list(read_samples(memory_store)) == ["short_000000"]
    assert [r["key"] for r in index_rows(memory_store)] == ["short_000000"]  # long's rows went with its shards


def test_another_prefix_adds_sources_beside_an_earlier_ingest_and_the_index_lists_both(
    tmp_path: Path, memory_store: Store
) -> None:
    a, b = write_video(tmp_path / "a.mkv", frames(3)), write_video(tmp_path / "b.mkv", frames(2, seed=1))
    gone = f"{tmp_path}/gone.mp4"
    ingest([str(a), gone], memory_store)
    old = pq.read_table(io.BytesIO(memory_store.read_bytes(INDEX_NAME))).drop_columns(["prefix"])
    buffer = io.BytesIO()
    pq.write_table(old, buffer)
    memory_store.commit_bytes(INDEX_NAME, buffer.getvalue())  # as an index from before the prefix column
    with pytest.raises(FileExistsError, match="or add these sources beside them with another --prefix"):
        ingest([str(b)], memory_store)
    both = [("frames-000000.tar", f"a_{i:06d}") for i in range(3)] + [
        ("more-000000.tar", "b_000000"),
        ("more-000000.tar", "b_000001"),
    ]

    def listed() -> tuple[list[tuple[str, str]], list[str]]:
        rows = index_rows(memory_store)
        return sorted((r["shard"], r["key"]) for r in rows if r["shard"]), [r["reason"] for r in rows if r["reason"]]

    summary = ingest([str(b)], memory_store, IngestConfig(prefix="more"))
    assert listed() == (both, ["not found"]) and summary.frames == 2  # the earlier ingest's problem kept
    # Overwriting one prefix keeps the other's rows, and its own earlier problems go with its shards.
    ingest([str(b), gone], memory_store, IngestConfig(prefix="more", overwrite=True))
    assert listed() == (both, ["not found", "not found"])  # one for each prefix's ingest
    assert sorted(read_samples(memory_store)) == [key for _, key in both]
    assert {r["prefix"] for r in index_rows(memory_store)} == {"frames", "more"}


def test_resharding_into_the_input_folder_is_refused_and_the_shards_stay(tmp_path: Path) -> None:
    shards = Store(str(tmp_path / "frames"))
    ingest([str(write_video(tmp_path / "clip.mp4", frames(12)))], shards, IngestConfig(limits=ShardLimits(6)))
    before = {name: shards.read_bytes(name) for name in shards.glob("*")}
    again = IngestConfig(limits=ShardLimits(2), overwrite=True)  # smaller shards: 000001 is written early
    with pytest.raises(ValueError, match=r"frames-000000.tar: an input shard where this ingest writes its own"):
        ingest([f"{shards.url}/*.tar"], shards, again)
    assert {name: shards.read_bytes(name) for name in shards.glob("*")} == before
    summary = ingest([f"{shards.url}/frames-*.tar"], shards, replace(again, prefix="small"))  # no clash
    assert (summary.frames, len(shards.glob("small-*.tar"))) == (12, 6)
    assert {name: shards.read_bytes(name) for name in shards.glob("frames-*.tar")} == {
        name: data for name, data in before.items() if name.startswith("frames-")
    }


def test_cli_ingest_summarises_and_fails_when_nothing_was_ingested(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    video = write_video(tmp_path / "clip.mp4", frames(3))
    assert main(["ingest", str(video), "--output", str(tmp_path / "out"), "--max-shard-bytes", "1M"]) == 0
    out = capsys.readouterr().out
    assert "1 video(s)" in out and "frames: 3 in 1 shard(s)" in out
    (tmp_path / "bad.mp4").write_bytes(b"\0" * 100)
    assert main(["ingest", str(tmp_path / "bad.mp4"), "--output", str(tmp_path / "out2")]) == 1
    captured = capsys.readouterr()
    assert "bad.mp4: cannot be opened as a video" in captured.out
    assert "nothing could be ingested" in captured.err
    assert main(["ingest", str(video), "--output", str(tmp_path / "out")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_a_second_ingest_while_one_writes_the_output_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    """Before the lease, the second (another --prefix) wrote its shards and index, and the first's
    index, written last, left the second's video out."""
    output = Store(str(tmp_path / "out"))
    first, second = (str(write_video(tmp_path / f"{name}.mp4", frames(4, seed=i))) for i, name in enumerate("ab"))
    refused: list[Exception] = []

    def meanwhile(_: int) -> None:  # called on the first ingest's frames, while it holds the lease
        if not refused:
            with pytest.raises(OutputLocked, match=r"out is being written by run ingest-\w+ \(host") as e:
                ingest([second], output, IngestConfig(prefix="other"))
            refused.append(e.value)

    summary = ingest([first], output, progress=meanwhile)
    assert refused and summary.frames == 4
    assert output.glob("other-*") == [] and {r["video_id"] for r in index_rows(output)} == {"a"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_index.parquet", "frames-000000.tar"]
    assert ingest([second], output, IngestConfig(prefix="other")).frames == 4  # after it: beside it
    assert {r["video_id"] for r in index_rows(output)} == {"a", "b"}


def test_an_ingest_that_fails_leaves_its_shards_but_no_lease_so_a_deblur_into_it_is_refused(tmp_path: Path) -> None:
    """A failed deblur leaves `_lock/unfinished` as its output's mark; an ingest leaves nothing that
    would make its shards look like deblur output, which a deblur into the folder would replace."""
    output = Store(str(tmp_path / "out"))

    def stop_at_the_third(done: list[int] = []) -> None:  # noqa: B006 - the count of calls
        done.append(1)
        if len(done) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(
            [str(write_video(tmp_path / "clip.mp4", frames(6)))],
            output,
            IngestConfig(limits=ShardLimits(1)),
            progress=lambda _: stop_at_the_third(),
        )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["frames-000000.tar", "frames-000001.tar"]
    with pytest.raises(FileExistsError, match=r"frames-000000\.tar: the output folder already holds this shard"):
        refuse_foreign(output, ["frames-000000.tar"])


def test_an_ingest_taken_over_while_it_runs_commits_nothing_more(tmp_path: Path) -> None:
    """A user's --take-over of a run that was still alive: the old run must commit no further shard nor
    the index (the new holder's to write), nor release the new holder's lease."""
    output = Store(str(tmp_path / "out"))
    thief: list[OutputLock] = []

    def take_over(_: int) -> None:
        if not thief:
            thief.append(OutputLock(output, "thief"))
            thief[0].acquire(take_over=True)

    with pytest.raises(LockLost, match=r"out was taken over by run thief \(host .*\); this run stops"):
        ingest(
            [str(write_video(tmp_path / "clip.mp4", frames(3)))],
            output,
            IngestConfig(limits=ShardLimits(1)),
            progress=take_over,
        )
    assert not output.exists(INDEX_NAME)
    assert output.glob("*.tar") == []  # taken over with the first shard not yet committed
    assert thief[0].took_over is not None and thief[0].took_over.startswith("run ingest-")
    assert sorted(output.glob("_lock/*")) == ["_lock/00000002.beat", "_lock/00000002.json"]  # the thief's, alone
    thief[0].release(remove_folder=True)
    assert not output.exists("_lock")


def test_index_rows_streamed_in_row_groups_read_back_as_one_table_in_order(tmp_path: Path) -> None:
    earlier = pa.Table.from_pylist([{"key": f"e{i}", "shard": "old-000000.tar"} for i in range(2)], schema=INDEX_SCHEMA)
    rows = [{"key": f"k{i}", "shard": f"frames-{i // 4:06d}.tar", "frame_index": i} for i in range(10)]

    def write(path: Path) -> bytes:
        with ParquetRows(str(path), INDEX_SCHEMA, chunk=3) as index:
            index.add_table(earlier)
            for row in rows:
                index.add(row)
        assert index.count == 12
        return path.read_bytes()

    data = write(tmp_path / "a.parquet")
    assert write(tmp_path / "b.parquet") == data  # the same rows, the same bytes
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.schema == INDEX_SCHEMA and pq.ParquetFile(tmp_path / "a.parquet").metadata.num_row_groups == 5
    assert table.column("key").to_pylist() == ["e0", "e1", *(f"k{i}" for i in range(10))]
    assert table.column("frame_index").to_pylist() == [None, None, *range(10)]
    with (
        pytest.raises(RuntimeError, match="mid-write"),
        ParquetRows(str(tmp_path / "c.parquet"), INDEX_SCHEMA) as index,
    ):
        index.add(rows[0])
        raise RuntimeError("mid-write")
    assert pq.read_table(tmp_path / "c.parquet").num_rows == 0  # closed, without the rows of the failed write
