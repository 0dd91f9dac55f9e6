"""`adarevd deblur-video`'s plan and bookkeeping, free of Ray: which videos, where each one goes, the
work folder that makes a re-run resume, and the last step (each video assembled with its audio).

The work folder holds `inputs.json` (the videos and their outputs), `frames/` (ingest's shards, index
and each video's audio), `deblurred/` (the deblur job's output, resumable by its manifests) and
`done/<video_id>.json` (one per finished video). A re-run skips each step already done; a work folder
made for other inputs is refused. Each source is read once: ingest decodes its frames and keeps its
audio, and the frames ingested are the count the deblurred video is checked against.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from adarevd.errors import InvalidInput
from pipeline.assemble import AssembleOptions, assemble
from pipeline.formats import video
from pipeline.ingest import sources
from pipeline.ingest.run import INDEX_NAME, audio_name, read_index
from pipeline.store.storage import Store, file_store

WRITABLE = frozenset(video.DEFAULT_CODEC)  # output suffixes; other sources' videos are written as .mkv


@dataclass(frozen=True)
class VideoJob:
    source: str  # the video's URL (credentials removed)
    output: str  # where the deblurred video goes


@dataclass(frozen=True)
class Plan:
    videos: list[VideoJob]
    skipped: list[sources.Problem]  # inputs that are not videos, or name nothing
    work: str


def plan(inputs: Sequence[str], output: str, work: str | None, options: Mapping[str, Any]) -> Plan:
    """The videos under `inputs` and each one's output: `output` itself for one video when it has a
    video suffix, else `output/<the source's name>` (`<video_id>.<suffix>` when two names clash)."""
    found, problems = sources.plan(inputs, options)
    videos = [s for s in found if s.kind == "video"]
    skipped = problems + [sources.Problem(s.url, "not a video; skipped") for s in found if s.kind != "video"]
    if not videos:
        named = "; ".join(f"{p.source}: {p.reason}" for p in skipped[:5])
        raise InvalidInput(f"no video under {', '.join(inputs)}" + (f" ({named})" if named else ""))
    one_file = len(videos) == 1 and PurePosixPath(output).suffix.lower() in WRITABLE
    jobs, used = [], set()
    for source in videos:
        if one_file:
            jobs.append(VideoJob(source.url, output))
            continue
        name = PurePosixPath(source.url).name
        suffix = PurePosixPath(name).suffix.lower()
        if suffix not in WRITABLE:
            name, suffix = f"{PurePosixPath(name).stem}.mkv", ".mkv"
        if name in used:
            name = f"{source.video_id}{suffix}"
        used.add(name)
        jobs.append(VideoJob(source.url, posixpath.join(output.rstrip("/"), name)))
    if len(videos) > 1 and PurePosixPath(output).suffix.lower() in WRITABLE:
        raise InvalidInput(f"{output}: {len(videos)} videos need an output folder, not a file name")
    return Plan(jobs, skipped, work or default_work(output, one_file))


def default_work(output: str, one_file: bool) -> str:
    """Beside the output: `OUTPUT.work` for a file, `OUTPUT/_work` for a folder."""
    return f"{output}.work" if one_file else posixpath.join(output.rstrip("/"), "_work")


def claim_work(work: Store, videos: list[VideoJob]) -> None:
    """Record the videos in the work folder, or check that it was made for these same videos."""
    wanted = json.dumps([asdict(v) for v in videos], indent=1)
    if work.exists("inputs.json"):
        if work.read_bytes("inputs.json").decode() != wanted:
            raise InvalidInput(
                f"{work.url} is the work folder of other videos or outputs; give another --work, or remove it"
            )
        return
    work.commit_bytes("inputs.json", wanted.encode())


@dataclass(frozen=True)
class Ingested:
    """What ingest's index says of the videos."""

    ids: dict[str, str]  # source URL -> video_id, for the videos with frames
    skipped: dict[str, str]  # source URL -> why no frame of it was ingested
    frames: dict[str, int]  # video_id -> frames ingested (what its deblurred video must hold)


def ingested(frames: Store) -> Ingested:
    """The videos that ingest's index in `frames` lists (none when there is no index)."""
    if not frames.exists(INDEX_NAME):
        return Ingested({}, {}, {})
    rows = read_index(frames, ["video_id", "frame_index", "source", "status", "reason"]).to_pylist()
    ids = {r["source"]: r["video_id"] for r in rows if r["status"] != "skipped" and r["video_id"]}
    skipped = {r["source"]: r["reason"] for r in rows if r["status"] == "skipped" and r["source"] not in ids}
    counts = Counter(r["video_id"] for r in rows if r["status"] != "skipped" and r["frame_index"] is not None)
    return Ingested(ids, skipped, dict(counts))


def all_finished(work: Store, jobs: list[VideoJob], ids: Mapping[str, str]) -> bool:
    """Whether every video with frames was finished by an earlier run (its `done/` record and output exist)."""
    for job in jobs:
        if job.source in ids and not (work.exists(f"done/{ids[job.source]}.json") and _exists(job.output, work)):
            return False
    return True


def _exists(url: str, near: Store) -> bool:
    store, name = file_store(url, near.options)
    return store.exists(name)


@dataclass(frozen=True)
class Finished:
    output: str
    frames: int
    audio: bool
    resumed: bool  # made by an earlier run


def audio_of(frames: Store, job: VideoJob, video_id: str) -> str | None:
    """Where the video's audio is read: the copy ingest kept in `frames` (None when it kept an empty
    file: the source has no audio), else, for frames ingested without `keep_audio`, the source itself."""
    name = audio_name(video_id, job.source)
    if not frames.exists(name):
        return job.source
    return frames.url_of(name) if frames.stat(name).size else None


@dataclass(frozen=True, kw_only=True)
class Assembly:
    """How one video is finished."""

    video_id: str
    frames: int  # ingested from its source: the video must hold them all
    audio: str | None  # `audio_of(...)`
    encoding: video.Encoding
    overwrite: bool


def finish(deblurred: Store, work: Store, job: VideoJob, how: Assembly) -> Finished:
    """Assemble one deblurred video with its audio, checked to hold every frame ingested. Done once:
    a re-run finds `done/<video_id>.json`."""
    marker = f"done/{how.video_id}.json"
    output_store, name = file_store(job.output, deblurred.options)
    if work.exists(marker) and output_store.exists(name):
        record = json.loads(work.read_bytes(marker))
        return Finished(job.output, int(record["frames"]), bool(record["audio"]), resumed=True)
    options = AssembleOptions(
        encoding=how.encoding,
        source=how.audio,
        source_frames=how.frames,
        overwrite=how.overwrite or work.exists(marker),
    )
    done = assemble(deblurred, how.video_id, job.output, options)
    record = {"output": job.output, "frames": done.frames, "audio": done.audio}
    work.commit_bytes(marker, json.dumps(record).encode())
    return Finished(job.output, done.frames, done.audio, resumed=False)
