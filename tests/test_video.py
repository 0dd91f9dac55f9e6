"""`formats.video`: decoding and encoding through PyAV, checked with files that the ffmpeg binary made."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import pytest

from adarevd.errors import InvalidInput
from jobs.cli import main
from pipeline.formats import video
from pipeline.formats.shards import iter_samples
from pipeline.store.storage import Store
from tests.s3server import S3Server


def ffmpeg(*arguments: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *arguments], check=True)


def test_a_10_bit_source_is_converted_to_8_bit_and_recorded(tmp_path: Path) -> None:
    source = tmp_path / "deep.mkv"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=10:duration=0.5",
        "-c:v",
        "ffv1",
        "-pix_fmt",
        "yuv444p10le",
        str(source),
    )
    reference = tmp_path / "reference.mkv"  # ffmpeg's own conversion of the same frames to 8-bit RGB
    ffmpeg("-i", str(source), "-c:v", "ffv1", "-pix_fmt", "bgr0", str(reference))
    reader = video.Reader(source, "deep.mkv")
    assert reader.info.pix_fmt == "yuv444p10le" and not reader.info.eight_bit
    ours = [d.bgr for d in reader]
    theirs = [d.bgr for d in video.Reader(reference, "reference.mkv")]
    assert len(ours) == 5 and all(a.dtype == np.uint8 for a in ours)
    assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(ours, theirs, strict=True)) <= 1

    shards = tmp_path / "frames"
    assert main(["ingest", str(source), "--output", str(shards)]) == 0
    with (shards / "frames-000000.tar").open("rb") as stream:
        metas = [json.loads(s.members["json"]) for s in iter_samples(stream, "frames-000000.tar")]
    assert {m["source_pix_fmt"] for m in metas} == {"yuv444p10le"}
    import pyarrow.parquet as pq

    notes = [r["reason"] for r in pq.read_table(shards / "_index.parquet").to_pylist() if r["status"] == "note"]
    assert any("yuv444p10le source converted to 8-bit RGB" in (n or "") for n in notes)


def test_timestamps_are_the_stream_s_own(tmp_path: Path) -> None:
    source = tmp_path / "ntsc.mp4"  # 30000/1001 fps: times are not whole milliseconds
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=30000/1001:duration=0.2", "-c:v", "libx264", str(source))
    times = [d.pts_ms for d in video.Reader(source, "ntsc.mp4")]
    with av.open(str(source)) as container:
        exact = [float(f.pts * f.time_base) * 1000 for f in container.decode(video=0)]
    assert times == pytest.approx(exact, abs=1e-6) and times[1] == pytest.approx(1001 / 30, abs=1e-6)


@pytest.mark.parametrize(
    ("encoding", "name", "expected"),
    [
        (video.Encoding(), "a.mp4", ("h264", "yuv420p")),
        (video.Encoding(codec="h264", crf=30, preset="ultrafast", pix_fmt="yuv444p"), "b.mkv", ("h264", "yuv444p")),
        (video.Encoding(codec="hevc", pix_fmt="yuv420p10le"), "c.mp4", ("hevc", "yuv420p10le")),
        (video.Encoding(), "d.avi", ("mjpeg", "yuvj420p")),
        (video.Encoding(), "e.mkv", ("ffv1", "bgr0")),
    ],
)
def test_encodings(encoding: video.Encoding, name: str, expected: tuple[str, str], tmp_path: Path) -> None:
    frames = [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(4)]
    assert video.write_video(tmp_path / name, frames, fps=12.5, encoding=encoding) == 4
    with av.open(str(tmp_path / name)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == expected
        assert float(stream.average_rate) == 12.5
    assert video.count_frames(tmp_path / name) == 4
    again = tmp_path / f"again{Path(name).suffix}"
    video.write_video(again, frames, fps=12.5, encoding=encoding)
    assert again.read_bytes() == (tmp_path / name).read_bytes()  # same frames, same bytes


def test_encodings_a_container_or_codec_cannot_take_are_refused(tmp_path: Path) -> None:
    frames = [np.zeros((48, 64, 3), np.uint8)]
    with pytest.raises(video.VideoError, match=r"\.mp4 cannot hold ffv1; use \.mkv"):
        video.write_video(tmp_path / "x.mp4", frames, fps=10, encoding=video.Encoding(codec="ffv1"))
    with pytest.raises(video.VideoError, match="--crf and --preset apply to h264 and hevc, not ffv1"):
        video.write_video(tmp_path / "x.mkv", frames, fps=10, encoding=video.Encoding(codec="ffv1", crf=20))
    assert video.write_video(tmp_path / "z.mkv", frames, fps=10, encoding=video.Encoding(crf=20)) == 1  # lossless
    with pytest.raises(video.VideoError, match="unsupported video extension"):
        video.write_video(tmp_path / "x.webm", frames, fps=10)
    with pytest.raises(video.VideoError, match="check --pix-fmt"):
        video.write_video(tmp_path / "y.mp4", frames, fps=10, encoding=video.Encoding(pix_fmt="no-such-format"))


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(audio=0) if p.size]


def test_audio_is_copied_packet_for_packet(tmp_path: Path) -> None:
    source = tmp_path / "talk.mp4"
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=2",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
        "-c:v", "libx264", "-c:a", "aac", str(source),
    )  # fmt: skip
    pictures = tmp_path / "pictures.mkv"
    video.write_video(pictures, [d.bgr[..., ::-1] for d in video.Reader(source, "talk.mp4")], fps=10)
    assert video.copy_audio(pictures, source, tmp_path / "out.mkv")
    assert not video.copy_audio(pictures, pictures, tmp_path / "silent.mkv")  # no audio there: nothing written
    assert not (tmp_path / "silent.mkv").exists()
    assert audio_packets(tmp_path / "out.mkv") == audio_packets(source)
    assert video.count_frames(tmp_path / "out.mkv") == 20
    assert video.extract_audio(source, tmp_path / "sound.mp4")  # the audio alone, in the source's container
    with av.open(str(tmp_path / "sound.mp4")) as container:
        assert [s.type for s in container.streams] == ["audio"]
    assert audio_packets(tmp_path / "sound.mp4") == audio_packets(source)
    assert not video.extract_audio(pictures, tmp_path / "none.mkv") and not (tmp_path / "none.mkv").exists()


def test_assemble_reads_and_writes_any_store(s3: S3Server, tmp_path: Path) -> None:
    source = tmp_path / "walk.mp4"
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:v", "libx264", "-c:a", "aac", str(source),
    )  # fmt: skip
    bucket = Store(f"s3://{s3.bucket}/assemble-{uuid.uuid4().hex[:8]}", s3.storage_options)
    bucket.commit_file("videos/walk.mp4", str(source))
    assert (
        main(["ingest", bucket.url_of("videos/walk.mp4"), "--output", bucket.url_of("frames"), *s3.cli_options()]) == 0
    )
    out = bucket.url_of("videos/walk.assembled.mp4")
    arguments = [
        "assemble",
        bucket.url_of("frames"),
        "--video",
        "walk",
        "--output",
        out,
        "--crf",
        "20",
        *s3.cli_options(),
    ]
    assert main([*arguments, "--source", bucket.url_of("videos/walk.mp4")]) == 0
    local = tmp_path / "back.mp4"
    local.write_bytes(bucket.read_bytes("videos/walk.assembled.mp4"))
    with av.open(str(local)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
    assert video.count_frames(local) == 10
    assert main(arguments) == 2  # there now: refused without --overwrite


def test_deblur_video_plans_an_output_for_each_video(tmp_path: Path) -> None:
    from pipeline import videos

    for relative in ("a/take.mp4", "b/take.mp4", "b/old.webm", "b/notes.txt"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    found = videos.plan([str(tmp_path)], "out", None, {})
    assert [(Path(j.source).relative_to(tmp_path).as_posix(), j.output) for j in found.videos] == [
        ("a/take.mp4", "out/take.mp4"),
        ("b/old.webm", "out/old.mkv"),  # a container we do not write: Matroska
        ("b/take.mp4", "out/take-2.mp4"),  # the name is taken: the video id
    ]
    assert found.work == "out/_work" and [Path(p.source).name for p in found.skipped] == ["notes.txt"]
    one = videos.plan([str(tmp_path / "a/take.mp4")], "s3://bucket/take.deblurred.mov", None, {})
    assert (
        one.videos[0].output == "s3://bucket/take.deblurred.mov" and one.work == "s3://bucket/take.deblurred.mov.work"
    )
    with pytest.raises(InvalidInput, match="3 videos need an output folder"):
        videos.plan([str(tmp_path)], "out.mp4", None, {})
    with pytest.raises(InvalidInput, match="no video under"):
        videos.plan([str(tmp_path / "b/notes.txt")], "out", None, {})


def test_deblur_video_reads_each_remote_source_once(tmp_path: Path, memory_store: Store) -> None:
    """Ingest keeps each video's audio beside its frames: the video is assembled, with its audio and
    checked against the frames ingested, after its source is gone."""
    from pipeline import videos
    from pipeline.ingest.run import IngestConfig, ingest

    ffmpeg(
        "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:v", "libx264", "-c:a", "aac",
        str(tmp_path / "talk.mp4"),
    )  # fmt: skip
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=0.6", "-c:v", "ffv1", str(tmp_path / "mute.mkv"))
    for name in ("talk.mp4", "mute.mkv"):
        memory_store.commit_file(f"in/{name}", str(tmp_path / name))
    found = videos.plan([memory_store.url_of("in")], str(tmp_path / "out"), None, {})
    work = Store(found.work)
    frames = Store(work.url_of("frames"))
    ingest([job.source for job in found.videos], frames, IngestConfig(keep_audio=True))
    for name in ("talk.mp4", "mute.mkv"):
        memory_store.remove(f"in/{name}")  # nothing after ingest reads the sources

    seen = videos.ingested(frames)
    assert seen.frames == {"mute": 6, "talk": 10}
    for job in found.videos:
        video_id = seen.ids[job.source]
        audio = videos.audio_of(frames, job, video_id)
        how = videos.Assembly(
            video_id=video_id, frames=seen.frames[video_id], audio=audio, encoding=video.Encoding(), overwrite=False
        )
        done = videos.finish(frames, work, job, how)  # the ingested frames stand in for deblurred ones
        assert done.frames == seen.frames[video_id] == video.count_frames(Path(job.output))
        assert done.audio == (video_id == "talk") and (audio is None) == (video_id == "mute")
    assert audio_packets(tmp_path / "out/talk.mp4") == audio_packets(tmp_path / "talk.mp4")  # copied, not re-encoded

    # Frames ingested without keep_audio (an older work folder): the audio comes from the source.
    plain = Store(str(tmp_path / "plain"))
    ingest([str(tmp_path / "talk.mp4")], plain)
    job = videos.VideoJob(str(tmp_path / "talk.mp4"), str(tmp_path / "plain.mp4"))
    assert not plain.exists("_audio") and videos.audio_of(plain, job, "talk") == job.source
