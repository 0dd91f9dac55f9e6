"""`adarevd deblur-video`: a folder of real video files with audio, through S3, on a local Ray."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import pytest

from jobs.cli import main
from pipeline.formats import images, video
from pipeline.store.storage import Store
from tests.media import read_samples
from tests.s3server import S3Server

pytestmark = pytest.mark.slow


def ffmpeg(*arguments: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *arguments], check=True)


def frames_of(path: Path) -> tuple[list[np.ndarray], list[float | None]]:
    decoded = list(video.Reader(path, path.name))
    return [d.bgr for d in decoded], [d.pts_ms for d in decoded]


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(audio=0) if p.size]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """walk.mp4 (H.264 + AAC, 10 frames at 10 fps), pan.mkv (FFV1 + FLAC, 6 frames at a variable rate),
    broken.mp4 (not a video)."""
    folder = tmp_path_factory.mktemp("clips")
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(folder / "walk.mp4"),
    )  # fmt: skip
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=80x48:rate=8:duration=0.75",
        "-f", "lavfi", "-i", "sine=frequency=220:duration=1.2",
        "-vf", "setpts='(N+if(gte(N,3),4,0))/8/TB'", "-fps_mode", "vfr",
        "-c:v", "ffv1", "-c:a", "flac", str(folder / "pan.mkv"),
    )  # fmt: skip
    (folder / "broken.mp4").write_bytes(b"these bytes are not a video")
    return folder


def test_a_folder_of_videos_on_s3_comes_back_deblurred_with_its_audio(
    clips: Path, s3: S3Server, local_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bucket = Store(f"s3://{s3.bucket}/deblur-video-{uuid.uuid4().hex[:8]}", s3.storage_options)
    for clip in clips.iterdir():
        bucket.commit_file(f"in/{clip.name}", str(clip))
    # Options before, between and after the positionals.
    arguments = ["deblur-video", "--exit", "2", bucket.url_of("in"), "--crf", "10", bucket.url_of("out")]
    assert main([*arguments, "--workers", "1", *s3.cli_options()]) == 3  # broken.mp4 failed, the rest finished
    out = capsys.readouterr().out
    assert f"failed: {bucket.url_of('in/broken.mp4')}: cannot be opened as a video" in out
    assert "videos: 2 written, 1 failed" in out, out

    deblurred = read_samples(Store(bucket.url_of("out/_work/deblurred"), s3.storage_options))
    for name, frames in (("walk.mp4", 10), ("pan.mkv", 6)):
        local = tmp_path / name
        local.write_bytes(bucket.read_bytes(f"out/{name}"))
        (source := tmp_path / f"source-{name}").write_bytes((clips / name).read_bytes())
        got, times = frames_of(local)
        inputs, source_times = frames_of(source)
        assert len(got) == frames == video.count_frames(source)
        assert times == pytest.approx(source_times)  # the source's timing, variable for pan.mkv
        assert audio_packets(local) == audio_packets(source)  # copied, not re-encoded
        stem = name.split(".")[0]
        model_out = [images.decode(deblurred[f"{stem}_{i:06d}"]["png"])[0] for i in range(frames)]
        assert not all(np.array_equal(a, b) for a, b in zip(model_out, inputs, strict=True))  # depth 2 changes them
        if name == "pan.mkv":  # FFV1: the video holds the deblurred frames exactly
            assert all(np.array_equal(a, b) for a, b in zip(got, model_out, strict=True))
        else:  # H.264 at crf 10: the deblurred frames through the same encoder
            again = tmp_path / "again.mp4"
            video.write_video(again, [f[..., ::-1] for f in model_out], fps=10, encoding=video.Encoding(crf=10))
            assert all(np.array_equal(a, b) for a, b in zip(got, frames_of(again)[0], strict=True))

    written = bucket.read_bytes("out/walk.mp4")
    assert main([*arguments, *s3.cli_options()]) == 3  # a re-run resumes: nothing is redone
    out = capsys.readouterr().out
    assert "walk.mp4: 10 frames (kept from the last run)" in out and "ray:" not in out
    assert bucket.read_bytes("out/walk.mp4") == written


def test_one_video_to_one_file_with_its_work_folder_beside_it(
    clips: Path, local_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    target = tmp_path / "walk.deblurred.mkv"
    assert main(["deblur-video", str(clips / "walk.mp4"), str(target), "--codec", "h264"]) == 0
    assert (tmp_path / "walk.deblurred.mkv.work" / "inputs.json").exists()
    assert video.count_frames(target) == 10 and audio_packets(target) == audio_packets(clips / "walk.mp4")
    # The same work folder for another video is refused; a codec the container cannot hold too.
    assert main(["deblur-video", str(clips / "pan.mkv"), str(target), "--work", f"{target}.work"]) == 2
    assert "is the work folder of other videos" in capsys.readouterr().err
    assert main(["deblur-video", str(clips / "pan.mkv"), str(tmp_path / "pan.mp4"), "--codec", "ffv1"]) == 2
    assert ".mp4 cannot hold ffv1" in capsys.readouterr().err
