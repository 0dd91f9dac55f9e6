"""The run page's charts as inline SVG (matplotlib, Agg): nothing for the page to fetch, so it opens
offline. Each function takes plain numbers and returns an `<svg>` string."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np

plt.rcParams.update({"svg.hashsalt": "adarevd", "svg.fonttype": "none", "font.size": 9})


def exit_histogram(histogram: Sequence[int], colours: Sequence[str]) -> str:
    """Patches per exit depth, one bar per depth in its map colour, labelled with count and share."""
    fig, ax = plt.subplots(figsize=(4.8, 2.8))
    total = max(sum(histogram), 1)
    depths = np.arange(len(histogram))
    bars = ax.bar(depths, histogram, color=colours[: len(histogram)], edgecolor="#333", linewidth=0.5)
    ax.bar_label(bars, labels=[f"{n}\n{100 * n / total:.0f}%" for n in histogram], fontsize=8)
    ax.set_xticks(depths)
    ax.set_xlabel("exit depth (sub-decoders run)")
    ax.set_ylabel("patches")
    ax.margins(y=0.25)
    return _svg(fig)


def throughput(runs: Mapping[str, Sequence[float]]) -> str:
    """Frames/s over each run's time (run id -> finish times of its frames, Unix seconds)."""
    fig, ax = plt.subplots(figsize=(4.8, 2.8))
    for run_id, times in runs.items():
        t = np.sort(np.asarray(times, np.float64))
        t -= t[0]
        span = float(t[-1])
        width = max(1.0, span / 30)  # about 30 bins, at least 1 s each
        edges = np.arange(0.0, span + width, width)
        if len(edges) < 2:
            edges = np.array([0.0, width])
        counts, _ = np.histogram(t, bins=edges)
        widths = np.diff(edges)
        widths[-1] = max(span - edges[-2], width / 4)  # the last bin is cut short by the run's end
        ax.step(edges[:-1], counts / widths, where="post", label=f"run {run_id} ({len(t)} frames)")
    ax.set_xlabel("seconds since the run's first frame")
    ax.set_ylabel("frames/s")
    ax.set_ylim(bottom=0)
    if runs:
        ax.legend(fontsize=7, loc="lower right")
    return _svg(fig)


MAX_POINTS = 4000  # an archive has millions of frames: a chart draws an even sample or bins of them


def blur_scores(before: Sequence[float], after: Sequence[float]) -> str:
    """Each frame's blur score (variance of the Laplacian) after vs before; above the diagonal = more edge
    energy (a no-reference proxy: a contrast boost lands there too).
    Over MAX_POINTS frames, an evenly spaced sample of them."""
    fig, ax = plt.subplots(figsize=(4.8, 2.8))
    b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if len(b) > MAX_POINTS:
        every = -(-len(b) // MAX_POINTS)
        b, a = b[::every], a[::every]
        ax.set_title(f"every {every}th frame", fontsize=8)
    keep = (b > 0) & (a > 0)  # log axes; a flat (1-pixel) frame scores 0
    ax.scatter(b[keep], a[keep], s=8, color="#d95f02", alpha=0.7)
    if keep.any():
        low, high = min(b[keep].min(), a[keep].min()), max(b[keep].max(), a[keep].max())
        ax.plot([low, high], [low, high], color="#999", linewidth=0.8, label="unchanged")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("blur score before (more edge energy: higher)")
    ax.set_ylabel("after")
    return _svg(fig)


def mean_depths(depths: Sequence[float], num_columns: int) -> str:
    """Mean exit depth of each frame, in key order (for a video: over time); over MAX_POINTS frames,
    the mean of each of MAX_POINTS consecutive runs of frames."""
    fig, ax = plt.subplots(figsize=(4.8, 2.8))
    y = np.asarray(depths, np.float64)
    x = np.arange(len(y), dtype=np.float64)
    if len(y) > MAX_POINTS:
        edges = np.linspace(0, len(y), MAX_POINTS + 1).astype(np.int64)
        sums, counts = np.add.reduceat(y, edges[:-1]), np.diff(edges)
        x, y = (edges[:-1] + edges[1:]) / 2, sums / counts
        ax.set_title(f"means of {len(depths) // MAX_POINTS}+ frames", fontsize=8)
    ax.plot(x, y, color="#d95f02", linewidth=1)
    ax.set_ylim(0, num_columns)
    ax.set_xlabel("frame (key order)")
    ax.set_ylabel("mean exit depth")
    return _svg(fig)


def _svg(fig: plt.Figure) -> str:
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: the SVG sits inside HTML
