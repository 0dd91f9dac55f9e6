"""`adarevd report`: exit-depth pictures, the run page from a real (Ray-free) deblur output, and the
page rendered by headless Chromium the way a person would open it."""

from __future__ import annotations

import html.parser
import io
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data

from pipeline.deblur.manifests import read_manifests
from pipeline.deblur.restorer import FrameRestorer
from pipeline.deblur.shard import MANIFEST_SCHEMA, QUARANTINE_SCHEMA, ShardTask, local_restore, process_shard
from pipeline.formats import images
from pipeline.formats.frames import PatchMap
from pipeline.formats.shards import Sample, encode_shard
from pipeline.report.exit_map import depth_colours, exit_map, owners, panel
from pipeline.report.page import ReportError, write_report
from pipeline.store.storage import Store
from tests.deblur_setup import bundled_model

SHARD = "frames-000000.tar"


def test_owners_split_overlaps_down_the_middle() -> None:
    # Patches of 64 at 0 and 32 over 96 pixels: centres 31.5 and 63.5, so pixels 0..47 | 48..95.
    assert owners((0, 32), 64, 96).tolist() == [0] * 48 + [1] * 48
    assert owners((0,), 17, 17).tolist() == [0] * 17


def test_exit_map_colours_each_patch_by_its_depth() -> None:
    grey = np.full((96, 160, 3), 100, np.uint8)
    patches = PatchMap(ys=(0, 32), xs=(0, 48, 96), size_h=64, size_w=64, depths=(0, 1, 2, 3, 4, 1))
    out = exit_map(grey, patches, num_columns=4, alpha=0.5)
    colours = depth_colours(4).astype(int)
    assert len({tuple(c) for c in colours}) == 5  # one distinct colour per depth
    centres = [(24, 24), (24, 80), (24, 136), (72, 24), (72, 80), (72, 136)]
    for (y, x), depth in zip(centres, patches.depths, strict=True):
        expected = np.round(100 * 0.5 + colours[depth] * 0.5)
        assert np.abs(out[y, x].astype(int) - expected).max() <= 1, (y, x, depth)
    assert (out[48, 10] == 255).all() and (out[10, 56] == 255).all()  # first pixels of the next owner
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        exit_map(grey, PatchMap((0,), (0,), 96, 160, (5,)), num_columns=4)


def test_panel_puts_three_views_side_by_side() -> None:
    rgb = np.zeros((40, 200, 3), np.uint8)
    picture = panel(rgb, rgb, PatchMap((0,), (0,), 40, 200, (2,)), num_columns=4)
    assert picture.shape == (28 + 40, 3 * 200 + 2 * 4, 3)
    wide = np.zeros((10, 1920, 3), np.uint8)  # shrunk to 960 a view
    assert panel(None, wide, PatchMap((0,), (0,), 16, 1920, (1,)), 4).shape[1] == 3 * 960 + 8


@pytest.fixture(scope="module")
def deblurred(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Store, dict[str, np.ndarray]]:
    """One real shard (4 astronaut crops, several patches each, plus an undecodable sample) deblurred
    by the bundled weights with process_shard: the job's own code, without Ray."""
    root = tmp_path_factory.mktemp("report")
    source, output = Store(str(root / "in")), Store(str(root / "out"))
    astronaut = skimage.data.astronaut()  # RGB
    crops = {
        f"astro_{i:06d}": np.ascontiguousarray(astronaut[40 * i : 40 * i + 96, 60 * i : 60 * i + 160]) for i in range(4)
    }
    samples = [Sample(k, {"png": images.encode(rgb[..., ::-1].copy()), "cls": b"3"}) for k, rgb in crops.items()]
    broken = Sample("astro_000099", {"png": b"<not a png>"})
    source.commit_bytes(SHARD, encode_shard([*samples[:2], broken, *samples[2:]]))
    restorer = FrameRestorer(bundled_model().model)
    report = process_shard(
        ShardTask(shard=SHARD, frames_per_batch=2, run_id="run1"), source, output, local_restore(restorer)
    )
    assert (report.frames, report.quarantined) == (4, 1)
    return source, output, crops


def test_manifest_records_where_each_patch_exited(deblurred: tuple[Store, Store, dict]) -> None:
    _, output, crops = deblurred
    table, errors = read_manifests(output)
    rows = table.to_pylist()
    assert errors == [] and [r["key"] for r in rows] == sorted(crops)
    for r in rows:
        assert (r["width"], r["height"]) == (160, 96)
        assert len(r["patch_depths"]) == len(r["patch_ys"]) * len(r["patch_xs"]) == sum(r["depth_histogram"])
        assert np.bincount(r["patch_depths"], minlength=5).tolist() == r["depth_histogram"]
        assert r["run_id"] == "run1" and r["finished_at"] > 1.7e9


def test_report_page_and_pictures(deblurred: tuple[Store, Store, dict], tmp_path: Path) -> None:
    source, output, crops = deblurred
    report = write_report(output, tmp_path, samples=3, input_url=source.url)
    assert report.warnings == []
    page = report.page.read_text()
    assert [p.name for p in report.pictures] == ["000-astro_000000.png", "001-astro_000002.png", "002-astro_000003.png"]
    rows = {r["key"]: r for r in read_manifests(output)[0].to_pylist()}
    for picture in report.pictures:
        key = picture.stem.split("-", 1)[1]
        image = cv2.imread(str(picture))[..., ::-1]
        assert image.shape == (28 + 96, 3 * 160 + 8, 3)
        assert np.array_equal(image[28:, :160], crops[key])  # the blurry input, as it went in
        patches = PatchMap(
            tuple(rows[key]["patch_ys"]),
            tuple(rows[key]["patch_xs"]),
            *rows[key]["patch_size"],
            tuple(rows[key]["patch_depths"]),
        )
        assert np.array_equal(image[28:, 2 * 164 :], exit_map(crops[key], patches, 4))
    histogram = np.sum([r["depth_histogram"] for r in rows.values()], axis=0)
    for count in histogram:
        assert f'<td class="n">{count}</td>' in page
    assert "astro_000099" in page and "cannot be decoded" in page  # the quarantined sample and its reason
    # The tone shift over the frames, as the manifests record it, and the blur score named as a proxy.
    mean = np.mean([r["tone_shift"] for r in rows.values()], axis=0)
    assert " / ".join(f"{v:+.2f}" for v in mean) in page and "no-reference proxy" in page
    links = _references(page)
    assert links == {p.relative_to(tmp_path).as_posix() for p in report.pictures}  # nothing else is fetched


def test_report_escapes_what_comes_from_the_data(deblurred: tuple[Store, Store, dict], tmp_path: Path) -> None:
    source, output, _ = deblurred
    copy = Store(str(tmp_path / "out"))
    shutil.copytree(output.url, copy.url)
    row = {"shard": SHARD, "key": "x", "reason": "<script>alert(1)</script>"}
    table = pa.Table.from_pylist([row], schema=QUARANTINE_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    copy.commit_bytes("_quarantine/zz.parquet", buffer.getvalue())
    page = write_report(copy, tmp_path / "report", samples=0, input_url=source.url).page.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_report_errors_name_what_is_wrong(deblurred: tuple[Store, Store, dict], tmp_path: Path) -> None:
    source, output, _ = deblurred
    with pytest.raises(ReportError, match="no committed manifests"):
        write_report(Store(str(tmp_path / "empty")), tmp_path / "r")
    with pytest.raises(ReportError, match="--key astro_000777"):
        write_report(output, tmp_path / "r", keys=["astro_000777"], input_url=source.url)
    # No _run.json and no --input: the page is still written, without the blurry view, and says why.
    report = write_report(output, tmp_path / "r2", samples=1)
    assert any("--input" in w for w in report.warnings) and len(report.pictures) == 1
    moved = write_report(output, tmp_path / "r3", samples=1, input_url=str(tmp_path / "gone"))
    assert any("gone" in w and "--input" in w for w in moved.warnings)


def chromium() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("CI must install Debian's chromium-headless-shell (see .ci/run)")
    pytest.skip("needs headless Chromium: apt-get install chromium-headless-shell")


def test_page_renders_offline_in_headless_chromium(deblurred: tuple[Store, Store, dict], tmp_path: Path) -> None:
    source, output, _ = deblurred
    report = write_report(output, tmp_path / "report", samples=2, input_url=source.url)
    shot = tmp_path / "page.png"
    # A fresh profile, no network: the page must draw from its own folder alone.
    subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,2600",
            f"--screenshot={shot}",
            report.page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (2600, 1280)
    assert image.std() > 20  # not a blank page
    # Each sampled picture is drawn at its own size somewhere on the page (below the charts).
    tops = []
    for picture in report.pictures:
        template = cv2.imread(str(picture))
        _, score, _, (_, top) = cv2.minMaxLoc(cv2.matchTemplate(image, template, cv2.TM_CCOEFF_NORMED))
        assert score > 0.98, (picture.name, score)
        tops.append(top)
    # Above the pictures, the histogram draws a bar in its depth's colour for each common depth
    # (a legend swatch alone is 144 pixels).
    histogram = np.sum([r["depth_histogram"] for r in read_manifests(output)[0].to_pylist()], axis=0)
    charts = image[: min(tops)].astype(int)
    for depth in np.flatnonzero(histogram >= 0.1 * histogram.sum()):
        colour = depth_colours(4)[depth][::-1].astype(int)  # BGR
        assert (np.abs(charts - colour).max(axis=2) <= 2).sum() > 1000, depth


def _references(page: str) -> set[str]:
    """Every src/href the page would load."""
    found: set[str] = set()

    class Parser(html.parser.HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found.update(v for k, v in attrs if k in ("src", "href") and v)

    Parser().feed(page)
    return found


def test_a_report_of_many_frames_stays_small(tmp_path: Path) -> None:
    """200k frames (an hour and a half of video at 30 fps): statistics over all of them, charts of a
    bounded number of points, patch lists read only for the sampled frames."""
    output = Store(str(tmp_path / "out"))
    rng = np.random.default_rng(0)
    total = np.zeros(5, np.int64)
    for s in range(20):
        n = 10_000
        histograms = rng.multinomial(12, [0.1, 0.3, 0.2, 0.3, 0.1], size=n)
        total += histograms.sum(axis=0)
        columns = {
            name: pa.nulls(n, field.type) for name, field in zip(MANIFEST_SCHEMA.names, MANIFEST_SCHEMA, strict=True)
        }
        columns |= {
            "shard": pa.array([f"s{s:03d}.tar"] * n),
            "key": pa.array([f"v_{s * n + i:07d}" for i in range(n)]),
            "depth_histogram": pa.array(histograms.tolist(), pa.list_(pa.int32())),
            "mean_depth": pa.array((histograms * np.arange(5)).sum(1) / 12, pa.float32()),
            "blur_before": pa.array(rng.uniform(10, 100, n), pa.float32()),
            "blur_after": pa.array(rng.uniform(10, 200, n), pa.float32()),
            "seam_score": pa.array(np.ones(n), pa.float32()),
            "run_id": pa.array(["r1"] * n),
            "finished_at": pa.array(1.8e9 + np.arange(s * n, (s + 1) * n) / 30.0),
        }
        buffer = io.BytesIO()
        pq.write_table(pa.table(columns).cast(MANIFEST_SCHEMA), buffer)
        output.commit_bytes(f"_manifest/s{s:03d}.parquet", buffer.getvalue())
    report = write_report(output, tmp_path / "report", samples=3)
    page = report.page.read_text()
    assert len(page) < 1_500_000, len(page)  # bounded charts, not 200k points
    assert all(f'<td class="n">{count}</td>' in page for count in total)
    assert "<b>200000</b>" in page and "every 50th frame" in page and "means of 50+ frames" in page
    # The sampled frames have no shards here: each is named in a warning, and the page is still written.
    assert report.pictures == [] and all(any(k in w for w in report.warnings) for k in ("v_0000000", "v_0199999"))
