"""`adarevd assemble`: the frames of one video, from (deblurred or ingested) shards, back into a video.

Pass 1 reads every sample's `json` (video_id, frame_index, pts_ms, fps) and checks the frames of the
video: none doubled, none missing between 0 and the last (nor after it, when the source video is
given to count its frames); quarantined frames are named with their reason. Pass 2 streams the shards
again in frame order and writes the video at the source frame rate: lossless FFV1 (.mkv, default),
H.264 (.mp4, ffmpeg from `imageio-ffmpeg`), mp4v (MPEG-4 part 2 through OpenCV) or MJPG (.avi). Where
the frames' timestamps (`pts_ms`, read from the source by ingest) stray from that rate by more than
half a frame, the source varied its rate: every frame keeps its own timestamp (PyAV; .mkv or .mp4).
With the source file given, its audio streams are copied in (ffmpeg, no re-encoding).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pyarrow.compute as pc

from adarevd.errors import InvalidInput
from pipeline.deblur.manifests import read_manifests, read_quarantine
from pipeline.deblur.shard import output_names
from pipeline.formats import images
from pipeline.formats.frames import image_member
from pipeline.formats.shards import iter_samples, sample_meta
from pipeline.formats.video import write_timed_video, write_video
from pipeline.ingest.run import INDEX_NAME, read_index
from pipeline.store.scratch import scratch
from pipeline.store.storage import Store

Codec = Literal["ffv1", "h264", "mp4v", "mjpg"]
CODEC_SUFFIX: dict[Codec, str] = {"ffv1": ".mkv", "h264": ".mp4", "mp4v": ".mp4", "mjpg": ".avi"}


class AssembleError(InvalidInput):
    """The frames cannot make the video as asked; the message lists what is wrong."""


@dataclass
class VideoFrames:
    video_id: str
    fps: float = 0.0
    where: dict[int, tuple[str, str]] = field(default_factory=dict)  # frame_index -> (shard, key)
    pts_ms: dict[int, float | None] = field(default_factory=dict)
    doubled: dict[int, list[str]] = field(default_factory=dict)  # frame_index -> keys
    quarantined: dict[int, str] = field(default_factory=dict)  # frame_index -> reason


def candidate_shards(store: Store, video_id: str) -> list[str]:
    """The shards that hold frames of `video_id`: from ingest's `_index.parquet` (video_id per row) or
    the deblur job's manifests (keys `<video_id>_<frame>`), so that one video of a large archive is
    found without reading every shard; every shard when neither is there."""
    shards = store.glob("*.tar")
    if not shards:
        raise AssembleError(f"{store.url}: no *.tar shards")
    listed: set[str] | None = None
    if store.exists(INDEX_NAME):
        table = read_index(store, ["shard", "video_id"])
        listed = {r["shard"] for r in table.filter(pc.equal(table["video_id"], video_id)).to_pylist()}
    elif (table := read_manifests(store, ["shard", "key"])[0]).num_rows:
        mine = table.filter(pc.starts_with(table["key"], f"{video_id}_"))
        listed = {output_names(shard)[0] for shard in pc.unique(mine["shard"]).to_pylist()}
    return shards if listed is None else [s for s in shards if s in listed]


def videos_listed(store: Store) -> list[str] | None:
    """The video_ids that ingest's index or the deblur job's manifests list (keys `<video_id>_<frame>`),
    sorted; None when the folder has neither (only reading every shard would tell)."""
    if store.exists(INDEX_NAME):
        return sorted(v for v in pc.unique(read_index(store, ["video_id"])["video_id"]).to_pylist() if v)
    keys = read_manifests(store, ["key"])[0]
    if not keys.num_rows:
        return None
    split = [str(key).rpartition("_") for key in keys["key"].to_pylist()]
    return sorted({video for video, _, frame in split if video and frame.isdigit()})


def no_such_video(store: Store, video_id: str) -> str:
    """The error for a --video that has no frames here, with the ones that have."""
    listed = videos_listed(store)
    if listed is None:
        return f"no frames of video {video_id!r} in {store.url} (check --video)"
    shown = ", ".join(listed[:20]) + (f" ... ({len(listed)} in all)" if len(listed) > 20 else "")
    return f"no frames of video {video_id!r} in {store.url}; it holds: {shown or 'no videos (image shards only)'}"


def index_video(store: Store, video_id: str) -> VideoFrames:
    """Pass 1: where each frame of `video_id` is, with duplicates and quarantined frames."""
    found = VideoFrames(video_id)
    for shard in candidate_shards(store, video_id):
        with store.open(shard) as stream:
            for sample in iter_samples(stream, shard):
                meta = sample_meta(sample)
                if meta.get("video_id") != video_id:
                    continue
                index = int(meta["frame_index"])
                if index in found.where:
                    found.doubled.setdefault(index, [found.where[index][1]]).append(sample.key)
                    continue
                found.where[index] = (shard, sample.key)
                pts = meta.get("pts_ms")
                found.pts_ms[index] = float(pts) if isinstance(pts, (int, float)) else None
                found.fps = found.fps or float(meta.get("fps") or 0.0)
    for row in read_quarantine(store):
        key = str(row.get("key", ""))
        if key.startswith(f"{video_id}_") and key[len(video_id) + 1 :].isdigit():
            found.quarantined[int(key[len(video_id) + 1 :])] = str(row.get("reason", ""))
    return found


def check(frames: VideoFrames, source_frames: int | None) -> None:
    """Raise an AssembleError listing doubled and missing frames (and why, when quarantined)."""
    if not frames.where:
        raise AssembleError(f"no frames of video {frames.video_id!r} in these shards (check --video)")
    last = max(frames.where) if source_frames is None else source_frames - 1
    missing = [i for i in range(last + 1) if i not in frames.where]
    problems = []
    if frames.doubled:
        problems.append(
            "doubled: " + "; ".join(f"frame {i} in {', '.join(k)}" for i, k in sorted(frames.doubled.items()))
        )
    if missing:
        problems.append(f"missing {len(missing)} frame(s): {_ranges(missing)}")
        lost = [f"frame {i}: {frames.quarantined[i]}" for i in missing if i in frames.quarantined]
        if lost:
            problems.append(
                "quarantined by the deblur job: " + "; ".join(lost[:10]) + (" ..." if len(lost) > 10 else "")
            )
    extra = [i for i in frames.where if source_frames is not None and i >= source_frames]
    if extra:
        problems.append(f"frames beyond the source's {source_frames}: {_ranges(sorted(extra))}")
    if problems:
        raise AssembleError(f"video {frames.video_id!r}: " + ". ".join(problems))


def count_frames(path: Path) -> int:
    """Frames a video file decodes to (decoded, not the container's estimate)."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise AssembleError(f"{path}: cannot open the source video")
    count = 0
    while capture.grab():
        count += 1
    capture.release()
    return count


def variable_rate(times_ms: list[float | None], fps: float) -> bool:
    """Whether frame timestamps stray from `fps` by more than half a frame (a variable-rate source)."""
    if len(times_ms) < 2 or fps <= 0 or any(t is None for t in times_ms):
        return False
    interval, start = 1000 / fps, times_ms[0]
    return any(abs(t - start - i * interval) > interval / 2 for i, t in enumerate(times_ms))  # type: ignore[operator]


@dataclass(frozen=True)
class Assembled:
    frames: int
    variable_rate: bool  # True: each frame kept its source timestamp


@dataclass(frozen=True, kw_only=True)
class AssembleOptions:
    codec: Codec | None = None  # default: from the file's suffix
    source: Path | None = None  # the video the frames came from: its audio is copied, its frames counted
    image: str | None = None  # which member holds the frame (default: the one image member)
    constant_rate: bool = False  # ignore the frames' timestamps even when they vary
    overwrite: bool = False  # replace an existing file (never the source)


def assemble(store: Store, video_id: str, to: Path, options: AssembleOptions = AssembleOptions()) -> Assembled:
    """Write the video (complete, or nothing at `to`)."""
    codec, source, image = options.codec, options.source, options.image
    codec = codec or next((c for c, s in CODEC_SUFFIX.items() if s == to.suffix.lower()), None)
    if codec is None or CODEC_SUFFIX[codec] != to.suffix.lower():
        raise AssembleError(f"{to}: use .mkv (ffv1), .mp4 (h264, mp4v) or .avi (mjpg) for --codec {codec or '?'}")
    if source is not None and to.exists() and to.samefile(source):
        raise AssembleError(f"{to}: this is the --source video, which is read for its audio; write to another file")
    if to.exists() and not options.overwrite:
        raise AssembleError(f"{to}: already exists; choose another --output, or pass --overwrite to replace it")
    frames = index_video(store, video_id)
    if not frames.where:
        raise AssembleError(no_such_video(store, video_id))
    check(frames, count_frames(source) if source is not None else None)
    fps = frames.fps or 25.0
    times = [frames.pts_ms[i] for i in sorted(frames.where)]
    timed = not options.constant_rate and variable_rate(times, fps)
    if timed and codec == "mjpg":
        raise AssembleError(
            f"{to}: the frames of {video_id!r} have variable timestamps, which AVI cannot hold: "
            f"write .mkv or .mp4, or pass --constant-rate"
        )
    to.parent.mkdir(parents=True, exist_ok=True)
    with scratch("assemble", str(to.parent)) as tmp:  # beside `to`: the move to it is atomic
        video = Path(tmp) / f"video{to.suffix}"
        pixels = _in_order(store, frames, image)
        if timed:
            written = write_timed_video(video, pixels, [t for t in times if t is not None], codec)
        else:
            written = write_video(video, pixels, fps, mp4v=codec == "mp4v")
        if source is not None:
            muxed = Path(tmp) / f"muxed{to.suffix}"
            _mux_audio(video, source, muxed)
            video = muxed
        video.replace(to)
    return Assembled(written, timed)


def _in_order(store: Store, frames: VideoFrames, image: str | None) -> Iterator[np.ndarray]:
    """Pass 2: RGB frames by frame_index, holding only frames that arrive early."""
    shards = sorted(
        {shard for shard, _ in frames.where.values()},
        key=lambda s: min(i for i, (sh, _) in frames.where.items() if sh == s),
    )
    wanted = {key: index for index, (_, key) in frames.where.items()}
    pending: dict[int, np.ndarray] = {}
    following = 0
    for shard in shards:
        with store.open(shard) as stream:
            for sample in iter_samples(stream, shard):
                index = wanted.get(sample.key)
                if index is None or frames.where[index][0] != shard:
                    continue
                try:
                    bgr, _ = images.decode(sample.members[image_member(sample.members, image)])
                except images.ImageError as e:
                    raise AssembleError(f"{shard}: sample {sample.key!r}: {e}") from None
                pending[index] = np.ascontiguousarray(bgr[..., ::-1])
                while following in pending:
                    yield pending.pop(following)
                    following += 1
    while following in pending:
        yield pending.pop(following)
        following += 1


def _mux_audio(video: Path, source: Path, to: Path) -> None:
    """`to` = the video stream of `video` + the audio streams of `source` (if any), both copied."""
    import imageio_ffmpeg

    command = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-y",
        "-loglevel",
        "error",
        "-i",
        str(video),
        "-i",
        str(source),
        "-map",
        "0:v:0",
        "-map",
        "1:a?",
        "-c",
        "copy",
        str(to),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssembleError(
            f"{to}: copying the audio of {source} failed: {done.stderr.strip()[-400:]} "
            f"(the container may not hold that audio codec: try .mkv)"
        )


def _ranges(values: list[int]) -> str:
    spans, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            spans.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(spans[:20]) + (" ..." if len(spans) > 20 else "")
