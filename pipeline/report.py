"""`adarevd report`: a deblur output folder -> a run page (HTML that opens offline) and, for sampled
frames, a blurry | deblurred | exit-depth picture (no Ray, no torch).

Everything comes from what the job committed: the manifests (per frame: exit depths and where each
patch lies, blur scores, finish time), the quarantine indexes, `_run.json`, the output shards (the
deblurred frames) and the input shards named in `_run.json` (the blurry frames; `input_url`
overrides, e.g. when the input has moved). A missing input is reported, not fatal: the rest of the
page does not need it.
"""

from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import jinja2
import markupsafe
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import report_charts
from pipeline.exit_map import hex_colours, panel
from pipeline.frames import FrameIn, PatchMap, decode_sample
from pipeline.shard_job import MANIFEST_DIR, MANIFEST_SCHEMA, QUARANTINE_DIR, RUN_FILE, output_names
from pipeline.shards import Sample, ShardError, iter_samples
from pipeline.storage import StorageError, Store, redact

PAGE = "index.html"
TEMPLATE = Path(__file__).with_name("templates") / "report.html.j2"


class ReportError(ValueError):
    """The folder is not a deblur output, or a requested frame is not in it."""


@dataclass
class Report:
    page: Path
    pictures: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def write_report(output: Store, to: Path, *, samples: int = 6, keys: Sequence[str] = (),
                 input_url: str | None = None) -> Report:  # fmt: skip
    """Write `to/index.html` and `to/frames/*.png` for the deblur output in `output`."""
    run = _read_run(output)
    manifest, shard_errors = read_manifests(output)
    quarantine = read_quarantine(output)
    if manifest.num_rows == 0 and not quarantine:
        raise ReportError(f"{redact(output.url)}: no committed manifests under {MANIFEST_DIR}/; is this the "
                          f"output of `adarevd deblur`, and has a shard finished?")  # fmt: skip
    rows = sorted(manifest.to_pylist(), key=lambda r: (r["shard"], r["key"]))
    n = _num_columns(run, rows)
    chosen = choose(rows, samples, keys)
    report = Report(to / PAGE)
    (to / "frames").mkdir(parents=True, exist_ok=True)
    for old in (to / "frames").glob("[0-9][0-9][0-9]-*.png"):  # an earlier report's pictures
        old.unlink()
    source_url = input_url or run.get("input")
    frames = _sample_frames(output, source_url, chosen, n, to, report)
    page = _render(output, run, rows, quarantine, shard_errors, frames, n, source_url, report.warnings)
    report.page.write_text(page, encoding="utf-8")
    return report


def _read_run(output: Store) -> dict[str, Any]:
    try:
        return json.loads(output.read_bytes(RUN_FILE))
    except FileNotFoundError:
        return {}  # a run that was stopped before its end: the manifests still tell what was done


def read_manifests(output: Store) -> tuple[pa.Table, list[str]]:
    """Every committed manifest as one table (columns an older manifest lacks are null), and the
    shard errors recorded in their metadata."""
    tables, errors = [], []
    for name in output.glob(f"{MANIFEST_DIR}/**/*.parquet"):
        table = pq.read_table(io.BytesIO(output.read_bytes(name)))
        errors += json.loads((table.schema.metadata or {}).get(b"adarevd.shard_errors", b"[]"))
        for column in MANIFEST_SCHEMA:
            if column.name not in table.column_names:
                table = table.append_column(column, pa.nulls(table.num_rows, column.type))
        tables.append(table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA))
    return (pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()), errors


def read_quarantine(output: Store) -> list[dict[str, Any]]:
    rows = []
    for name in output.glob(f"{QUARANTINE_DIR}/**/*.parquet"):
        rows += pq.read_table(io.BytesIO(output.read_bytes(name))).to_pylist()
    return sorted(rows, key=lambda r: (r["shard"], r["key"]))


def choose(rows: Sequence[dict[str, Any]], samples: int, keys: Sequence[str]) -> list[dict[str, Any]]:
    """`samples` rows spread evenly over key order (first and last included), then the named keys."""
    by_key = {r["key"]: r for r in rows}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ReportError(f"--key {', '.join(missing)}: not in the output's manifests ({len(rows)} frames)")
    count = min(samples, len(rows))
    picks = sorted({round(i * (len(rows) - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0][:count]
    chosen = [rows[i] for i in picks]
    chosen += [by_key[k] for k in dict.fromkeys(keys) if by_key[k] not in chosen]
    return chosen


def _num_columns(run: dict[str, Any], rows: Sequence[dict[str, Any]]) -> int:
    config = run.get("model", {}).get("config", {})
    if "num_columns" in config:
        return int(config["num_columns"])
    return max((len(r["depth_histogram"]) - 1 for r in rows if r["depth_histogram"]), default=1)


@dataclass(frozen=True)
class _Frame:
    """One sampled frame on the page."""

    row: dict[str, Any]
    picture: str  # path relative to the page, "" when it could not be drawn


def _sample_frames(output: Store, source_url: str | None, chosen: Sequence[dict[str, Any]], n: int, to: Path,
                   report: Report) -> list[_Frame]:  # fmt: skip
    by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in chosen:
        by_shard[row["shard"]].append(row)
    source = Store(source_url, output.options) if source_url else None
    if source is None:
        report.warnings.append("the input folder is not recorded (no _run.json): pass --input to show blurry frames")
    frames: dict[str, _Frame] = {}
    order = {r["key"]: i for i, r in enumerate(chosen)}
    for shard, rows in by_shard.items():
        wanted = {r["key"] for r in rows}
        deblurred = _find(output, output_names(shard)[0], wanted, report)
        blurry = _find(source, shard, wanted, report) if source else {}
        for row in rows:
            name = f"frames/{order[row['key']]:03d}-{_safe(row['key'])}.png"  # page order
            frames[row["key"]] = _draw(row, blurry.get(row["key"]), deblurred.get(row["key"]), n, to / name, report)
    report.pictures.sort()
    return [frames[r["key"]] for r in chosen]


def _find(store: Store, shard: str, keys: set[str], report: Report) -> dict[str, Sample]:
    """The samples of `keys` in one shard (streamed; stops once all are found). Problems become warnings."""
    found: dict[str, Sample] = {}
    try:
        with store.open(shard) as stream:
            for sample in iter_samples(stream, shard):
                if sample.key in keys and sample.key not in found:
                    found[sample.key] = sample
                    if len(found) == len(keys):
                        break
    except (FileNotFoundError, StorageError, ShardError, OSError) as e:
        report.warnings.append(f"{redact(store.url_of(shard))}: cannot read it ({e}); pass --input if it moved")
    return found


def _draw(row: dict[str, Any], blurry: Sample | None, deblurred: Sample | None, n: int, path: Path,
          report: Report) -> _Frame:  # fmt: skip
    key = row["key"]
    if deblurred is None or row["patch_depths"] is None:
        why = "its output sample is missing" if deblurred is None else "its manifest predates exit maps"
        report.warnings.append(f"{key}: no picture: {why}")
        return _Frame(row, "")
    out = decode_sample(deblurred, row["member"])
    original = decode_sample(blurry, row["member"]) if blurry is not None else None
    if not isinstance(out, FrameIn):
        report.warnings.append(f"{key}: no picture: the output image does not decode ({out.reason})")
        return _Frame(row, "")
    patches = PatchMap(tuple(row["patch_ys"]), tuple(row["patch_xs"]), *row["patch_size"], tuple(row["patch_depths"]))
    picture = panel(original.rgb if isinstance(original, FrameIn) else None, out.rgb, patches, n)
    if not cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write the picture")
    report.pictures.append(path)
    return _Frame(row, f"{path.parent.name}/{path.name}")


def _safe(key: str) -> str:
    """A file-name-safe form of a key (keys come from foreign shards)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", key)[:80] or "frame"


def _render(output: Store, run: dict[str, Any], rows: Sequence[dict[str, Any]], quarantine: list[dict[str, Any]],
            shard_errors: list[str], frames: list[_Frame], n: int, source_url: str | None,
            warnings: list[str]) -> str:  # fmt: skip
    histogram = [0] * (n + 1)
    for r in rows:
        for d, count in enumerate(r["depth_histogram"] or []):
            histogram[d] += count
    patches = sum(histogram)
    mean_depth = sum(d * c for d, c in enumerate(histogram)) / patches if patches else 0.0
    runs: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["finished_at"] is not None:
            runs[r["run_id"] or "?"].append(r["finished_at"])
    colours = hex_colours(n)
    charts = {
        "Patches per exit depth": report_charts.exit_histogram(histogram, colours),
        "Throughput over time": report_charts.throughput(runs),
        "Blur score before and after": report_charts.blur_scores(
            [r["blur_before"] for r in rows], [r["blur_after"] for r in rows]
        ),
        "Mean exit depth per frame": report_charts.mean_depths([r["mean_depth"] for r in rows], n),
    }
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = environment.from_string(TEMPLATE.read_text(encoding="utf-8"))
    return template.render(
        output=redact(output.url),
        source=redact(source_url) if source_url else "not recorded",
        run=run,
        run_json=json.dumps(run, indent=2, sort_keys=True),
        frames=len(rows),
        quarantine=quarantine,
        shard_errors=shard_errors,
        shards=_per_shard(rows, quarantine, n),
        histogram=histogram,
        colours=colours,
        num_columns=n,
        mean_depth=mean_depth,
        compute_saved=1 - mean_depth / n if patches else 0.0,
        blur=_medians(rows),
        charts={title: _svg_markup(svg) for title, svg in charts.items()},
        samples=frames,
        warnings=warnings,
    )


def _per_shard(rows: Sequence[dict[str, Any]], quarantine: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = table.setdefault(r["shard"], {"shard": r["shard"], "frames": 0, "depth": 0.0, "quarantined": 0})
        entry["frames"] += 1
        entry["depth"] += r["mean_depth"]
    for q in quarantine:
        table.setdefault(q["shard"], {"shard": q["shard"], "frames": 0, "depth": 0.0, "quarantined": 0})
        table[q["shard"]]["quarantined"] += 1
    for entry in table.values():
        entry["mean_depth"] = entry["depth"] / entry["frames"] if entry["frames"] else 0.0
        entry["saved"] = 1 - entry["mean_depth"] / n if entry["frames"] else 0.0
    return [table[s] for s in sorted(table)]


def _medians(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    before = np.array([r["blur_before"] for r in rows], np.float64)
    after = np.array([r["blur_after"] for r in rows], np.float64)
    if not len(rows):
        return {"before": 0.0, "after": 0.0, "sharper": 0.0}
    return {"before": float(np.median(before)), "after": float(np.median(after)),
            "sharper": float((after > before).mean())}  # fmt: skip


def _svg_markup(svg: str) -> markupsafe.Markup:
    """Charts are our own matplotlib output: mark them safe for the autoescaping template."""
    if "<script" in svg:
        raise ValueError("a chart contains a script")  # never: matplotlib writes none
    return markupsafe.Markup(svg)
