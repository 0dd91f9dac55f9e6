"""Per-frame quality signals for manifests: blur (variance of the Laplacian), seams at patch borders,
and the tone shift (how much the output's mean differs from the input's, per channel).

The blur score is a no-reference proxy: it rises with edge energy, so any contrast boost raises it,
a harmful one included. The tone shift shows such a change: a deblurrer should leave it near 0.
"""

from __future__ import annotations

import cv2
import numpy as np

from adarevd.tiling import PatchGrid


def blur_score(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image: higher = sharper (more edge energy)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def seam_score(rgb: np.ndarray, grid: PatchGrid) -> float:
    """Mean absolute step across the lines where a patch starts or ends, over the mean step across all
    lines: about 1 means no visible seams; well above 1 means the patch grid shows."""
    image = rgb.astype(np.float32)
    h, w = image.shape[:2]
    dx = np.abs(np.diff(image, axis=1)).mean(axis=(0, 2))  # (w-1,) step between column x and x+1
    dy = np.abs(np.diff(image, axis=0)).mean(axis=(1, 2))  # (h-1,)
    xs = _borders(grid.xs, grid.size_w, w)
    ys = _borders(grid.ys, grid.size_h, h)
    if not len(xs) and not len(ys):
        return 1.0
    at_seams = np.concatenate([dx[xs], dy[ys]]).mean()
    overall = np.concatenate([dx, dy]).mean() if dx.size + dy.size else 0.0
    return float(at_seams / overall) if overall > 0 else 1.0


def _borders(starts: tuple[int, ...], size: int, extent: int) -> np.ndarray:
    """Indices i of steps (i -> i+1) that cross a patch start or end inside the image."""
    lines = {s - 1 for s in starts[1:]} | {s + size - 1 for s in starts[:-1]}
    return np.array(sorted(i for i in lines if 0 <= i < extent - 1), dtype=np.int64)
