"""What a deblur run did: `RunSummary` (the driver's count, the CLI's table) and `_run.json` (that
count, the options and the whole output's totals over every committed manifest). No Ray, no torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.deblur.input_shards import split_input
from pipeline.deblur.job import DeblurJob
from pipeline.deblur.manifests import exit_histogram, read_manifests
from pipeline.deblur.shard import ShardReport, add_histogram
from pipeline.store.lease import new_run_id
from pipeline.store.storage import Store, absolute, redact

if TYPE_CHECKING:
    from adarevd import AdaRevDConfig


@dataclass
class RunSummary:
    shards_total: int = 0
    shards_skipped: int = 0  # already done (resume)
    reports: list[ShardReport] = field(default_factory=list)
    seconds: float = 0.0
    processing_seconds: float = 0.0  # after the restorer actors were up
    workers: int = 0
    encoders: int = 0  # depth-pools layout
    run_id: str = field(default_factory=new_run_id)  # stamped on this run's manifest rows
    worker_nodes: dict[str, int] = field(default_factory=dict)  # node id -> restorer actors placed there
    encoder_nodes: dict[str, int] = field(default_factory=dict)  # node id -> encoder actors (depth pools)
    devices: dict[str, int] = field(default_factory=dict)  # 'cuda' / 'cpu' -> actors whose model runs there
    precisions: dict[str, int] = field(default_factory=dict)  # 'fp32' / 'bf16' -> actors whose model runs in it
    compiled: bool = False  # the restorers' models run through torch.compile (`RestoreOptions.compile`)
    took_over: str | None = None  # the earlier run whose lease on the output this one took, and why
    parts_cleared: tuple[int, int] = (0, 0)  # partial files (count, bytes) earlier runs left in _tmp/
    input_moved_from: str | None = None  # resume: where the done shards were read (the same bytes as here)
    pool_plans: list[list[int]] = field(default_factory=list)  # depth pools: actors per depth 1..N, each plan
    inputs_passed_over: dict[str, str] = field(default_factory=dict)  # input entries not read -> why
    shared_keys: dict[str, Any] = field(default_factory=dict)  # keys in more than one output shard (`shared_keys`)

    @property
    def frames(self) -> int:
        return sum(r.frames for r in self.reports)

    @property
    def quarantined(self) -> int:
        return sum(r.quarantined for r in self.reports)

    @property
    def histogram(self) -> list[int]:
        total: list[int] = []
        for r in self.reports:
            add_histogram(total, r.histogram)
        return total

    @property
    def shard_errors(self) -> list[str]:
        return [e for r in self.reports for e in r.errors]


def output_totals(output: Store, num_columns: int) -> dict[str, Any]:
    """Frames and exit histogram over every committed manifest (the whole output, all runs), and the
    keys that more than one shard holds."""
    table, _ = read_manifests(output, ["shard", "key", "depth_histogram"])
    histogram = exit_histogram(table.column("depth_histogram"), num_columns).tolist()
    return {"frames": table.num_rows, **_depth_stats(histogram, num_columns), "shared_keys": shared_keys(table)}


def shared_keys(table: pa.Table, examples: int = 5) -> dict[str, Any]:
    """Keys that rows of more than one shard carry: how many, and the first few with their shards."""
    counts = table.group_by("key").aggregate([("shard", "count_distinct")])
    shared = counts.filter(pc.greater(counts.column("shard_count_distinct"), 1)).column("key").to_pylist()
    first = sorted(shared)[:examples]
    rows = table.filter(pc.is_in(table.column("key"), pa.array(first, pa.string()))).to_pylist()
    return {
        "count": len(shared),
        "examples": {key: sorted({r["shard"] for r in rows if r["key"] == key}) for key in first},
    }


def _depth_stats(histogram: list[int], num_columns: int) -> dict[str, Any]:
    patches = sum(histogram)
    mean_depth = sum(d * n for d, n in enumerate(histogram)) / patches if patches else 0.0
    return {
        "exit_histogram": histogram,
        "mean_depth": round(mean_depth, 4),
        "compute_saved": round(1 - mean_depth / num_columns, 4) if patches else None,
    }


def run_json(
    job: DeblurJob, summary: RunSummary, fingerprint: str, config: AdaRevDConfig, totals: dict[str, Any]
) -> bytes:
    """`_run.json`: this run (a resumed run counts only what it did) and the output's totals."""
    frames = summary.frames
    root, pattern = split_input(job.input_url)
    record = {
        # Local folders as absolute paths: `adarevd report` finds the input from any directory.
        "input": redact(absolute(root)),  # the folder that shard names are relative to
        "input_pattern": pattern,  # the shards a pattern named (None: all in the folder)
        "output": redact(absolute(job.output_url)),
        "took_over": summary.took_over,
        "input_moved_from": summary.input_moved_from,
        "inputs_passed_over": summary.inputs_passed_over,
        "model": {"fingerprint": fingerprint, "config": json.loads(config.to_json())},
        "options": {
            "restore": asdict(job.restore),
            "resources": asdict(job.resources),
            "routing": job.routing,
            "frames_per_batch": job.batch_frames(),
            "image_member": job.image_member,
            "max_frames": job.max_frames,
        },
        "run_id": summary.run_id,
        "workers": summary.workers,
        "encoders": summary.encoders,
        "pool_plans": summary.pool_plans,
        "worker_nodes": summary.worker_nodes,
        "encoder_nodes": summary.encoder_nodes,
        "devices": summary.devices,
        "precisions": summary.precisions,
        "compiled": summary.compiled,
        "shards": {
            "total": summary.shards_total,
            "skipped_done": summary.shards_skipped,
            "processed": len(summary.reports),
        },
        "frames": frames,
        "quarantined": summary.quarantined,
        "shard_errors": summary.shard_errors,
        "seconds": round(summary.seconds, 3),
        "processing_seconds": round(summary.processing_seconds, 3),
        "frames_per_second": round(frames / summary.seconds, 4) if summary.seconds else None,
        **_depth_stats(summary.histogram, config.num_columns),
        "output_totals": totals,
    }
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
