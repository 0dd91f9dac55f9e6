"""Writing RGB frames to a video file; the container's extension picks the codec.

.mp4: H.264 (yuv420p, what archives and players use) through the ffmpeg binary that the
`imageio-ffmpeg` package ships: OpenCV's wheel has no H.264 encoder. Single-threaded and `-bitexact`,
so the same frames give the same bytes. .mkv: lossless FFV1 and .avi: MJPG, both through OpenCV.
`write_timed_video` gives every frame its own timestamp (variable frame rate) through PyAV (FFmpeg's
libraries; its wheels carry libx264 and FFV1).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from adarevd.errors import InvalidInput

OPENCV_CODECS = {".mkv": "FFV1", ".avi": "MJPG"}
SUFFIXES = (".mp4", *OPENCV_CODECS)


def write_video(path: Path, frames_rgb: Iterable[np.ndarray], fps: float, *, crf: int = 14, mp4v: bool = False) -> int:
    """Write (H, W, 3) uint8 RGB frames to `path`; returns the number written. `crf`: H.264 quality
    (0 best .. 51 worst; 14 keeps a synthetic blurry frame at about 39 dB). `mp4v`: an .mp4 in MPEG-4
    part 2 through OpenCV instead of H.264."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidInput(f"{path}: unsupported video extension; use one of {', '.join(SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4" and mp4v:
        return _write_opencv(path, frames_rgb, fps, "mp4v")
    if suffix == ".mp4":
        return _write_h264(path, frames_rgb, fps, crf)
    return _write_opencv(path, frames_rgb, fps, OPENCV_CODECS[suffix])


def _write_opencv(path: Path, frames_rgb: Iterable[np.ndarray], fps: float, codec: str) -> int:
    writer: cv2.VideoWriter | None = None
    count = 0
    try:
        for frame in frames_rgb:
            if writer is None:
                height, width = frame.shape[:2]
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
                if not writer.isOpened():
                    raise OSError(f"{path}: OpenCV cannot open a {codec} writer")
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            count += 1
    finally:
        if writer is not None:
            writer.release()
    return count


def _write_h264(path: Path, frames_rgb: Iterable[np.ndarray], fps: float, crf: int) -> int:
    import imageio_ffmpeg

    process: subprocess.Popen[bytes] | None = None
    count = 0
    try:
        for frame in frames_rgb:
            if process is None:
                height, width = frame.shape[:2]
                command = [
                    imageio_ffmpeg.get_ffmpeg_exe(),
                    "-y",
                    "-loglevel",
                    "error",
                    "-f",
                    "rawvideo",
                    "-pix_fmt",
                    "rgb24",
                    "-s",
                    f"{width}x{height}",
                    "-r",
                    f"{fps}",
                    "-i",
                    "-",
                    "-c:v",
                    "libx264",
                    "-preset",
                    "slow",
                    "-crf",
                    str(crf),
                    "-pix_fmt",
                    "yuv420p",
                    "-threads",
                    "1",
                    "-bitexact",
                    "-map_metadata",
                    "-1",
                    str(path),
                ]
                process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
            assert process.stdin is not None
            process.stdin.write(np.ascontiguousarray(frame, np.uint8).tobytes())
            count += 1
    finally:
        if process is not None:
            _, errors = process.communicate()
            if process.returncode != 0:
                raise OSError(f"{path}: ffmpeg failed ({process.returncode}): {errors.decode(errors='replace')[-500:]}")
    return count


# codec -> (PyAV encoder, pixel format, options): FFV1 stays lossless in RGB; H.264 as `_write_h264`.
TIMED_CODECS: dict[str, tuple[str, str, dict[str, str]]] = {
    "ffv1": ("ffv1", "bgr0", {}),
    "h264": ("libx264", "yuv420p", {"crf": "14", "preset": "slow", "threads": "1"}),
    "mp4v": ("mpeg4", "yuv420p", {"qscale": "2"}),
}


def write_timed_video(path: Path, frames_rgb: Iterable[np.ndarray], pts_ms: Sequence[float], codec: str) -> int:
    """Write frames at their own times (ms, any start; a millisecond time base) to .mkv or .mp4 (AVI
    has no timestamps, only a fixed rate). Returns the number written."""
    import av

    if codec not in TIMED_CODECS:
        raise InvalidInput(f"{path}: variable-rate video needs one of {', '.join(TIMED_CODECS)}, not {codec}")
    encoder, pix_fmt, options = TIMED_CODECS[codec]
    path.parent.mkdir(parents=True, exist_ok=True)
    millis = Fraction(1, 1000)
    start = pts_ms[0] if pts_ms else 0.0
    count = 0
    with av.open(str(path), "w") as container:
        stream = None
        last = -1
        for frame, pts in zip(frames_rgb, pts_ms, strict=False):
            if stream is None:
                stream = container.add_stream(encoder, options=options)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = pix_fmt
                stream.time_base = stream.codec_context.time_base = millis
            ticks = round(pts - start)
            if ticks <= last:
                raise InvalidInput(f"{path}: frame {count} at {pts} ms does not come after the one before")
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, np.uint8), format="rgb24")
            picture = picture.reformat(format=pix_fmt)
            picture.pts, picture.time_base = ticks, millis
            container.mux(stream.encode(picture))
            last, count = ticks, count + 1
        if stream is not None:
            container.mux(stream.encode(None))
    return count
