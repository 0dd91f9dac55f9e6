"""The patch grid of the paper's inference (ADAREVD.md section 6): cut feature maps, blend residuals.

One grid serves every feature level: patch side k = min(side, patch), overlap o, stride k - o, rows
(side - o - 1) // stride + 1, the last row/column snapped to end at the border; level l uses the same
grid divided by 2^l. Blending: along each overlap the ending patch fades linspace(1, 0, n) and the
starting one linspace(0, 1, n) (n = the real overlap width); a side with one patch gets weight 1 (the
reference fades it to zero at the border, a defect). The sum is divided by the summed weights, which is
1 wherever two patches overlap and keeps the blend a weighted mean where three do (a short snapped side).
The patches are added colour by colour, no two of a colour overlapping, so no pixel takes two adds in
one `index_add_`: on CUDA, where that op adds with atomics in no fixed order, the sum is still the same
bits every run (the job's outputs are byte-reproducible on a GPU too).

`blend="reference"` gives the reference's weights instead (`AdaRevIDSlide.grids_inverse`), for results
that must match published numbers: the same ramps, but where the snapped last patch starts less than
`overlap` after the last regular one, that regular patch takes both its ramps over the few pixels
where they meet (their product), and nothing is divided, so the weights there sum to up to ~1.005
rather than 1. A side with one patch keeps weight 1 in both blends.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from adarevd.modes import Blend


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


def stitch(patches: torch.Tensor, grid: PatchGrid, blend: Blend = "normalised") -> torch.Tensor:
    """Blend (B * rows * cols, C, kh, kw) level-0 patches into (B, C, H, W)."""
    weights, total, order, counts, indices = _blend_plan(grid, patches.device, blend)
    n = grid.num_patches
    b, c = patches.shape[0] // n, patches.shape[1]
    values = patches.float().reshape(b, n, c, -1) * weights.reshape(1, n, 1, -1)
    values = values.permute(0, 2, 1, 3)[:, :, order]  # (B, C, patches in colour order, kh * kw)
    canvas = torch.zeros(b, c, grid.height * grid.width, device=patches.device)
    # Each pixel gets at most one add per call: the same sum on every run.
    for part, index in zip(values.split(counts, dim=2), indices, strict=True):
        canvas.index_add_(2, index, part.reshape(b, c, -1))
    return (canvas / total).reshape(b, c, grid.height, grid.width).to(patches.dtype)


def colours(starts: tuple[int, ...], size: int) -> tuple[int, ...]:
    """A colour for each patch along one side, the fewest such that patches of one colour do not
    overlap (greedy over the sorted starts: two colours, three where the snapped last patch needs it)."""
    ends: list[int] = []  # per colour, where its last patch ends
    out = []
    for start in starts:
        colour = next((k for k, end in enumerate(ends) if end <= start), len(ends))
        if colour == len(ends):
            ends.append(0)
        ends[colour] = start + size
        out.append(colour)
    return tuple(out)


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


def reference_ramps(starts: tuple[int, ...], size: int, side: int) -> torch.Tensor:
    """(count, size) 1-D weights of the patches along one side as the reference blends them: a middle
    patch fades in over the overlap o, every patch but the last two fades out over o, and the last two
    cross over the `extra` pixels the snapped last patch shares with the one before (nc * stride + 2o
    - side). Applied in that order, so a patch that has two ramps over one pixel takes their product."""
    w = torch.ones(len(starts), size)
    if len(starts) == 1:
        return w  # (the reference fades a lone patch to zero at the border)
    stride = starts[1] - starts[0] if len(starts) > 2 else None
    o = size - stride if stride is not None else 0  # two patches: only their crossing counts
    extra = len(starts) * (size - o) + 2 * o - side if stride is not None else 2 * size - side
    for k, j in enumerate(starts):
        if o and j != 0 and j + size != side:
            w[k, :o] *= torch.linspace(0, 1, o)
        if o and j + 2 * size - extra < side:
            w[k, size - o :] *= torch.linspace(1, 0, o)
        if j + size == side:
            w[k, :extra] *= torch.linspace(0, 1, extra)
        if j + 2 * size - extra == side:
            w[k, size - extra :] *= torch.linspace(1, 0, extra)
    return w


Plan = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], tuple[torch.Tensor, ...]]


@functools.lru_cache(maxsize=32)
def _blend_plan(grid: PatchGrid, device: torch.device, blend: Blend = "normalised") -> Plan:
    """Per-patch weights (rows*cols, 1, kh, kw) and summed weights (ones for the reference's blend,
    which divides by nothing); the patches (row-major ids) ordered colour by colour, how many of each
    colour, and the flat canvas index of each colour's pixels."""
    if blend == "reference":
        wy = reference_ramps(grid.ys, grid.size_h, grid.height)
        wx = reference_ramps(grid.xs, grid.size_w, grid.width)
    else:
        wy, wx = _ramps(grid.ys, grid.size_h), _ramps(grid.xs, grid.size_w)
    weights = (wy[:, None, :, None] * wx[None, :, None, :]).reshape(grid.num_patches, 1, grid.size_h, grid.size_w)
    index = patch_pixels(grid)
    total = torch.zeros(grid.height * grid.width).index_add_(0, index.reshape(-1), weights.reshape(-1))
    if blend == "reference":
        total = torch.ones_like(total)
    cy, cx = colours(grid.ys, grid.size_h), colours(grid.xs, grid.size_w)
    colour = [(y, x) for y in cy for x in cx]  # row-major, as the patches
    groups = [[i for i, c in enumerate(colour) if c == key] for key in sorted(set(colour))]
    order = torch.tensor([i for group in groups for i in group])
    indices = tuple(index[group].reshape(-1).to(device) for group in groups)
    # Every pixel is covered with weight > 0 (ramps reach 0 only where a neighbour has weight 1).
    return weights.to(device), total.clamp_min(1e-12).to(device), order.to(device), [len(g) for g in groups], indices


def patch_pixels(grid: PatchGrid) -> torch.Tensor:
    """(rows*cols, kh*kw): the flat canvas index of every pixel of each patch, row-major."""
    rows = _axis_index(grid.ys, grid.size_h, 1, torch.device("cpu"))
    cols = _axis_index(grid.xs, grid.size_w, 1, torch.device("cpu"))
    return (rows[:, None, :, None] * grid.width + cols[None, :, None, :]).reshape(grid.num_patches, -1)
