"""The patch grid of the paper's inference (ADAREVD.md section 6): cut feature maps, blend residuals.

One grid serves every feature level: patch side k = min(side, patch), overlap o, stride k - o, rows
(side - o - 1) // stride + 1, the last row/column snapped to end at the border; level l uses the same
grid divided by 2^l. Blending: along each overlap the ending patch fades linspace(1, 0, n) and the
starting one linspace(0, 1, n) (n = the real overlap width); a side with one patch gets weight 1 (the
reference fades it to zero at the border, a defect). The sum is divided by the summed weights, which is
1 wherever two patches overlap and keeps the blend a weighted mean where three do (a short snapped side).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def patch_starts(side: int, size: int, overlap: int) -> tuple[int, ...]:
    """Start offsets of the patches along one side (size already capped at side)."""
    if size >= side:
        return (0,)  # one patch covers the side (also where the side is no longer than the overlap)
    stride = size - overlap
    count = (side - overlap - 1) // stride + 1
    starts = [i * stride for i in range(count)]
    starts[-1] = side - size
    return tuple(starts)


@dataclass(frozen=True)
class PatchGrid:
    """Patch layout over a padded frame, in level-0 pixels; `ys`/`xs` are row/column starts."""

    height: int
    width: int
    size_h: int
    size_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @classmethod
    def build(cls, height: int, width: int, patch: int, overlap: int) -> PatchGrid:
        kh, kw = min(height, patch), min(width, patch)
        return cls(height, width, kh, kw, patch_starts(height, kh, overlap), patch_starts(width, kw, overlap))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ys), len(self.xs)

    @property
    def num_patches(self) -> int:
        return len(self.ys) * len(self.xs)


def cut(feature: torch.Tensor, grid: PatchGrid, level: int = 0) -> torch.Tensor:
    """(B, C, H/2^l, W/2^l) -> (B * rows * cols, C, kh/2^l, kw/2^l), frame-major then row-major."""
    s = 2**level
    rows = _axis_index(grid.ys, grid.size_h, s, feature.device)  # (rows, kh)
    cols = _axis_index(grid.xs, grid.size_w, s, feature.device)  # (cols, kw)
    patches = feature[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # (B, C, rows, cols, kh, kw)
    b, c, ny, nx, kh, kw = patches.shape
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(b * ny * nx, c, kh, kw)


def stitch(patches: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """Blend (B * rows * cols, C, kh, kw) level-0 patches into (B, C, H, W)."""
    weights, index, total = _blend_plan(grid, patches.device)
    n = grid.num_patches
    b, c = patches.shape[0] // n, patches.shape[1]
    values = patches.float().reshape(b, n, c, -1) * weights.reshape(1, n, 1, -1)
    values = values.permute(0, 2, 1, 3).reshape(b, c, -1)  # (B, C, patches * kh * kw)
    canvas = torch.zeros(b, c, grid.height * grid.width, device=patches.device)
    canvas.index_add_(2, index, values)
    return (canvas / total).reshape(b, c, grid.height, grid.width).to(patches.dtype)


def _axis_index(starts: tuple[int, ...], size: int, scale: int, device: torch.device) -> torch.Tensor:
    first = torch.tensor(starts, device=device) // scale
    return first[:, None] + torch.arange(size // scale, device=device)[None, :]


def _ramps(starts: tuple[int, ...], size: int) -> torch.Tensor:
    """(count, size) 1-D blend weights of the patches along one side."""
    w = torch.ones(len(starts), size)
    for i, start in enumerate(starts):
        if i > 0:
            n = starts[i - 1] + size - start  # overlap with the previous patch
            w[i, :n] *= torch.linspace(0, 1, n)
        if i + 1 < len(starts):
            n = start + size - starts[i + 1]  # overlap with the next patch
            w[i, size - n :] *= torch.linspace(1, 0, n)
    return w


@functools.lru_cache(maxsize=32)
def _blend_plan(grid: PatchGrid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch weights (rows*cols, 1, kh, kw), flat canvas index of every patch pixel, summed weights."""
    wy, wx = _ramps(grid.ys, grid.size_h), _ramps(grid.xs, grid.size_w)
    weights = (wy[:, None, :, None] * wx[None, :, None, :]).reshape(grid.num_patches, 1, grid.size_h, grid.size_w)
    rows = _axis_index(grid.ys, grid.size_h, 1, torch.device("cpu"))
    cols = _axis_index(grid.xs, grid.size_w, 1, torch.device("cpu"))
    index = (rows[:, None, :, None] * grid.width + cols[None, :, None, :]).reshape(-1)
    total = torch.zeros(grid.height * grid.width).index_add_(0, index, weights.reshape(-1))
    # Every pixel is covered with weight > 0 (ramps reach 0 only where a neighbour has weight 1).
    return weights.to(device), index.to(device), total.clamp_min(1e-12).to(device)
