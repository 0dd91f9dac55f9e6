"""`adarevd assemble`: frames from shards back into a video, with the source's audio and gap checks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.assemble import AssembleError, AssembleOptions, assemble
from pipeline.deblur.shard import QUARANTINE_SCHEMA
from pipeline.formats import images
from pipeline.formats.shards import Sample, ShardError, encode_shard, iter_samples
from pipeline.formats.video import Encoding
from pipeline.store.storage import Store
from tests.media import decode_video


def streams(path: Path) -> list[str]:
    probe = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True
    )
    return [line.strip() for line in probe.stderr.splitlines() if "Stream #" in line]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 20-frame 10 fps H.264 clip with a sine-wave AAC track, ingested into 3 shards."""
    folder = tmp_path_factory.mktemp("assemble")
    source = folder / "clip.mp4"
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-y",
        "-loglevel",
        "error",
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=10",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440",
        "-t",
        "2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        str(source),
    ]
    subprocess.run(command, check=True)
    shards = folder / "frames"
    assert main(["ingest", str(source), "--output", str(shards), "--max-frames-per-shard", "7"]) == 0
    return source, shards


def test_frames_come_back_in_order_losslessly_with_the_audio(ingested: tuple[Path, Path], tmp_path: Path) -> None:
    source, shards = ingested
    out = tmp_path / "clip.mkv"
    assert main(["assemble", str(shards), "--video", "clip", "--to", str(out), "--source", str(source)]) == 0
    frames = decode_video(out)
    expected = {}
    for shard in sorted(shards.glob("*.tar")):
        with shard.open("rb") as stream:
            for sample in iter_samples(stream, shard.name):
                meta = json.loads(sample.members["json"])
                expected[meta["frame_index"]] = images.decode(sample.members["png"])[0]  # BGR, as decode_video
    assert len(frames) == 20 == len(expected)
    assert all(np.array_equal(frames[i], expected[i]) for i in range(20))  # FFV1 is lossless
    kinds = streams(out)
    assert any("Video: ffv1" in s for s in kinds) and any("Audio: aac" in s for s in kinds)
    assert cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FPS) == pytest.approx(10, abs=0.01)


def test_an_existing_file_is_replaced_only_when_asked_and_never_the_source(
    ingested: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source, shards = ingested
    out = tmp_path / "clip.mkv"
    out.write_bytes(b"someone's video")
    assert main(["assemble", str(shards), "--video", "clip", "--to", str(out)]) == 2
    assert "already exists; choose another --output, or pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"someone's video"
    assert main(["assemble", str(shards), "--video", "clip", "--to", str(out), "--overwrite"]) == 0
    assert len(decode_video(out)) == 20
    original = source.read_bytes()
    for extra in ([], ["--overwrite"]):
        to = str(tmp_path / ".." / source.parent.name / source.name)  # the source, spelt another way
        assert main(["assemble", str(shards), "--video", "clip", "--to", to, "--source", str(source), *extra]) == 2
        assert "this is the --source video" in capsys.readouterr().err
    assert source.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mkv"]  # no temporary left behind


@pytest.mark.parametrize(
    ("codec", "suffix", "marker"), [("h264", ".mp4", "Video: h264"), ("mp4v", ".mp4", "Video: mpeg4")]
)
def test_other_codecs(codec: str, suffix: str, marker: str, ingested: tuple[Path, Path], tmp_path: Path) -> None:
    _, shards = ingested
    out = tmp_path / f"clip{suffix}"
    done = assemble(Store(str(shards)), "clip", out, AssembleOptions(encoding=Encoding(codec=codec)))  # type: ignore[arg-type]
    assert (done.frames, done.variable_rate) == (20, False)
    assert len(decode_video(out)) == 20 and any(marker in s for s in streams(out))


def test_gaps_doubles_and_quarantine_are_listed(ingested: tuple[Path, Path], tmp_path: Path) -> None:
    source, shards = ingested
    copy = Store(str(tmp_path / "copy"))
    names = sorted(p.name for p in shards.glob("*.tar"))
    for name in names[:2]:  # frames 0-13; 14-19 are missing
        copy.commit_bytes(name, (shards / name).read_bytes())
    with pytest.raises(AssembleError, match="missing 6 frame\\(s\\): 14-19"):
        assemble(copy, "clip", tmp_path / "a.mkv", AssembleOptions(source=str(source)))
    assemble(copy, "clip", tmp_path / "b.mkv")  # without the source, 0-13 is a whole video

    reason = "cannot be decoded as an image"
    table = pa.Table.from_pylist(
        [{"shard": names[0], "key": "clip_000003", "reason": reason}], schema=QUARANTINE_SCHEMA
    )
    with (shards / names[0]).open("rb") as stream:
        samples = [s for s in iter_samples(stream, names[0]) if s.key != "clip_000003"]
    copy.commit_bytes(names[0], encode_shard(samples))
    sink = tmp_path / "q.parquet"
    pq.write_table(table, sink)
    copy.commit_bytes("_quarantine/frames-000000.parquet", sink.read_bytes())
    doubled = Sample("clip-again_000005", samples[4].members)
    copy.commit_bytes("extra.tar", encode_shard([doubled]))
    with pytest.raises(AssembleError) as error:
        assemble(copy, "clip", tmp_path / "c.mkv")
    message = str(error.value)
    assert "doubled: frame 5 in clip-again_000005, clip_000005" in message  # extra.tar is read first
    assert "missing 1 frame(s): 3" in message and f"frame 3: {reason}" in message
    assert not (tmp_path / "c.mkv").exists()
    assert main(["assemble", copy.url, "--video", "nope", "--to", str(tmp_path / "d.mkv")]) == 2


def frame_times(path: Path) -> list[float]:
    import av

    with av.open(str(path)) as container:
        return [round(float(f.time) * 1000, 1) for f in container.decode(video=0)]


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_a_variable_rate_source_keeps_its_timestamps(suffix: str, tmp_path: Path) -> None:
    # 10 frames at 10 fps nominal with a 0.6 s pause after frame 4 (e.g. a phone clip), plus audio.
    source = tmp_path / "vfr.mkv"
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-y",
        "-loglevel",
        "error",
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=10:duration=1",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=1.5",
        "-vf",
        "setpts='(N+if(gte(N,5),5,0))/10/TB'",
        "-fps_mode",
        "vfr",
        "-c:v",
        "ffv1",
        "-c:a",
        "flac",
        str(source),
    ]
    subprocess.run(command, check=True)
    expected = [0.0, 100.0, 200.0, 300.0, 400.0, 1000.0, 1100.0, 1200.0, 1300.0, 1400.0]
    assert frame_times(source) == expected
    shards = tmp_path / "frames"
    assert main(["ingest", str(source), "--output", str(shards)]) == 0
    index = pq.read_table(shards / "_index.parquet").to_pylist()
    assert {r["status"] for r in index} == {"ok"}  # fewer frames than duration x fps, yet whole: no "truncated"
    out = tmp_path / f"out{suffix}"
    done = assemble(Store(str(shards)), "vfr", out, AssembleOptions(source=str(source) if suffix == ".mkv" else None))
    assert (done.frames, done.variable_rate) == (10, True)
    assert frame_times(out) == expected
    if suffix == ".mkv":  # lossless, and the audio came along
        got = decode_video(out)
        assert all(np.array_equal(g, s) for g, s in zip(got, decode_video(source), strict=True))
        assert any("Audio: flac" in s for s in streams(out))
    with pytest.raises(AssembleError, match="variable timestamps, which AVI cannot hold"):
        assemble(Store(str(shards)), "vfr", tmp_path / "out.avi")
    steady = assemble(Store(str(shards)), "vfr", tmp_path / "steady.mkv", AssembleOptions(constant_rate=True))
    assert not steady.variable_rate and frame_times(tmp_path / "steady.mkv") == [100.0 * i for i in range(10)]


def test_one_video_of_an_archive_is_found_from_the_index_or_the_manifests(
    ingested: tuple[Path, Path], tmp_path: Path
) -> None:
    _, shards = ingested
    names = sorted(p.name for p in shards.glob("*.tar"))
    for listing in ("index", "manifests"):
        archive = Store(str(tmp_path / listing))
        for name in names:
            archive.commit_bytes(name, (shards / name).read_bytes())
        # Another video's shard that is damaged: assembling "clip" must not need to read it.
        archive.commit_bytes("other-000000.tar", b"\x13\x37" * 700)
        rows = [{"shard": n, "key": f"clip_{7 * i:06d}", "video_id": "clip"} for i, n in enumerate(names)]
        rows.append({"shard": "other-000000.tar", "key": "other_000000", "video_id": "other"})
        table = pa.Table.from_pylist(rows)
        sink = tmp_path / f"{listing}.parquet"
        if listing == "index":
            pq.write_table(table, sink)
            archive.commit_bytes("_index.parquet", sink.read_bytes())
        else:
            for shard in {r["shard"] for r in rows}:
                pq.write_table(table.filter(pc.equal(table["shard"], shard)).select(["shard", "key"]), sink)
                archive.commit_bytes(f"_manifest/{shard[:-4]}.parquet", sink.read_bytes())
        assert assemble(archive, "clip", tmp_path / f"{listing}.mkv").frames == 20, listing
        with pytest.raises(AssembleError, match=r"no frames of video 'clp' in .*; it holds: clip, other$"):
            assemble(archive, "clp", tmp_path / f"typo-{listing}.mkv")  # a typo: the videos here are named
        with pytest.raises(ShardError, match=r"other-000000\.tar"):  # the damaged shard is there all the same
            assemble(archive, "other", tmp_path / f"other-{listing}.mkv")
