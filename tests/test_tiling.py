from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from adarevd.tiling import PatchGrid, _blend_plan, _ramps, cut, patch_pixels, patch_starts, stitch


def test_grid_matches_the_paper_layout() -> None:
    # 1280 wide, patch 384, overlap 32: stride 352, (1280-33)//352+1 = 4 columns, the last snapped.
    assert patch_starts(1280, 384, 32) == (0, 352, 704, 896)
    assert patch_starts(384, 384, 32) == (0,)
    assert patch_starts(400, 384, 32) == (0, 16)
    grid = PatchGrid.build(720, 208, 384, 32)
    assert (grid.size_h, grid.size_w) == (384, 208)  # a side shorter than a patch is one patch
    assert grid.xs == (0,) and grid.ys == (0, 336) and grid.shape == (2, 1)


def test_single_patch_side_has_weight_one_and_overlaps_cross_fade() -> None:
    assert torch.equal(_ramps((0,), 208), torch.ones(1, 208))
    w = _ramps((0, 352, 704, 896), 384)
    assert torch.equal(w[0, :352], torch.ones(352))  # no fade at the frame border
    overlap = w[0, 352:] + w[1, :32]
    torch.testing.assert_close(overlap, torch.ones(32))
    assert w[1, 0] == 0 and w[0, -1] == 0


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(1, 12).map(lambda v: 16 * v),
    w=st.integers(1, 12).map(lambda v: 16 * v),
    patch=st.sampled_from([32, 64, 96]),
    overlap=st.sampled_from([0, 16]),
    level=st.integers(0, 2),
)
def test_cut_then_stitch_gives_back_the_map_and_constants_blend_exactly(
    h: int, w: int, patch: int, overlap: int, level: int
) -> None:
    grid = PatchGrid.build(h, w, patch, overlap)
    image = torch.rand(2, 3, h, w)
    torch.testing.assert_close(stitch(cut(image, grid), grid), image, rtol=0, atol=1e-6)
    constant = torch.full((2 * grid.num_patches, 3, grid.size_h, grid.size_w), 0.37)
    torch.testing.assert_close(stitch(constant, grid), torch.full((2, 3, h, w), 0.37), rtol=0, atol=1e-6)
    # Every level is cut with the same grid, scaled by 2^level.
    feature = torch.rand(1, 2, h // 2**level, w // 2**level)
    patches = cut(feature, grid, level)
    assert patches.shape == (grid.num_patches, 2, grid.size_h // 2**level, grid.size_w // 2**level)
    last_y, last_x = grid.ys[-1] // 2**level, grid.xs[-1] // 2**level
    torch.testing.assert_close(patches[-1], feature[0, :, last_y:, last_x:])


@settings(deadline=None, max_examples=60)
@example(h=62, w=200, patch=32, overlap=16)  # rows (0, 16, 30): the snapped last patch needs a third colour
@given(
    h=st.integers(1, 400),
    w=st.integers(1, 400),
    patch=st.sampled_from([32, 64, 96, 384]),
    overlap=st.sampled_from([0, 8, 16]),
)
def test_patches_of_one_colour_never_share_a_pixel_and_the_blend_is_the_weighted_mean(
    h: int, w: int, patch: int, overlap: int
) -> None:
    """What makes the stitch deterministic on CUDA: no pixel gets two adds in one index_add_."""
    grid = PatchGrid.build(h, w, patch, overlap)
    weights, _, order, counts, indices = _blend_plan(grid, torch.device("cpu"))
    assert sorted(order.tolist()) == list(range(grid.num_patches))  # every patch in exactly one colour
    index = patch_pixels(grid)
    for group, pixels in zip(order.split(counts), indices, strict=True):
        assert torch.equal(pixels, index[group].reshape(-1))
        assert pixels.unique().numel() == pixels.numel()
    patches = torch.rand(grid.num_patches, 2, grid.size_h, grid.size_w, dtype=torch.float64)
    numerator = torch.zeros(2, h * w, dtype=torch.float64)
    denominator = torch.zeros(h * w, dtype=torch.float64)
    for i in range(grid.num_patches):  # the blend written out, patch by patch, in float64
        wi = weights[i].reshape(-1).double()
        numerator[:, index[i]] += patches[i].reshape(2, -1) * wi
        denominator[index[i]] += wi
    expected = (numerator / denominator).reshape(1, 2, h, w)
    torch.testing.assert_close(stitch(patches.float(), grid).double(), expected, rtol=0, atol=1e-6)


def _summed_weights(height: int, width: int, blend: str) -> torch.Tensor:
    """(H, W): what `stitch` gives from patches of ones: each pixel's summed blend weights."""
    grid = PatchGrid.build(height, width, 384, 32)
    return stitch(torch.ones(grid.num_patches, 1, grid.size_h, grid.size_w), grid, blend)[0, 0]


def test_the_reference_blend_at_800x1104_sums_over_one_where_three_patches_meet() -> None:
    """800x1100 pads to 800x1104: columns start at 0, 352, 704 and (snapped) 720. In the reference's
    `grids_inverse` patch 704 fades in over 704..735 (linspace(0, 1, 32)) and out over its last 368
    columns, 720..1087 (linspace(1, 0, 368): the 368 it shares with patch 720); patch 352 fades out over
    704..735 and patch 720 in over 720..1087; nothing is divided. Column c in 720..735 then sums to
    1 + (u / 367) (1 - t / 31), t = c - 704, u = c - 720; every other pixel to 1. Rows (0, 352, 416)
    cross-fade plainly."""
    grid = PatchGrid.build(800, 1104, 384, 32)
    assert (grid.ys, grid.xs) == ((0, 352, 416), (0, 352, 704, 720))
    reference, normalised = _summed_weights(800, 1104, "reference"), _summed_weights(800, 1104, "normalised")
    expected = torch.ones(1104)
    for c in range(720, 736):
        t, u = c - 704, c - 720
        expected[c] = 1 + (u / 367) * (1 - t / 31)
    torch.testing.assert_close(reference, expected.expand(800, 1104), rtol=0, atol=1e-6)
    assert abs(float(reference.max()) - 1.00492) < 1e-4  # column 727: t 23, u 7
    torch.testing.assert_close(normalised, torch.ones(800, 1104), rtol=0, atol=1e-6)


def test_the_reference_blend_is_the_normalised_one_at_1080p_and_keeps_weight_one_on_a_short_side() -> None:
    # 1080x1920 pads to 1088x1920: the snapped last patch starts 128 px (>= 32) after the last regular one.
    for height, width in ((1088, 1920), (112, 1920)):  # 112 rows: one patch tall, shorter than a patch
        torch.testing.assert_close(
            _summed_weights(height, width, "reference"), torch.ones(height, width), rtol=0, atol=1e-6
        )
    # The same pixels from random patches, both blends: a weighted mean either way.
    grid = PatchGrid.build(1088, 1920, 384, 32)
    patches = torch.rand(grid.num_patches, 3, grid.size_h, grid.size_w, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(stitch(patches, grid, "reference"), stitch(patches, grid), rtol=0, atol=1e-6)
