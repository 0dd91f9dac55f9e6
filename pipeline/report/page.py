"""`adarevd report`: a deblur output folder -> a run page (HTML that opens offline) and, for sampled
frames, a blurry | deblurred | exit-depth picture (no Ray, no torch).

Everything comes from what the job committed: the manifests (per frame: exit depths and where each
patch lies, blur scores, finish time), the quarantine indexes, `_run.json`, the output shards (the
deblurred frames) and the input shards named in `_run.json` (the blurry frames; `input_url`
overrides, e.g. when the input has moved). A missing input is reported, not fatal: the rest of the
page does not need it.
"""

from __future__ import annotations

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
import pyarrow.compute as pc

from adarevd.errors import InvalidInput
from pipeline.deblur.manifests import (
    PATCH_COLUMNS,
    STATS_COLUMNS,
    exit_histogram,
    read_columns,
    read_manifests,
    read_quarantine,
)
from pipeline.deblur.shard import MANIFEST_DIR, MANIFEST_SCHEMA, RUN_FILE, output_names
from pipeline.formats.frames import FrameIn, PatchMap, decode_sample
from pipeline.formats.shards import Sample, ShardError, iter_samples
from pipeline.report import charts as report_charts
from pipeline.report.exit_map import hex_colours, panel
from pipeline.store.storage import StorageError, Store, redact

PAGE = "index.html"
TEMPLATE = Path(__file__).with_name("templates") / "report.html.j2"


class ReportError(InvalidInput):
    """The folder is not a deblur output, or a requested frame is not in it."""


@dataclass
class Report:
    page: Path
    pictures: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def write_report(
    output: Store, to: Path, *, samples: int = 6, keys: Sequence[str] = (), input_url: str | None = None
) -> Report:
    """Write `to/index.html` and `to/frames/*.png` for the deblur output in `output`."""
    run = _read_run(output)
    # The statistics of every frame, without the per-patch lists: an archive has millions of rows.
    manifest, shard_errors = read_manifests(output, STATS_COLUMNS)
    quarantine = read_quarantine(output)
    if manifest.num_rows == 0 and not quarantine:
        raise ReportError(
            f"{redact(output.url)}: no committed manifests under {MANIFEST_DIR}/; is this the "
            f"output of `adarevd deblur`, and has a shard finished?"
        )
    manifest = manifest.sort_by([("shard", "ascending"), ("key", "ascending")])
    n = _num_columns(run, manifest)
    picks = pa.array(choose(manifest, samples, keys), pa.int64())
    chosen = _with_patches(output, manifest.take(picks).to_pylist())
    report = Report(to / PAGE)
    (to / "frames").mkdir(parents=True, exist_ok=True)
    for old in (to / "frames").glob("[0-9][0-9][0-9]-*.png"):  # an earlier report's pictures
        old.unlink()
    source_url = input_url or run.get("input")
    frames = _sample_frames(output, source_url, chosen, n, to, report)
    contents = _Contents(run=run, manifest=manifest, quarantine=quarantine, shard_errors=shard_errors, num_columns=n)
    page = _render(output, contents, frames, source_url, report.warnings)
    report.page.write_text(page, encoding="utf-8")
    return report


def _read_run(output: Store) -> dict[str, Any]:
    try:
        return json.loads(output.read_bytes(RUN_FILE))
    except FileNotFoundError:
        return {}  # a run that was stopped before its end: the manifests still tell what was done


def choose(manifest: pa.Table, samples: int, keys: Sequence[str]) -> list[int]:
    """Row numbers: `samples` spread evenly over key order (first and last included), then the named keys."""
    rows = manifest.num_rows
    wanted = pa.array(list(dict.fromkeys(keys)), pa.string())
    found = pc.index_in(wanted, value_set=manifest.column("key")).to_pylist()
    missing = [k for k, i in zip(wanted.to_pylist(), found, strict=True) if i is None]
    if missing:
        raise ReportError(f"--key {', '.join(missing)}: not in the output's manifests ({rows} frames)")
    count = min(samples, rows)
    if count > 1:
        picks = sorted({round(i * (rows - 1) / (count - 1)) for i in range(count)})
    else:
        picks = [0] if count == 1 else []
    return picks + [i for i in found if i not in picks]


def _with_patches(output: Store, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chosen rows with their patch columns, read from their shards' manifests only."""
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in ("key", *PATCH_COLUMNS)])
    patches: dict[str, dict[str, Any]] = {}
    for shard in {r["shard"] for r in rows}:
        table, _ = read_columns(output, output_names(shard)[1], schema)
        wanted = table.filter(pc.is_in(table.column("key"), value_set=pa.array([r["key"] for r in rows])))
        patches.update({p["key"]: p for p in wanted.to_pylist()})
    return [{**r, **patches.get(r["key"], dict.fromkeys(PATCH_COLUMNS))} for r in rows]


def _num_columns(run: dict[str, Any], manifest: pa.Table) -> int:
    config = run.get("model", {}).get("config", {})
    if "num_columns" in config:
        return int(config["num_columns"])
    lengths = pc.list_value_length(manifest.column("depth_histogram")).to_numpy(zero_copy_only=False)
    return max(int(np.nanmax(lengths)) - 1, 1) if len(lengths) else 1


@dataclass(frozen=True)
class _Frame:
    """One sampled frame on the page."""

    row: dict[str, Any]
    picture: str  # path relative to the page, "" when it could not be drawn


def _sample_frames(
    output: Store, source_url: str | None, chosen: Sequence[dict[str, Any]], n: int, to: Path, report: Report
) -> list[_Frame]:
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
    """The samples of `keys` in one shard (streamed; stops once all are found). Problems become warnings.
    Entries the run refused (links, unsafe names) are passed over here too: the quarantine names them."""
    found: dict[str, Sample] = {}
    try:
        with store.open(shard) as stream:
            for sample in iter_samples(stream, shard, on_bad_entry=lambda _: None):
                if sample.key in keys and sample.key not in found:
                    found[sample.key] = sample
                    if len(found) == len(keys):
                        break
    except FileNotFoundError as e:  # NotFound too
        report.warnings.append(f"{redact(store.url_of(shard))}: not there ({e}); pass --input if the input moved")
    except (StorageError, ShardError, OSError) as e:
        report.warnings.append(f"{redact(store.url_of(shard))}: cannot read it ({e})")
    return found


def _draw(
    row: dict[str, Any], blurry: Sample | None, deblurred: Sample | None, n: int, path: Path, report: Report
) -> _Frame:
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


@dataclass(frozen=True, kw_only=True)
class _Contents:
    """What an output holds, as the page shows it."""

    run: dict[str, Any]  # _run.json ({} for a run stopped before its end)
    manifest: pa.Table  # every frame's statistics, in shard and key order
    quarantine: list[dict[str, Any]]
    shard_errors: list[str]
    num_columns: int


def _render(
    output: Store, contents: _Contents, frames: list[_Frame], source_url: str | None, warnings: list[str]
) -> str:
    run, manifest, quarantine, n = contents.run, contents.manifest, contents.quarantine, contents.num_columns
    histogram = exit_histogram(manifest.column("depth_histogram"), n)
    patches = int(histogram.sum())
    mean_depth = float((np.arange(n + 1) * histogram).sum() / patches) if patches else 0.0
    finished = manifest.filter(pc.is_valid(manifest.column("finished_at")))
    runs = {
        str(run_id or "?"): finished.filter(pc.equal(finished.column("run_id"), run_id))
        .column("finished_at")
        .to_numpy()
        for run_id in pc.unique(finished.column("run_id")).to_pylist()
    }
    before = _floats(manifest, "blur_before")
    after = _floats(manifest, "blur_after")
    colours = hex_colours(n)
    charts = {
        "Patches per exit depth": report_charts.exit_histogram(histogram.tolist(), colours),
        "Throughput over time": report_charts.throughput(runs),
        "Blur score before and after (no-reference proxy)": report_charts.blur_scores(before, after),
        "Mean exit depth per frame": report_charts.mean_depths(_floats(manifest, "mean_depth"), n),
    }
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = environment.from_string(TEMPLATE.read_text(encoding="utf-8"))
    return template.render(
        output=redact(output.url),
        source=redact(source_url) if source_url else "not recorded",
        run=run,
        run_json=json.dumps(run, indent=2, sort_keys=True),
        frames=manifest.num_rows,
        quarantine=quarantine,
        shard_errors=contents.shard_errors,
        shards=_per_shard(manifest, quarantine, n),
        histogram=histogram.tolist(),
        colours=colours,
        num_columns=n,
        mean_depth=mean_depth,
        compute_saved=1 - mean_depth / n if patches else 0.0,
        blur={
            "before": float(np.median(before)) if len(before) else 0.0,
            "after": float(np.median(after)) if len(after) else 0.0,
            "higher": float((after > before).mean()) if len(before) else 0.0,
        },
        tone=_tone(manifest),
        charts={title: _svg_markup(svg) for title, svg in charts.items()},
        samples=frames,
        warnings=warnings,
    )


def _tone(manifest: pa.Table) -> dict[str, Any]:
    """The tone shift over the frames that record one: mean per channel, and the largest of one frame."""
    shifts = np.array([s for s in manifest.column("tone_shift").to_pylist() if s is not None], np.float64)
    if not len(shifts):
        return {"frames": 0, "mean": [0.0, 0.0, 0.0], "worst": 0.0}
    return {"frames": len(shifts), "mean": shifts.mean(axis=0).tolist(), "worst": float(np.abs(shifts).max())}


def _floats(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)


def _per_shard(manifest: pa.Table, quarantine: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    grouped = manifest.group_by("shard").aggregate([("key", "count"), ("mean_depth", "mean")]).to_pylist()
    table = {
        g["shard"]: {
            "shard": g["shard"],
            "frames": g["key_count"],
            "mean_depth": g["mean_depth_mean"] or 0.0,
            "quarantined": 0,
        }
        for g in grouped
    }
    for q in quarantine:
        table.setdefault(q["shard"], {"shard": q["shard"], "frames": 0, "mean_depth": 0.0, "quarantined": 0})
        table[q["shard"]]["quarantined"] += 1
    for entry in table.values():
        entry["saved"] = 1 - entry["mean_depth"] / n if entry["frames"] else 0.0
    return [table[s] for s in sorted(table)]


def _svg_markup(svg: str) -> markupsafe.Markup:
    """Charts are our own matplotlib output: mark them safe for the autoescaping template."""
    if "<script" in svg:
        raise ValueError("a chart contains a script")  # never: matplotlib writes none
    return markupsafe.Markup(svg)
