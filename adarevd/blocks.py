"""NAFNet-family building blocks shared by the encoders, the reversible columns and the classifier.

Parameter names follow the authors' checkpoints (see `reference/upstream-keys/`), so their files load
strictly: `sca.1` in NAFBlock (pool + conv in one Sequential), `sca.0` + a separate `avg` in FCNAFBlock,
`fft_block{1,2}.complex_conv{1,2}` for the Fourier branches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """Layer norm over channels at every pixel of a (B, C, H, W) map, with affine weight and bias (C,)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm normalises trailing dims, so move channels last and back (one fused kernel).
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ChannelLayerNorm(nn.Module):
    """The decoder's `down` norm: per-pixel layer norm over channels, eps 1e-5, held as `.body`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = LayerNorm2d(channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def simple_gate(x: torch.Tensor) -> torch.Tensor:
    """SimpleGate: split channels in two halves and multiply them."""
    a, b = x.chunk(2, dim=1)
    return a * b


class ChannelPool(nn.Module):
    """Average pool to one value per channel, or TLC's local box average at inference.

    `window=None` is the plain global mean. With a window (TLC, test-time local converter), every pixel
    gets the mean of the window around it, computed from an integral image over the valid positions and
    replicate-padded back to the input size; a window covering the whole map is the global mean.
    """

    def __init__(self, window: int | None = None) -> None:
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.window is None or (self.window >= h and self.window >= w):
            return x.mean(dim=(-2, -1), keepdim=True)
        return local_mean(x, min(h, self.window), min(w, self.window))

    def extra_repr(self) -> str:
        return f"window={self.window}"


def local_mean(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Mean over every valid kh x kw window, replicate-padded to x's size (left/top get the floor)."""
    h, w = x.shape[-2:]
    # Centre on the per-channel mean first: the fp32 integral image then stays small and precise.
    centre = x.mean(dim=(-2, -1), keepdim=True)
    s = F.pad((x - centre).cumsum(-2).cumsum(-1), (1, 0, 1, 0))  # (B, C, h+1, w+1)
    box = s[..., kh:, kw:] - s[..., :-kh, kw:] - s[..., kh:, :-kw] + s[..., :-kh, :-kw]
    out = box / (kh * kw) + centre  # (B, C, h-kh+1, w-kw+1)
    dh, dw = h - out.shape[-2], w - out.shape[-1]
    return F.pad(out, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="replicate")


class _NAFBody(nn.Module):
    """The convolutions, norms and residual scales NAFBlock and FCNAFBlock share (C channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c, dw = channels, 2 * channels
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(c, c, 1)
        self.conv4 = nn.Conv2d(c, dw, 1)
        self.conv5 = nn.Conv2d(c, c, 1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        # Zero-initialised residual scales: a new block is the identity.
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))


class NAFBlock(_NAFBody):
    """NAFNet block: y = x + beta*conv3(SCA(SG(dw(conv1(LN(x)))))), out = y + gamma*conv5(SG(conv4(LN(y))))."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.sca = nn.Sequential(ChannelPool(), nn.Conv2d(channels, channels, 1))  # no sigmoid, as in NAFNet

    def spatial_mix(self, x: torch.Tensor) -> torch.Tensor:
        """The first branch before its beta scale: conv1 -> depthwise 3x3 -> gate -> SCA -> conv3."""
        z = simple_gate(self.conv2(self.conv1(self.norm1(x))))
        return self.conv3(z * self.sca(z))

    def channel_mix(self, y: torch.Tensor) -> torch.Tensor:
        return self.conv5(simple_gate(self.conv4(self.norm2(y))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.beta * self.spatial_mix(x)
        return y + self.gamma * self.channel_mix(y)


class FourierBranch(nn.Module):
    """Pointwise MLP in the 2-D Fourier domain: rfft2 -> [Re, Im] -> 1x1 (2C->4C) -> GELU -> 1x1 -> irfft2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.complex_conv1 = nn.Conv2d(2 * channels, 4 * channels, 1)
        self.complex_conv2 = nn.Conv2d(4 * channels, 2 * channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        dtype = z.dtype
        # FFTs run in fp32: half-precision FFTs need power-of-two sizes on CUDA and lose accuracy.
        spec = torch.fft.rfft2(z.float(), norm="backward")  # (B, C, H, W//2+1) complex
        y = torch.cat([spec.real, spec.imag], dim=1).to(dtype)
        y = self.complex_conv2(F.gelu(self.complex_conv1(y))).float()
        re, im = y.chunk(2, dim=1)
        return torch.fft.irfft2(torch.complex(re, im), s=(h, w), norm="backward").to(dtype)


class FCNAFBlock(_NAFBody):
    """Decoder block: a NAFBlock with a Fourier branch added to each of its two residual paths."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.avg = ChannelPool()  # global within each patch, always
        self.sca = nn.Sequential(nn.Conv2d(channels, channels, 1))
        self.fft_block1 = FourierBranch(channels)
        self.fft_block2 = FourierBranch(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.norm1(x)
        z = simple_gate(self.conv2(self.conv1(xn)))
        s = self.conv3(z * self.sca(self.avg(z))) + self.fft_block1(xn)
        y = x + self.beta * s
        yn = self.norm2(y)
        return y + self.gamma * (self.fft_block2(yn) + self.conv5(simple_gate(self.conv4(yn))))
