"""Video files in and out, all through PyAV (FFmpeg's libraries; its wheels carry libx264, libx265 and FFV1).

Decoding gives each frame's exact timestamp (its pts in the stream's time base) and converts any pixel
format, 10-bit included, to 8-bit BGR; the source's pixel format is reported so the conversion is on
record. Encoding takes a codec, a quality (crf), an x264/x265 preset and an output pixel format, at a
constant rate or with each frame at its own timestamp. Encoders run single-threaded, so the same
frames give the same bytes. Audio is copied from a source video packet by packet, never re-encoded.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePath
from typing import IO, Literal

import av
import numpy as np

from adarevd.errors import InvalidInput

Codec = Literal["ffv1", "h264", "hevc", "mp4v", "mjpg"]
# codec -> (PyAV encoder, default pixel format, the containers that hold it)
CODECS: dict[Codec, tuple[str, str, tuple[str, ...]]] = {
    "ffv1": ("ffv1", "bgr0", (".mkv",)),  # lossless RGB: decodes back bit-exactly
    "h264": ("libx264", "yuv420p", (".mp4", ".mkv", ".mov")),
    "hevc": ("libx265", "yuv420p", (".mp4", ".mkv", ".mov")),
    "mp4v": ("mpeg4", "yuv420p", (".mp4", ".mkv", ".avi", ".mov")),
    "mjpg": ("mjpeg", "yuvj420p", (".avi", ".mkv", ".mov")),
}
DEFAULT_CODEC: dict[str, Codec] = {".mkv": "ffv1", ".mp4": "h264", ".mov": "h264", ".avi": "mjpg"}
SUFFIXES = tuple(DEFAULT_CODEC)
BITEXACT = {"fflags": "+bitexact"}  # no random ids or library versions in the container: same input, same bytes


class VideoError(InvalidInput):
    """A video that cannot be read or written as asked; the message names the file."""


@dataclass(frozen=True, kw_only=True)
class Encoding:
    """How frames become a video. None: the codec's default (crf 14 and preset slow for H.264/HEVC:
    a synthetic blurry frame stays at about 39 dB; the codec's own pixel format)."""

    codec: Codec | None = None  # default: from the file's suffix (.mkv ffv1, .mp4/.mov h264, .avi mjpg)
    crf: int | None = None  # 0 best .. 51 worst (h264, hevc; the suffix's other codecs ignore it)
    preset: str | None = None  # x264/x265 speed preset: ultrafast .. veryslow (the same)
    pix_fmt: str | None = None  # e.g. yuv444p, yuv420p10le

    def codec_for(self, path: PurePath) -> Codec:
        """The codec for `path`, checked against its container."""
        suffix = path.suffix.lower()
        if suffix not in DEFAULT_CODEC:
            raise VideoError(f"{path}: unsupported video extension; use one of {', '.join(SUFFIXES)}")
        codec = self.codec or DEFAULT_CODEC[suffix]
        if suffix not in CODECS[codec][2]:
            raise VideoError(f"{path}: {suffix} cannot hold {codec}; use {' or '.join(CODECS[codec][2])}")
        return codec

    def options(self, codec: Codec) -> dict[str, str]:
        if codec in ("h264", "hevc"):
            return {"crf": str(14 if self.crf is None else self.crf), "preset": self.preset or "slow"}
        if self.codec is not None and (self.crf is not None or self.preset is not None):
            raise VideoError(f"--crf and --preset apply to h264 and hevc, not {codec}")  # else: lossless or fixed
        return {"qscale": "2"} if codec in ("mp4v", "mjpg") else {}


@dataclass(frozen=True)
class VideoInfo:
    fps: float | None  # the stream's average rate
    frames: int  # announced by the header (or estimated from the duration); 0 if unknown
    pix_fmt: str  # the source's pixel format, e.g. yuv420p10le

    @property
    def eight_bit(self) -> bool:
        return av.VideoFormat(self.pix_fmt).components[0].bits <= 8


@dataclass(frozen=True)
class Decoded:
    bgr: np.ndarray  # (H, W, 3) uint8
    pts_ms: float | None  # exact: pts x time base


@dataclass
class Reader:
    """The frames of one video, in decode order, with `info`; `error` holds why decoding stopped early."""

    source: str | Path | IO[bytes]
    name: str
    info: VideoInfo = field(init=False)
    error: str | None = None

    def __post_init__(self) -> None:
        self._container = _open(self.source, self.name)
        try:
            stream = self._container.streams.video[0]
        except IndexError:
            self._container.close()
            raise VideoError(f"{self.name}: no video stream") from None
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        frames = stream.frames
        if not frames and fps and self._container.duration:
            frames = round(self._container.duration / av.time_base * fps)
        self.info = VideoInfo(fps, int(frames), stream.codec_context.pix_fmt or "unknown")

    def __iter__(self) -> Iterator[Decoded]:
        try:
            for frame in self._container.decode(video=0):
                time = frame.time
                yield Decoded(frame.to_ndarray(format="bgr24"), None if time is None else round(time * 1000, 6))
        except av.error.FFmpegError as e:
            self.error = str(e)
        finally:
            self._container.close()


def _open(source: str | Path | IO[bytes], name: str) -> av.container.InputContainer:
    try:
        return av.open(source if not isinstance(source, Path) else str(source), "r")
    except av.error.FFmpegError as e:
        raise VideoError(f"{name}: cannot open it as a video ({e}); damaged, truncated or not a video") from None


def count_frames(path: Path) -> int:
    """Frames a video file decodes to (decoded, not the header's estimate)."""
    container = _open(path, str(path))
    try:
        return sum(1 for _ in container.decode(video=0))
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: decoding failed ({e})") from None
    finally:
        container.close()


def write_video(path: Path, frames_rgb: Iterable[np.ndarray], *, fps: float, encoding: Encoding = Encoding()) -> int:
    """Frames at a constant `fps`; returns the number written."""
    rate = Fraction(fps).limit_denominator(1001)
    return _write(path, ((frame, i) for i, frame in enumerate(frames_rgb)), 1 / rate, (encoding, rate))


def write_timed_video(
    path: Path, frames_rgb: Iterable[np.ndarray], pts_ms: Sequence[float], encoding: Encoding = Encoding()
) -> int:
    """Frames at their own times (ms, any start; a millisecond time base). AVI has no timestamps."""
    if path.suffix.lower() == ".avi":
        raise VideoError(f"{path}: AVI holds a fixed rate only, not each frame's time; write .mkv or .mp4")
    start = pts_ms[0] if pts_ms else 0.0
    ticks = (round(t - start) for t in pts_ms)
    return _write(path, zip(frames_rgb, ticks, strict=False), Fraction(1, 1000), (encoding, None))


def _write(
    path: Path,
    frames: Iterable[tuple[np.ndarray, int]],
    time_base: Fraction,
    how: tuple[Encoding, Fraction | None],
) -> int:
    encoding, rate = how
    codec = encoding.codec_for(path)
    encoder, pix_fmt, _ = CODECS[codec]
    pix_fmt = encoding.pix_fmt or pix_fmt
    options = encoding.options(codec) | {"threads": "1"}
    if codec == "hevc":
        options["x265-params"] = "log-level=error:pools=none:frame-threads=1"
    path.parent.mkdir(parents=True, exist_ok=True)
    count, last = 0, -1
    with av.open(str(path), "w", container_options=BITEXACT) as container:
        stream = None
        for frame, tick in frames:
            if stream is None:
                stream = _add_stream(container, (encoder, pix_fmt, options), frame.shape[:2], rate)
                stream.time_base = stream.codec_context.time_base = time_base
            if tick <= last:
                raise VideoError(f"{path}: frame {count} does not come after the one before it")
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, np.uint8), format="rgb24")
            picture = picture.reformat(format=pix_fmt)
            picture.pts, picture.time_base = tick, time_base
            container.mux(stream.encode(picture))
            last, count = tick, count + 1
        if stream is not None:
            container.mux(stream.encode(None))
    return count


def _add_stream(
    container: av.container.OutputContainer,
    spec: tuple[str, str, dict[str, str]],
    size: tuple[int, ...],
    rate: Fraction | None,
) -> av.VideoStream:
    encoder, pix_fmt, options = spec
    try:
        stream = container.add_stream(encoder, rate=rate, options=options)
        stream.height, stream.width = size
        stream.pix_fmt = pix_fmt
    except (av.error.FFmpegError, ValueError) as e:
        raise VideoError(f"{container.name}: cannot encode {encoder} as {pix_fmt} ({e}); check --pix-fmt") from None
    return stream


def copy_audio(video: Path, source: str | Path | IO[bytes], to: Path) -> bool:
    """`to` = `video`'s video stream + `source`'s audio streams, both copied, interleaved by time.
    Returns False (and writes nothing) when the source has no audio."""
    with av.open(str(video)) as picture, _open(source, str(source)) as sound:
        if not sound.streams.audio:
            return False
        _copy_streams(to, [(picture, [picture.streams.video[0]]), (sound, list(sound.streams.audio))], source)
    return True


def extract_audio(source: Path, to: Path) -> bool:
    """`to` (a container like `source`'s) = `source`'s audio streams, copied packet for packet.
    Returns False (and writes nothing) when the source has no audio."""
    with _open(source, str(source)) as sound:
        if not sound.streams.audio:
            return False
        _copy_streams(to, [(sound, list(sound.streams.audio))], source)
    return True


def _copy_streams(to: Path, parts: list[tuple[av.container.InputContainer, list]], source: object) -> None:
    """Write `to` from each part's streams, packets copied and interleaved by time. `source`: named
    in errors, as the file whose audio `to` cannot hold."""
    try:
        out = av.open(str(to), "w", container_options=BITEXACT)
    except (av.error.FFmpegError, ValueError) as e:
        raise VideoError(f"{to}: cannot write this container ({e}); try .mkv") from None
    with out:
        streams = {}
        for _, chosen in parts:
            for stream in chosen:
                try:
                    streams[stream] = out.add_stream_from_template(stream)
                except (av.error.FFmpegError, ValueError) as e:
                    raise VideoError(f"{to}: cannot hold the audio of {source} ({e}); try .mkv") from None
        merged = heapq.merge(*(_timed(container.demux(*chosen), n) for n, (container, chosen) in enumerate(parts)))
        try:
            for *_, packet in merged:
                packet.stream = streams[packet.stream]
                out.mux(packet)
        except av.error.FFmpegError as e:
            raise VideoError(f"{to}: cannot hold the audio of {source} ({e}); try .mkv") from None


def _timed(packets: Iterable[av.Packet], order: int) -> Iterator[tuple[float, int, int, av.Packet]]:
    """(time in s, `order`, sequence, packet) for the packets that carry data (flush packets do not)."""
    for n, packet in enumerate(packets):
        time = packet.dts if packet.dts is not None else packet.pts  # Matroska stores no dts
        if time is None or packet.size == 0:
            continue
        yield float(time * packet.time_base), order, n, packet
