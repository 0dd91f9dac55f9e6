from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adarevd.blocks import ChannelPool, FCNAFBlock, FourierBranch, LayerNorm2d, NAFBlock, local_mean


def test_layernorm2d_normalises_each_pixel_over_channels() -> None:
    torch.manual_seed(0)
    norm = LayerNorm2d(5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 3, 4) * 3 + 1
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    expected = (x - mu) / torch.sqrt(var + 1e-6) * norm.weight[:, None, None] + norm.bias[:, None, None]
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), kh=st.integers(1, 20), kw=st.integers(1, 20))
def test_local_mean_equals_box_filter_with_replicate_padding(h: int, w: int, kh: int, kw: int) -> None:
    kh, kw = min(kh, h), min(kw, w)
    x = torch.randn(1, 2, h, w, dtype=torch.float64) + 100.0  # an offset that a naive integral image loses
    valid = F.avg_pool2d(x, (kh, kw), stride=1)
    dh, dw = h - valid.shape[-2], w - valid.shape[-1]
    expected = F.pad(valid, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="replicate")
    torch.testing.assert_close(local_mean(x, kh, kw), expected)


def test_channel_pool_is_global_when_window_covers_the_map() -> None:
    x = torch.randn(2, 3, 8, 6)
    torch.testing.assert_close(ChannelPool(window=8)(x), x.mean((-2, -1), keepdim=True))
    torch.testing.assert_close(ChannelPool(window=None)(x), x.mean((-2, -1), keepdim=True))
    local = ChannelPool(window=4)(x)
    assert local.shape == x.shape
    # Valid windows give a 5x3 map, replicate-padded by (1, 2) rows and (1, 2) columns: pixel (2, 2) is
    # the window starting at (1, 1).
    torch.testing.assert_close(local[..., 2, 2], x[..., 1:5, 1:5].mean((-2, -1)))


def test_blocks_start_as_identity_and_keep_shape() -> None:
    x = torch.randn(2, 8, 12, 10)
    torch.testing.assert_close(NAFBlock(8)(x), x)
    torch.testing.assert_close(FCNAFBlock(8)(x), x)


def test_fourier_branch_is_real_and_keeps_odd_sizes() -> None:
    branch = FourierBranch(4)
    x = torch.randn(1, 4, 7, 9)
    y = branch(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    # The same math through numpy's FFT: 1x1 convs are matrix products over channels.
    w1 = branch.complex_conv1.weight[:, :, 0, 0].detach().double().numpy()
    b1 = branch.complex_conv1.bias.detach().double().numpy()
    w2 = branch.complex_conv2.weight[:, :, 0, 0].detach().double().numpy()
    b2 = branch.complex_conv2.bias.detach().double().numpy()
    spec = np.fft.rfft2(x[0].double().numpy())  # (C, 7, 5)
    z = np.concatenate([spec.real, spec.imag])  # (2C, 7, 5)
    hidden = np.einsum("oc,chw->ohw", w1, z) + b1[:, None, None]
    hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))  # exact GELU
    out = np.einsum("oc,chw->ohw", w2, hidden) + b2[:, None, None]
    expected = np.fft.irfft2(out[:4] + 1j * out[4:], s=(7, 9))
    np.testing.assert_allclose(y[0].detach().double().numpy(), expected, rtol=1e-4, atol=1e-5)
