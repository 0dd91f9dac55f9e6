"""PSNR, SSIM and tone shift have one definition: tensors, 8-bit arrays and MSE give the same numbers."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from adarevd.metrics import psnr, psnr_of_mse, psnr_uint8, ssim_uint8, tone_shift


def test_psnr_agrees_on_tensors_arrays_and_mse() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 17, 23, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    tensors = [torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255) for x in (a, b)]
    on_tensors = psnr(*tensors).tolist()
    on_arrays = [psnr_uint8(a[i], b[i]) for i in range(2)]
    mse = ((a.astype(float) - b) ** 2).reshape(2, -1).mean(axis=1)
    assert on_tensors == pytest.approx(on_arrays, abs=1e-4)
    assert psnr_of_mse(mse, peak=255.0).tolist() == pytest.approx(on_arrays, abs=1e-9)
    assert psnr_of_mse(mse / 255**2).tolist() == pytest.approx(on_arrays, abs=1e-9)


def test_identical_images_read_80_db_not_inf() -> None:
    image = np.full((8, 8, 3), 7, np.uint8)
    assert psnr_uint8(image, image) == pytest.approx(80.0)
    assert psnr(torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)).item() == pytest.approx(80.0)
    json.loads(json.dumps(psnr_uint8(image, image), allow_nan=False))  # a number JSON can hold


def test_tone_shift_is_per_channel_in_8_bit_levels() -> None:
    before = np.zeros((4, 5, 3), np.uint8)
    after = before + np.array([2, 0, 255], np.uint8)
    assert tone_shift(before, after) == (2.0, 0.0, 255.0)
    assert tone_shift(before / 255, after / 255, scale=255) == pytest.approx((2.0, 0.0, 255.0))


def test_ssim_is_the_published_gaussian_window_one() -> None:
    """The same number as pytorch-msssim (11x11 Gaussian window, sigma 1.5), which papers' code uses;
    scikit-image's default uniform 7x7 window would read otherwise."""
    from pytorch_msssim import ssim
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    sharp = cv2.GaussianBlur(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), (0, 0), 2)
    blurry = cv2.GaussianBlur(sharp, (0, 0), 1.5)
    ours = ssim_uint8(blurry, sharp)
    theirs = ssim(*(torch.from_numpy(x).permute(2, 0, 1)[None].double() for x in (blurry, sharp)), data_range=255)
    assert abs(ours - float(theirs)) < 1e-6
    assert abs(structural_similarity(blurry, sharp, channel_axis=2, data_range=255) - ours) > 1e-3
    assert ssim_uint8(sharp, sharp) == 1.0
