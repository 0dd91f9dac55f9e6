"""Pictures of where patches exited: a frame with each patch coloured by its exit depth, and the
blurry | deblurred | exit-depth panel of `adarevd report` (numpy + OpenCV; no torch, no Ray)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from pipeline.formats.frames import PatchMap

HEADER = 28  # pixels of caption above each panel
FONT = cv2.FONT_HERSHEY_SIMPLEX


def depth_colours(num_columns: int) -> np.ndarray:
    """(N + 1, 3) uint8 RGB, one colour per exit depth 0..N, evenly spaced on viridis (dark = early)."""
    ramp = np.linspace(0, 255, num_columns + 1).round().astype(np.uint8)[:, None]
    return cv2.applyColorMap(ramp, cv2.COLORMAP_VIRIDIS)[:, 0, ::-1].copy()


def hex_colours(num_columns: int) -> list[str]:
    """The same colours as `#rrggbb`, for charts and the HTML legend."""
    return ["#{:02x}{:02x}{:02x}".format(*c) for c in depth_colours(num_columns)]


def owners(starts: Sequence[int], size: int, extent: int) -> np.ndarray:
    """(extent,) index of the patch owning each pixel along one side: the patch whose centre is
    nearest, so an overlap is split down its middle."""
    centres = np.asarray(starts, np.float64) + (size - 1) / 2
    return np.abs(np.arange(extent)[:, None] - centres[None, :]).argmin(axis=1)


def exit_map(rgb: np.ndarray, patches: PatchMap, num_columns: int, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8: the frame in grey under each patch's depth colour, with patch borders drawn."""
    h, w = rgb.shape[:2]
    rows, cols = owners(patches.ys, patches.size_h, h), owners(patches.xs, patches.size_w, w)
    depths = np.asarray(patches.depths, np.int64).reshape(len(patches.ys), len(patches.xs))
    if depths.size and (depths.min() < 0 or depths.max() > num_columns):
        raise ValueError(f"exit depths {depths.min()}..{depths.max()} outside 0..{num_columns}")
    cell = depths[rows[:, None], cols[None, :]]  # (H, W) depth of the owning patch
    grey = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB).astype(np.float32)
    colour = depth_colours(num_columns)[cell].astype(np.float32)
    out = (grey * (1 - alpha) + colour * alpha).round().astype(np.uint8)
    border = np.zeros((h, w), bool)
    border[:, 1:] |= cols[1:] != cols[:-1]
    border[1:, :] |= (rows[1:] != rows[:-1])[:, None]
    out[border] = 255
    return out


def panel(blurry: np.ndarray | None, deblurred: np.ndarray, patches: PatchMap, num_columns: int) -> np.ndarray:
    """blurry | deblurred | exit-depth map side by side, captioned, with a depth legend. `blurry`
    None (the input is gone) leaves its slot grey and says so. Frames wider than 960 are shrunk."""
    h, w = deblurred.shape[:2]
    scale = min(1.0, 960 / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    underlay = blurry if blurry is not None else deblurred
    views = [
        (
            blurry if blurry is not None else np.full_like(deblurred, 96),
            "blurry" if blurry is not None else "input n/a",
        ),
        (deblurred, "deblurred"),
        (exit_map(underlay, patches, num_columns), "exit depth"),
    ]
    width = max(size[0], 150)  # room for a caption under a tiny frame
    tiles = []
    for image, caption in views:
        tile = np.full((HEADER + size[1], width, 3), 255, np.uint8)
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
        tile[HEADER:, : size[0]] = cv2.resize(image, size, interpolation=interp)
        cv2.putText(tile, caption, (4, 19), FONT, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    tiles[2] = _legend(tiles[2], num_columns, width)
    gap = np.full((HEADER + size[1], 4, 3), 255, np.uint8)
    return np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)


def _legend(tile: np.ndarray, num_columns: int, width: int) -> np.ndarray:
    """Depth swatches 0..N at the right of the exit map's caption."""
    colours = depth_colours(num_columns)
    x = width - 4 - 16 * (num_columns + 1)
    if x < 100:
        return tile
    for d, colour in enumerate(colours):
        x0 = x + 16 * d
        cv2.rectangle(tile, (x0, 6), (x0 + 14, 22), tuple(int(c) for c in colour), -1)
        ink = (255, 255, 255) if d < (num_columns + 1) / 2 else (0, 0, 0)
        cv2.putText(tile, str(d), (x0 + 3, 19), FONT, 0.4, ink, 1, cv2.LINE_AA)
    return tile
