"""What `adarevd ingest` reads: videos, image folders (one folder = one frame sequence), existing shards.

`plan` turns the user's URLs (files, folders, globs, brace patterns, on any fsspec store) into a list of
sources with safe, unique video ids; `read` streams one source as events: decoded `Frame`s, shard
`Passthrough` samples, and `Problem`s (an unreadable file, a truncated video, a renamed id...), so that
one bad file is recorded and the rest goes on.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

from pipeline.formats import images, video
from pipeline.formats.shards import Sample, ShardError, iter_samples
from pipeline.store import storage
from pipeline.store.digests import digest_of
from pipeline.store.scratch import scratch
from pipeline.store.storage import redact, resolve

VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"})
SHARD_SUFFIXES = frozenset({".tar"})
MAX_ID_LENGTH = 64


@dataclass(frozen=True)
class Frame:
    """One decoded frame, in BGR, with where it came from."""

    video_id: str
    index: int
    bgr: np.ndarray
    source: str
    source_sha256: str
    pts_ms: float | None = None
    fps: float | None = None
    source_pix_fmt: str | None = None  # a video's pixel format before the conversion to 8-bit BGR
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Passthrough:
    """A sample of an existing shard, re-sharded byte for byte."""

    sample: Sample
    source: str


@dataclass(frozen=True)
class Problem:
    """Something that could not be ingested as it was. `skipped`: nothing of it was ingested."""

    source: str
    reason: str
    skipped: bool = True
    video_id: str | None = None
    frame_index: int | None = None


Event = Frame | Passthrough | Problem


@dataclass(frozen=True)
class Source:
    """One video, one folder of images, or one shard, on a resolved filesystem."""

    kind: str  # "video" | "images" | "shard"
    url: str  # for messages and metadata (credentials removed)
    paths: tuple[str, ...]  # filesystem paths: the file, or the folder's images in order
    video_id: str = ""
    notes: tuple[str, ...] = ()
    fs: Any = field(default=None, compare=False, repr=False)


def safe_id(name: str) -> str:
    """A file or folder name -> a key-safe video id: letters, digits, '_' and '-' only, no dots."""
    stem = name
    if posixpath.splitext(name)[1].lower() in VIDEO_SUFFIXES | images.IMAGE_SUFFIXES | SHARD_SUFFIXES:
        stem = posixpath.splitext(name)[0]
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_")[:MAX_ID_LENGTH].strip("-_")
    return cleaned or "video"


def natural_key(text: str) -> list[Any]:
    """'f2.png' < 'f10.png': digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def plan(urls: Sequence[str], options: Mapping[str, Any]) -> tuple[list[Source], list[Problem]]:
    """Expand URLs into sources in a stable order; files that are none of video/image/shard are problems."""
    sources: list[Source] = []
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()  # storage.location of each file: one that several URLs name is read once
    for url in urls:
        fs, _ = resolve(url, options)
        files, missing = storage.call("list", url, lambda url=url, fs=fs: _expand(url, fs, options))
        problems += [Problem(redact(m), reason) for m, reason in missing]
        new = []
        for path in files:
            if (where := storage.location(fs, path)) not in seen:
                seen.add(where)
                new.append(path)
        sources += _classify(fs, new, problems)
    return _assign_ids(sources), problems


def _expand(url: str, fs: Any, options: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """(files under `url` in a stable order, (brace expansion, why) for those that name nothing)."""
    files: list[str] = []
    folders: list[str] = []
    missing: list[tuple[str, str]] = []
    for expanded in braceexpand(url):
        _, path = resolve(expanded, options)
        if any(c in path for c in "*?["):
            matched = sorted(fs.glob(path))
            files += matched
            if not matched:
                missing.append((expanded, "matches no file"))
        elif fs.isdir(path):
            folders.append(path)
        elif fs.exists(path):
            files.append(path)
        else:
            missing.append((expanded, "not found"))
    for folder in folders:
        files += sorted(fs.find(folder), key=natural_key)
    return files, missing


def _classify(fs: Any, files: list[str], problems: list[Problem]) -> list[Source]:
    def url_of(path: str) -> str:
        return path if isinstance(fs, LocalFileSystem) else redact(fs.unstrip_protocol(path))

    order: list[tuple[str, str]] = []  # (kind, path) in first-seen order; images by their folder
    sequences: dict[str, list[str]] = {}
    for path in files:
        suffix = posixpath.splitext(path)[1].lower()
        if suffix in VIDEO_SUFFIXES:
            order.append(("video", path))
        elif suffix in SHARD_SUFFIXES:
            order.append(("shard", path))
        elif suffix in images.IMAGE_SUFFIXES:
            folder = posixpath.dirname(path)
            if folder not in sequences:
                sequences[folder] = []
                order.append(("images", folder))
            sequences[folder].append(path)
        else:
            problems.append(Problem(url_of(path), "not a video, an image or a .tar shard (by its suffix); skipped"))
    out = []
    for kind, path in order:
        paths = tuple(sorted(sequences[path], key=natural_key)) if kind == "images" else (path,)
        out.append(Source(kind, url_of(path), paths, fs=fs))
    return out


def _assign_ids(sources: list[Source]) -> list[Source]:
    """Video ids from source names, made key-safe and unique; each change is a note."""
    used: set[str] = set()
    out = []
    for source in sources:
        if source.kind == "shard":
            out.append(source)
            continue
        name = posixpath.basename(source.url.rstrip("/"))
        vid = safe_id(name)
        notes = []
        if vid != posixpath.splitext(name)[0] and vid != name:
            notes.append(f"video id {vid!r} made from the name {name!r} (dots and other characters replaced)")
        base, n = vid, 1
        while vid in used:
            n += 1
            vid = f"{base[: MAX_ID_LENGTH - 4]}-{n}"
        if vid != base:
            notes.append(f"video id {base!r} already taken by another source; renamed to {vid!r}")
        used.add(vid)
        out.append(Source(source.kind, source.url, source.paths, vid, tuple(notes), fs=source.fs))
    return out


def read(
    source: Source, *, fps: float | None = None, on_video: Callable[[str], str | None] | None = None
) -> Iterator[Event]:
    """Stream one source as events, in order. `on_video` is called with a video's local file before
    its frames are read (a remote video is fetched once, for both); what it returns is recorded as a note."""
    for note in source.notes:
        yield Problem(source.url, note, skipped=False, video_id=source.video_id)
    if source.kind == "video":
        yield from _read_video(source, on_video)
    elif source.kind == "images":
        yield from _read_images(source, fps)
    else:
        yield from _read_shard(source)


def _read_video(source: Source, on_video: Callable[[str], str | None] | None) -> Iterator[Event]:
    fs, path = source.fs, source.paths[0]
    with scratch("video") as tmp:
        if not isinstance(fs, LocalFileSystem):
            # Fetched first: its sha256 is recorded, and decoding seeks.
            local = os.path.join(tmp, "video" + posixpath.splitext(path)[1])
            storage.call("download", source.url, lambda: fs.get_file(path, local))
            path = local
        if os.path.getsize(path) == 0:
            yield Problem(source.url, "empty file (0 bytes); nothing to decode", video_id=source.video_id)
            return
        with open(path, "rb") as f:
            digest = digest_of(f).sha256
        try:
            reader = video.Reader(path, source.url)
        except video.VideoError:
            yield Problem(
                source.url, "cannot be opened as a video (damaged, truncated, or not a video)", video_id=source.video_id
            )
            return
        if on_video is not None and (note := on_video(path)) is not None:
            yield Problem(source.url, note, skipped=False, video_id=source.video_id)
        info, count, pts = reader.info, 0, 0.0
        if not info.eight_bit:
            note = f"{info.pix_fmt} source converted to 8-bit RGB (frames keep source_pix_fmt)"
            yield Problem(source.url, note, skipped=False, video_id=source.video_id)
        for decoded in reader:
            pts = decoded.pts_ms if decoded.pts_ms is not None else pts
            yield Frame(source.video_id, count, decoded.bgr, source.url, digest, decoded.pts_ms, info.fps, info.pix_fmt)
            count += 1
    fps, expected = info.fps, info.frames
    if count == 0:
        yield Problem(source.url, "no frame could be decoded (empty or damaged video)", video_id=source.video_id)
    elif reader.error is not None or (expected > count and not (fps and pts + 2000 / fps >= expected * 1000 / fps)):
        # The header's count may be duration x nominal fps: a variable-rate video whose frames run to
        # the end of that duration has fewer frames and is whole; a cut-off one stops early.
        announced = f" of the {expected} frames its header announces" if expected > count else ""
        yield Problem(
            source.url,
            f"truncated or damaged: decoded {count}{announced}; frames 0..{count - 1} were ingested",
            skipped=False,
            video_id=source.video_id,
        )


def _read_images(source: Source, fps: float | None) -> Iterator[Event]:
    fs = source.fs
    for index, path in enumerate(source.paths):
        url = path if isinstance(fs, LocalFileSystem) else redact(fs.unstrip_protocol(path))
        data = storage.call("read", url, lambda path=path: fs.cat_file(path))
        try:
            bgr, notes = images.decode(data)
        except images.ImageError as e:
            yield Problem(url, f"image not ingested: {e}", video_id=source.video_id, frame_index=index)
            continue
        pts = index * 1000.0 / fps if fps else None
        digest = hashlib.sha256(data).hexdigest()
        yield Frame(source.video_id, index, bgr, url, digest, pts_ms=pts, fps=fps, notes=tuple(notes))


def _read_shard(source: Source) -> Iterator[Event]:
    try:
        with source.fs.open(source.paths[0], "rb") as stream:
            for sample in iter_samples(stream, source.url):
                yield Passthrough(sample, source.url)
    except ShardError as e:
        yield Problem(source.url, f"{e}; samples before this point were ingested", skipped=False)
    except Exception as e:
        if not storage.is_transient(e):
            raise
        raise storage.StorageError(f"{source.url}: the store stopped answering mid-read ({e}); re-run") from e
