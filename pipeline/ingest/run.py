"""Ingest: videos, image folders and existing shards -> frame shards + a Parquet index, on any store.

Frames are decoded in order (one source after another), encoded to PNG/JPEG on a thread pool (OpenCV
releases the GIL) and written in order, so the output does not depend on thread timing: the same
sources and options give byte-identical shards. `_index.parquet` has one row per ingested frame and
one per problem (a skipped file, a converted image, a truncated video), and is committed last; rows
that ingests with other prefixes wrote into the same folder are kept. With `keep_audio`, each video's
audio streams are copied into `_audio/` beside the index, so that assembling the deblurred video needs
no second read of its source.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from adarevd.errors import InvalidInput
from pipeline.formats import images, video
from pipeline.formats.images import ImageFormat
from pipeline.formats.parquet_rows import ParquetRows
from pipeline.formats.sharded_run import ShardedOutput, ShardedRun
from pipeline.formats.shards import Sample, check_key, sample_meta
from pipeline.formats.sink import ShardLimits
from pipeline.ingest import sources
from pipeline.store.scratch import scratch
from pipeline.store.storage import Store, location

INDEX_NAME = "_index.parquet"
AUDIO_FOLDER = "_audio"


def audio_name(video_id: str, source: str) -> str:
    """Where `keep_audio` puts a video's audio: `_audio/<video_id>` with the source's container suffix;
    an empty file when the source has none."""
    suffix = posixpath.splitext(source.partition("?")[0])[1].lower() or ".mkv"
    return f"{AUDIO_FOLDER}/{video_id}{suffix}"


def read_index(store: Store, columns: Sequence[str] | None = None) -> pa.Table:
    """`columns` of the ingest index in `store` (None: all), read without the other columns' bytes (an
    archive's index holds a row per frame: millions)."""
    with store.open(INDEX_NAME) as file:
        return pq.read_table(file, columns=None if columns is None else list(columns))


INDEX_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),  # null for a problem row
        ("key", pa.string()),
        ("video_id", pa.string()),
        ("frame_index", pa.int64()),
        ("pts_ms", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),  # size of the image member
        ("sha256", pa.string()),  # of the image member's bytes
        ("frame_sha256", pa.string()),  # of the pixels, (H, W, 3) uint8 RGB
        ("source", pa.string()),
        ("status", pa.string()),  # ok | note (ingested, see reason) | skipped (not ingested)
        ("reason", pa.string()),
        ("prefix", pa.string()),  # the --prefix of the ingest that wrote the row
    ]
)


@dataclass(frozen=True)
class IngestConfig:
    image_format: ImageFormat = "png"
    quality: int = 95  # JPEG only
    prefix: str = "frames"
    limits: ShardLimits = field(default_factory=ShardLimits)
    fps: float | None = None  # for image folders, which carry no timing
    workers: int = 0  # encode threads; 0 = one per CPU
    overwrite: bool = False
    take_over: bool = False  # of a lease whose holder is known to be dead
    keep_audio: bool = False  # each video's audio streams copied into `audio_name(...)` (empty: none)

    def __post_init__(self) -> None:
        if self.image_format not in ("png", "jpg"):
            raise InvalidInput(f"image format must be png or jpg, got {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            raise InvalidInput(f"JPEG quality must be 1..100, got {self.quality}")
        check_key(self.prefix)


@dataclass
class IngestSummary:
    videos: int = 0
    image_folders: int = 0
    shards_read: int = 0
    frames: int = 0
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    skipped: int = 0
    notes: int = 0
    seconds: float = 0.0
    problems: list[sources.Problem] = field(default_factory=list)

    def lines(self) -> list[str]:
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"sources: {self.videos} video(s), {self.image_folders} image folder(s), {self.shards_read} shard(s)",
            f"frames: {self.frames} in {len(self.shards)} shard(s), {self.bytes / 2**20:.1f} MiB, "
            f"{self.seconds:.1f} s ({rate:.1f} frames/s)",
            f"skipped: {self.skipped}, notes: {self.notes} (rows with status != 'ok' in {INDEX_NAME})",
        ]
        out += [f"  {'skipped' if p.skipped else 'note'}: {p.source}: {p.reason}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            out.append(f"  ... and {len(self.problems) - 20} more")
        return out


def frame_sample(frame: sources.Frame, config: IngestConfig) -> tuple[Sample, dict[str, Any]]:
    """Encode one frame: the sample (image + json) and its index row (without the shard)."""
    data = images.encode(frame.bgr, config.image_format, config.quality)
    height, width = frame.bgr.shape[:2]
    key = f"{frame.video_id}_{frame.index:06d}"
    meta = {
        "video_id": frame.video_id,
        "frame_index": frame.index,
        "pts_ms": frame.pts_ms,
        "fps": frame.fps,
        "width": width,
        "height": height,
        "source": frame.source,
        "source_sha256": frame.source_sha256,
        "frame_sha256": images.pixel_sha256(frame.bgr),
    }
    if frame.source_pix_fmt is not None:
        meta["source_pix_fmt"] = frame.source_pix_fmt
    if frame.notes:
        meta["notes"] = list(frame.notes)
    sample = Sample(key, {config.image_format: data, "json": json.dumps(meta, sort_keys=True).encode()})
    row = _row(
        key=key,
        video_id=frame.video_id,
        frame_index=frame.index,
        pts_ms=frame.pts_ms,
        width=width,
        height=height,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        frame_sha256=meta["frame_sha256"],
        source=frame.source,
        status="note" if frame.notes else "ok",
        reason="; ".join(frame.notes) or None,
    )
    return sample, row


def passthrough_row(item: sources.Passthrough) -> dict[str, Any]:
    """Index row of a re-sharded sample: what its json says, and its image member's digest."""
    sample = item.sample
    meta = sample_meta(sample)
    image = next((m for m in sorted(sample.members) if m.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg")), None)
    data = sample.members[image] if image else b""
    return _row(
        key=sample.key,
        video_id=_typed(meta.get("video_id"), str),
        frame_index=_typed(meta.get("frame_index"), int),
        pts_ms=_typed(meta.get("pts_ms"), float),
        width=_typed(meta.get("width"), int),
        height=_typed(meta.get("height"), int),
        bytes=len(data) if image else None,
        sha256=hashlib.sha256(data).hexdigest() if image else None,
        frame_sha256=_typed(meta.get("frame_sha256"), str),
        source=item.source,
        status="ok",
    )


def problem_row(problem: sources.Problem) -> dict[str, Any]:
    return _row(
        video_id=problem.video_id,
        frame_index=problem.frame_index,
        source=problem.source,
        status="skipped" if problem.skipped else "note",
        reason=problem.reason,
    )


def _row(**values: Any) -> dict[str, Any]:
    row = dict.fromkeys(INDEX_SCHEMA.names)
    row.update(values)
    return row


def _typed(value: Any, kind: type) -> Any:
    """A json value as `kind` (int/float/str), or None when it is missing or of another type."""
    if kind is str:
        return value if isinstance(value, str) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return kind(value) if kind is float or float(value).is_integer() else None


def ingest(
    urls: Sequence[str],
    output: Store,
    config: IngestConfig = IngestConfig(),
    *,
    options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> IngestSummary:
    """Ingest every source under `urls` (read with `options`) into shards + index under `output`,
    holding `output`'s lease: a second ingest (or deblur, synth) into it at once is refused."""
    start = time.perf_counter()
    plan, problems = sources.plan(urls, options or {})
    _refuse_writing_over(plan, output, config.prefix)
    spec = ShardedOutput(
        output=output,
        prefix=config.prefix,
        kind="ingest",
        limits=config.limits,
        overwrite=config.overwrite,
        take_over=config.take_over,
        hint=", or add these sources beside them with another --prefix",
    )
    with ShardedRun(spec) as run, scratch("index") as tmp:
        summary = IngestSummary(problems=list(problems))
        # The index goes to a local file as the frames come, a row group at a time: its memory does not
        # grow with the archive (row dicts held to the end took about 2.8 KB a frame).
        local = os.path.join(tmp, INDEX_NAME)
        with ParquetRows(local, INDEX_SCHEMA) as index:
            index.add_table(_other_prefixes_rows(output, config.prefix))
            rows = _Rows(index, config.prefix, summary)
            for problem in problems:
                rows.add(problem_row(problem))
            _write_shards(plan, run, config, rows, progress)
        summary.shards, summary.bytes = run.finish(INDEX_NAME, local), run.sink.bytes_committed
    summary.skipped = sum(p.skipped for p in summary.problems)
    summary.seconds = time.perf_counter() - start
    return summary


class _Rows:
    """The index being written: each row with its prefix; problems and notes counted in `summary`."""

    def __init__(self, index: ParquetRows, prefix: str, summary: IngestSummary) -> None:
        self.index, self.prefix, self.summary = index, prefix, summary

    def add(self, row: dict[str, Any]) -> None:
        self.summary.notes += row["status"] == "note"
        self.index.add(row | {"prefix": self.prefix})

    def problem(self, problem: sources.Problem) -> None:
        self.summary.problems.append(problem)
        self.add(problem_row(problem))


def _write_shards(
    plan: Sequence[sources.Source],
    run: ShardedRun,
    config: IngestConfig,
    rows: _Rows,
    progress: Callable[[int], None] | None,
) -> None:
    """Every source's frames, in order, into `run`'s shards; their index rows (and problems') to `rows`."""
    seen_keys: set[str] = set()
    workers = config.workers or os.cpu_count() or 1
    summary = rows.summary
    with ThreadPoolExecutor(workers) as pool:
        for source in plan:
            summary.videos += source.kind == "video"
            summary.image_folders += source.kind == "images"
            summary.shards_read += source.kind == "shard"
            keep = partial(_keep_audio, run.spec.output, source) if config.keep_audio else None
            events = sources.read(source, fps=config.fps, on_video=keep)
            for item in _in_order(events, pool, config, 2 * workers):
                if isinstance(item, sources.Problem):
                    rows.problem(item)
                    continue
                sample, row = item
                if sample.key in seen_keys:
                    duplicate = f"duplicate key {sample.key!r}; the first one was kept"
                    rows.problem(sources.Problem(row["source"], duplicate))
                    continue
                seen_keys.add(sample.key)
                row["shard"] = run.add(sample)
                rows.add(row)
                summary.frames += 1
                if progress:
                    progress(1)


def _keep_audio(output: Store, source: sources.Source, path: str) -> str | None:
    """Copy the audio of the video at `path` (`source`'s local file) into `output`; a note if it cannot."""
    name = audio_name(source.video_id, source.url)
    with scratch("audio") as tmp:
        local = Path(tmp) / posixpath.basename(name)
        try:
            if not video.extract_audio(Path(path), local):
                local.write_bytes(b"")  # an empty file: the source has no audio
            output.commit_file(name, str(local))
        except video.VideoError as e:
            return f"its audio could not be kept ({e}); it is read from the source when the video is assembled"
    return None


def _other_prefixes_rows(output: Store, prefix: str) -> pa.Table:
    """The rows of an earlier index in `output` that other prefixes' ingests wrote: an ingest with
    another --prefix adds its shards beside theirs, and the index goes on listing theirs. (An index from
    before the `prefix` column: a frame's prefix is its shard's; a problem's, the one prefix there was.)"""
    if not output.exists(INDEX_NAME):
        return INDEX_SCHEMA.empty_table()
    table = read_index(output)
    if "prefix" not in table.column_names:
        table = table.append_column("prefix", pa.nulls(table.num_rows, pa.string()))
    try:
        table = table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
        index = output.url_of(INDEX_NAME)
        raise InvalidInput(f"{index}: not an ingest index ({e}); ingest into another --output") from None
    prefixes = pc.coalesce(table["prefix"], pc.replace_substring_regex(table["shard"], r"-[^-]*$", ""))
    known = pc.unique(prefixes.drop_null())
    if len(known) == 1:
        prefixes = pc.fill_null(prefixes, known[0])
    table = table.set_column(INDEX_SCHEMA.get_field_index("prefix"), "prefix", prefixes)
    return table.filter(pc.invert(pc.fill_null(pc.equal(prefixes, prefix), False)))


def _refuse_writing_over(plan: list[sources.Source], output: Store, prefix: str) -> None:
    """Re-sharding shards in place (`--overwrite` into their own folder, same prefix) would commit new
    shards over old ones that are not read yet: refused before anything is written."""
    folder = output.location()
    for source in plan:
        protocol, path = location(source.fs, source.paths[0])
        name = posixpath.basename(path)
        if (
            source.kind == "shard"
            and (protocol, posixpath.dirname(path)) == folder
            and fnmatch(name, f"{prefix}-*.tar")
        ):
            raise InvalidInput(
                f"{source.url}: an input shard where this ingest writes its own {prefix}-*.tar shards, which "
                "would replace it before it is read; ingest into another --output folder (or with another --prefix)"
            )


Encoded = tuple[Sample, dict[str, Any]]


def _in_order(
    events: Iterable[sources.Event], pool: ThreadPoolExecutor, config: IngestConfig, window: int
) -> Iterator[Encoded | sources.Problem]:
    """Encode frames concurrently, yield results in input order; at most `window` frames in flight."""
    pending: deque[Future[Encoded] | Encoded | sources.Problem] = deque()
    for event in events:
        if isinstance(event, sources.Frame):
            pending.append(pool.submit(frame_sample, event, config))
        elif isinstance(event, sources.Passthrough):
            pending.append((event.sample, passthrough_row(event)))
        else:
            pending.append(event)
        while len(pending) > window or (pending and not isinstance(pending[0], Future)):
            yield _resolve(pending.popleft())
    while pending:
        yield _resolve(pending.popleft())


def _resolve(item: Future[Encoded] | Encoded | sources.Problem) -> Encoded | sources.Problem:
    return item.result() if isinstance(item, Future) else item
