"""Image quality, one definition each: PSNR (torch tensors, NumPy arrays and MSE agree), SSIM and tone
shift.

PSNR adds a floor of 1e-8 of the peak squared to the MSE: identical images read 80 dB, never inf
(inf is not JSON, and one untouched frame must not outweigh every other in a mean).

SSIM is the published one (Wang et al. 2004): an 11x11 Gaussian window of sigma 1.5, population
statistics, the mean over the pixels the whole window covers, then over the channels. Deblurring
papers and torchmetrics report it so; scikit-image's default (a uniform 7x7 window) reads higher.
"""

from __future__ import annotations

import numpy as np
import torch

MSE_FLOOR = 1e-8  # of the peak squared: 80 dB at most
PSNR_CAP_DB = 50.0  # RMSE 0.8 levels: closer than that no one sees a difference (calibration, training)


def psnr_of_mse(mse: np.ndarray | float, peak: float = 1.0) -> np.ndarray:
    """PSNR in dB of mean squared errors on a scale whose white is `peak` (1.0, or 255 for 8 bits)."""
    return 10 * np.log10(peak**2 / (np.asarray(mse, np.float64) + MSE_FLOOR * peak**2))


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of (B, C, H, W) tensors."""
    return (a.float() - b.float()).square().flatten(1).mean(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) tensors in [0, 1]."""
    return 10 * torch.log10(1 / (mse(a, b) + MSE_FLOOR))


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images of one shape."""
    return float(psnr_of_mse(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2), peak=255.0))


def ssim_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two 8-bit (H, W, 3) images of one shape (Gaussian window, sigma 1.5)."""
    from skimage.metrics import structural_similarity  # (a slow import, for evaluation only)

    return float(
        structural_similarity(
            a, b, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    )


def tone_shift(before: np.ndarray, after: np.ndarray, scale: float = 1.0) -> tuple[float, float, float]:
    """Mean of `after` minus mean of `before` per channel ((..., 3) arrays), times `scale`: 8-bit levels
    for 8-bit images (scale 1) or for images in [0, 1] (scale 255)."""
    before64, after64 = before.reshape(-1, 3).astype(np.float64), after.reshape(-1, 3).astype(np.float64)
    means = (after64.mean(axis=0) - before64.mean(axis=0)) * scale
    return (float(means[0]), float(means[1]), float(means[2]))
