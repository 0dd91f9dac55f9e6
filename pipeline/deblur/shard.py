"""One input shard -> one output shard, its manifest, and its quarantine (no Ray here).

`process_shard` streams the input shard, decodes samples into frames, hands batches to `restore`
(any function from an iterator of batches to an iterator of results, in order: a local
`FrameRestorer`, or Ray actors), and streams the results into a local temporary tar. Then it commits,
in this order: the output shard, the quarantine (if any; else an earlier try's is removed), and the
manifest last. A shard is done only when its manifest is committed, so a crash at any point leaves
either nothing or a shard that a re-run overwrites with the same bytes. An input tar that breaks off
(truncated, corrupt) gets its output up to the damage but no manifest: it is not done until the input
is mended. An entry refused for its name or type is skipped and recorded; the shard goes on.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.deblur.batching import batched
from pipeline.deblur.input_shards import shard_stem
from pipeline.formats.frames import FrameIn, FrameOut, Rejected, decode_sample
from pipeline.formats.shards import ShardError, TarShardWriter, encode_shard, iter_samples
from pipeline.store.digests import Digest, DigestReader
from pipeline.store.scratch import scratch
from pipeline.store.storage import Store

MANIFEST_DIR, QUARANTINE_DIR, RUN_FILE = "_manifest", "_quarantine", "_run.json"
# A manifest's metadata: the input shard it was made from and how (`DeblurJob.made_with`), for resume.
SOURCE_KEY, SOURCE_DIGEST_KEY, MADE_WITH_KEY = "adarevd.source", "adarevd.source_digest", "adarevd.made_with"
SOURCE_VERSION_KEY = "adarevd.source_version"  # the input shard's FileStat.version, taken before it was read
RestoreFn = Callable[[Iterable[list[FrameIn]]], Iterator[list[FrameOut | Rejected]]]

MANIFEST_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("member", pa.string()),
        ("output_sha256", pa.string()),
        ("depth_histogram", pa.list_(pa.int32())),  # patches per exit depth 0..N
        ("mean_depth", pa.float32()),
        ("compute_saved", pa.float32()),  # 1 - mean depth / N
        ("blur_before", pa.float32()),  # variance of the Laplacian: a no-reference proxy (contrast raises it)
        ("blur_after", pa.float32()),
        ("seam_score", pa.float32()),  # step across patch borders / step overall (1 = no seams)
        ("tone_shift", pa.list_(pa.float32())),  # mean output minus input, R, G, B, in 8-bit levels
        ("encode_ms", pa.float32()),
        ("decode_ms", pa.float32()),
        ("stitch_ms", pa.float32()),
        ("notes", pa.string()),
        ("model_fingerprint", pa.string()),
        # Where each patch lies and where it exited (PatchMap): the report's exit-depth pictures.
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("patch_ys", pa.list_(pa.int32())),
        ("patch_xs", pa.list_(pa.int32())),
        ("patch_size", pa.list_(pa.int32())),  # (h, w)
        ("patch_depths", pa.list_(pa.int8())),  # row-major
        ("run_id", pa.string()),  # the run that wrote the row (a resumed output holds several)
        ("finished_at", pa.float64()),  # Unix time the shard's writer had the frame: throughput over time
    ]
)
QUARANTINE_SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string()), ("reason", pa.string())])


def output_names(shard: str) -> tuple[str, str, str, str]:
    """(output shard, manifest, quarantine tar, quarantine index) names for an input shard name (a
    compressed input's output is a plain .tar)."""
    stem = shard_stem(shard)
    return (
        f"{stem}.tar",
        f"{MANIFEST_DIR}/{stem}.parquet",
        f"{QUARANTINE_DIR}/{stem}.tar",
        f"{QUARANTINE_DIR}/{stem}.parquet",
    )


@dataclass
class ShardReport:
    shard: str
    frames: int = 0
    quarantined: int = 0
    histogram: list[int] = field(default_factory=list)
    bytes_out: int = 0
    seconds: float = 0.0
    complete: bool = True  # False when --max-frames stopped it early
    damaged: bool = False  # the input tar broke off: the output holds what came before; not marked done
    errors: list[str] = field(default_factory=list)


def read_frames(
    stream: Any, shard: str, image_member: str | None, report: ShardReport, limit: int | None
) -> Iterator[FrameIn | Rejected]:
    """Decoded frames of a shard stream; duplicates, undecodable samples and a broken tail become Rejected."""
    seen: set[str] = set()
    count = 0
    try:
        for sample in iter_samples(stream, shard, on_bad_entry=lambda e: report.errors.append(str(e))):
            if limit is not None and count >= limit:
                report.complete = False
                return
            count += 1
            if sample.key in seen:
                yield Rejected(sample.key, "duplicate key in the shard; the first one was kept", sample)
                continue
            seen.add(sample.key)
            yield decode_sample(sample, image_member)
    except ShardError as e:
        # Samples before the damage were yielded and are processed; the rest cannot be read. No
        # manifest: the shard is not done, and a re-run after the input is mended redoes it.
        report.errors.append(str(e))
        report.damaged = True


@dataclass(frozen=True, kw_only=True)
class ShardTask:
    """One input shard's work in a run: everything `process_shard` needs besides the stores and the
    restorer (`DeblurJob.task` makes it)."""

    shard: str
    index: int = 0  # the shard's place in the run: which actor its batches start at
    frames_per_batch: int = 8
    flush_s: float = 0.0  # a batch waits at most this long for more frames
    image_member: str | None = None
    fingerprint: str = ""  # the model's, for the manifest
    run_id: str = ""
    max_frames: int | None = None  # stop after this many frames (the shard is then not done)
    made_with: Mapping[str, Any] = field(default_factory=dict)  # for resume: `DeblurJob.made_with`


class ShardOutput:
    """A shard's output while it is made: `write` restored frames and `reject` bad ones into a local
    temporary tar, then `commit` the output shard, the quarantine and (when the input was read whole)
    the manifest, in that order. `before_commit` runs before the first commit and before the manifest;
    it raises to commit nothing more (the run lost its lease: `Fence.check`)."""

    def __init__(self, task: ShardTask, output: Store, before_commit: Callable[[], None]) -> None:
        self.task, self.output, self.before_commit = task, output, before_commit
        self.rows: list[dict[str, Any]] = []
        self.rejected: list[Rejected] = []

    def __enter__(self) -> ShardOutput:
        self._stack = ExitStack()
        self.local = os.path.join(self._stack.enter_context(scratch("deblur")), "out.tar")
        self._tar = ExitStack()  # the local tar: closed by `commit`, or on the way out
        self._stack.push(self._tar)
        self._writer = self._tar.enter_context(TarShardWriter(self._tar.enter_context(open(self.local, "wb"))))
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stack.__exit__(*exc)

    def write(self, result: FrameOut, finished_at: float) -> None:
        self._writer.write(result.sample)
        self.rows.append(_manifest_row(self.task, result, finished_at))

    def reject(self, item: Rejected) -> None:
        self.rejected.append(item)

    def commit(self, report: ShardReport, source: Store, read: Digest | None, version: str) -> None:
        """Commit what was written; the manifest only when `report` says the input was read whole.
        `read`: the input's digest; `version`: its `FileStat.version` taken before the read."""
        task, output = self.task, self.output
        out_name, manifest_name, quarantine_name, quarantine_index = output_names(task.shard)
        self._tar.close()
        self.before_commit()
        output.commit_file(out_name, self.local)
        report.bytes_out = os.path.getsize(self.local)
        report.quarantined = len(self.rejected)
        if self.rejected:
            # Original bytes and the reason: nothing is dropped silently.
            output.commit_bytes(quarantine_name, encode_shard([r.sample for r in self.rejected]))
            reasons = [{"shard": task.shard, "key": r.key, "reason": r.reason} for r in self.rejected]
            output.commit_bytes(quarantine_index, _parquet(pa.Table.from_pylist(reasons, schema=QUARANTINE_SCHEMA)))
        else:
            # An earlier try at this shard, before its input was mended: its rejects are not this try's.
            for name in (quarantine_index, quarantine_name):
                if output.exists(name):
                    output.remove(name)
        if report.complete and not report.damaged:
            table = pa.Table.from_pylist(self.rows, schema=MANIFEST_SCHEMA).replace_schema_metadata(
                {
                    "adarevd.shard_errors": json.dumps(report.errors),
                    SOURCE_KEY: source.file_location(task.shard),
                    SOURCE_DIGEST_KEY: json.dumps(asdict(read)) if read else "",
                    SOURCE_VERSION_KEY: version,
                    MADE_WITH_KEY: json.dumps(dict(task.made_with), sort_keys=True),
                }
            )
            self.before_commit()
            output.commit_bytes(manifest_name, _parquet(table))  # last: the shard is done


def process_shard(
    task: ShardTask,
    source: Store,
    output: Store,
    restore: RestoreFn,
    *,
    on_frames: Callable[[int, list[int]], None] | None = None,
    before_commit: Callable[[], None] = lambda: None,
) -> ShardReport:
    """Deblur one shard into `output` and commit it (`ShardOutput`): read -> decode -> batch ->
    restore -> write or reject -> commit. `on_frames` hears each batch's frame count and depths."""
    start = time.perf_counter()
    report = ShardReport(task.shard)
    with ShardOutput(task, output, before_commit) as sink:

        def frames_only(items: Iterable[FrameIn | Rejected]) -> Iterator[FrameIn]:
            for item in items:
                if isinstance(item, Rejected):
                    sink.reject(item)
                else:
                    yield item

        version = source.stat(task.shard).version  # before the read: a write after it changes the version
        with source.open(task.shard) as stream:
            reader = DigestReader(stream)
            items = read_frames(reader, task.shard, task.image_member, report, task.max_frames)
            for results in restore(batched(frames_only(items), task.frames_per_batch, task.flush_s)):
                batch_histogram: list[int] = []
                finished_at = time.time()
                for result in results:
                    if isinstance(result, Rejected):
                        sink.reject(result)
                        continue
                    sink.write(result, finished_at)
                    report.frames += 1
                    add_histogram(batch_histogram, result.depth_histogram)
                add_histogram(report.histogram, batch_histogram)
                if on_frames:
                    on_frames(len(results), batch_histogram)
            read = reader.digest() if report.complete and not report.damaged else None
        sink.commit(report, source, read, version)
    report.seconds = time.perf_counter() - start
    return report


def _manifest_row(task: ShardTask, result: FrameOut, finished_at: float) -> dict[str, Any]:
    patches = result.patches
    return {
        "shard": task.shard,
        "key": result.sample.key,
        "member": result.member,
        "output_sha256": result.sha256,
        "depth_histogram": list(result.depth_histogram),
        "mean_depth": result.mean_depth,
        "compute_saved": result.compute_saved,
        "blur_before": result.blur_before,
        "blur_after": result.blur_after,
        "seam_score": result.seam,
        "tone_shift": list(result.tone_shift),
        "encode_ms": result.encode_ms,
        "decode_ms": result.decode_ms,
        "stitch_ms": result.stitch_ms,
        "notes": "; ".join(result.notes) or None,
        "model_fingerprint": task.fingerprint,
        "width": result.width,
        "height": result.height,
        "patch_ys": list(patches.ys) if patches else None,
        "patch_xs": list(patches.xs) if patches else None,
        "patch_size": [patches.size_h, patches.size_w] if patches else None,
        "patch_depths": list(patches.depths) if patches else None,
        "run_id": task.run_id,
        "finished_at": finished_at,
    }


def add_histogram(total: list[int], histogram: Iterable[int]) -> None:
    for i, n in enumerate(histogram):
        if i == len(total):
            total.append(0)
        total[i] += n


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def done_shards(output: Store, shards: Iterable[str]) -> set[str]:
    """The shards whose manifest is committed (done): one listing of `_manifest/`, not a request each."""
    committed = set(output.glob(f"{MANIFEST_DIR}/**/*.parquet"))
    return {shard for shard in shards if output_names(shard)[1] in committed}


def local_restore(restorer: Callable[[list[FrameIn]], list[FrameOut | Rejected]]) -> RestoreFn:
    """Run batches through an in-process restorer, one after another."""

    def run(batches: Iterable[list[FrameIn]]) -> Iterator[list[FrameOut | Rejected]]:
        for batch in batches:
            yield restorer(batch)

    return run
