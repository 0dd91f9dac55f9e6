"""`adarevd assemble`: the frames of one video, from (deblurred or ingested) shards, back into a video.

Pass 1 reads every sample's `json` (video_id, frame_index, pts_ms, fps) and checks the frames of the
video: none doubled, none missing between 0 and the last (nor after it, when the source video is
given to count its frames); quarantined frames are named with their reason. Pass 2 streams the shards
again in frame order and encodes the video (`formats.video`, PyAV) at the source frame rate: lossless
FFV1 (.mkv, default), H.264 or HEVC (.mp4, .mkv), MPEG-4 part 2 or MJPG. Where the frames' timestamps
(`pts_ms`, read from the source by ingest) stray from that rate by more than half a frame, the source
varied its rate: every frame keeps its own timestamp (.mkv or .mp4). With the source video given, its
audio streams are copied in, packet for packet. Input, source and output may be on any fsspec store;
the video is made in a local scratch folder and then moved or uploaded whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from adarevd.errors import InvalidInput
from pipeline.deblur.manifests import read_manifests, read_quarantine
from pipeline.deblur.shard import output_names
from pipeline.formats import images, video
from pipeline.formats.frames import image_member
from pipeline.formats.shards import iter_samples, sample_meta
from pipeline.ingest.run import INDEX_NAME, read_index
from pipeline.store.scratch import scratch
from pipeline.store.storage import Store, file_store


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
    audio: bool = False  # the source's audio streams were copied in


@dataclass(frozen=True, kw_only=True)
class AssembleOptions:
    encoding: video.Encoding = field(default_factory=video.Encoding)  # codec, crf, preset, pix_fmt
    source: str | None = None  # the source video (path or URL): its audio is copied, its frames counted
    source_frames: int | None = None  # the frames the video must hold; None: `source`'s, decoded and counted
    image: str | None = None  # which member holds the frame (default: the one image member)
    constant_rate: bool = False  # ignore the frames' timestamps even when they vary
    overwrite: bool = False  # replace an existing file (never the source)


def assemble(store: Store, video_id: str, to: str | Path, options: AssembleOptions = AssembleOptions()) -> Assembled:
    """Write the video to `to` (a path or URL; complete, or nothing there)."""
    output, name = file_store(str(to), store.options)
    suffix = Path(name).suffix
    try:
        options.encoding.options(options.encoding.codec_for(Path(name)))
    except video.VideoError as e:
        raise AssembleError(str(e)) from None
    if options.source is not None and output.file_location(name) == _location(options.source, store):
        raise AssembleError(f"{to}: this is the --source video, which is read for its audio; write to another file")
    if not options.overwrite and output.exists(name):
        raise AssembleError(f"{to}: already exists; choose another --output, or pass --overwrite to replace it")
    frames = index_video(store, video_id)
    if not frames.where:
        raise AssembleError(no_such_video(store, video_id))
    fps = frames.fps or 25.0
    times = [frames.pts_ms[i] for i in sorted(frames.where)]
    timed = not options.constant_rate and variable_rate(times, fps)
    if timed and suffix.lower() == ".avi":
        raise AssembleError(
            f"{to}: the frames of {video_id!r} have variable timestamps, which AVI cannot hold: "
            f"write .mkv or .mp4, or pass --constant-rate"
        )
    local = Path(output.path(name)) if output.is_local else None
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
    with scratch("assemble", str(local.parent) if local else None) as tmp:  # beside `to`: moved there whole
        source = _local_source(options.source, store, Path(tmp))
        expected = options.source_frames
        if expected is None and source is not None:
            expected = video.count_frames(source)
        check(frames, expected)
        made = Path(tmp) / f"video{suffix}"
        pixels = _in_order(store, frames, options.image)
        encoding = options.encoding
        try:
            if timed:
                written = video.write_timed_video(made, pixels, [t for t in times if t is not None], encoding)
            else:
                written = video.write_video(made, pixels, fps=fps, encoding=encoding)
            audio = source is not None and video.copy_audio(made, source, muxed := Path(tmp) / f"muxed{suffix}")
            if audio:
                made = muxed
        except video.VideoError as e:
            raise AssembleError(str(e)) from None
        if local is not None:
            made.replace(local)
        else:
            output.commit_file(name, str(made))
    return Assembled(written, timed, audio)


def _location(url: str, store: Store) -> str:
    source_store, name = file_store(url, store.options)
    return source_store.file_location(name)


def _local_source(url: str | None, store: Store, tmp: Path) -> Path | None:
    """The source video as a local file: itself, or a copy fetched into `tmp`."""
    if url is None:
        return None
    source_store, name = file_store(url, store.options)
    if source_store.is_local:
        path = Path(source_store.path(name))
        if not path.is_file():
            raise AssembleError(f"{url}: the --source video does not exist")
        return path
    copy = tmp / f"source{Path(name).suffix}"
    source_store.download(name, str(copy))
    return copy


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


def _ranges(values: list[int]) -> str:
    spans, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            spans.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(spans[:20]) + (" ..." if len(spans) > 20 else "")
