"""The frozen encoders: NAFNet and UFPNet trunks returning five feature maps e0..e4.

Trunk: `intro` 3x3 conv 3->w; four levels of blocks at w, 2w, 4w, 8w, each followed by a 2x2 stride-2
conv (`downs`); one middle NAFBlock at 16w. e0..e3 are the level outputs before `downs`, e4 the middle
output. UFPNet's levels 0-2 use a kernel-attention block fed by a per-pixel blur-kernel map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adarevd.blocks import ChannelPool, NAFBlock
from adarevd.config import AdaRevDConfig
from adarevd.kernel_prior import KernelCodeNet, KernelFlow, kernel_map
from adarevd.modes import EncoderKind


class KernelAttention(nn.Module):
    """x_k = a * sigmoid(conv([a, k])) + x with a = GELU(conv(x)), k = GELU(conv(GELU(conv(K))))."""

    def __init__(self, channels: int, kernel_channels: int) -> None:
        super().__init__()
        c = channels
        self.conv_1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU())
        self.conv_kernel = nn.Sequential(
            nn.Conv2d(kernel_channels, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU()
        )
        self.conv_2 = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        a = self.conv_1(x)
        return a * self.conv_2(torch.cat([a, self.conv_kernel(kernel)], dim=1)) + x


class KernelNAFBlock(NAFBlock):
    """UFPNet block: the NAFBlock body runs on the kernel-attended x_k, its first residual adds to x."""

    def __init__(self, channels: int, kernel_channels: int) -> None:
        super().__init__(channels)
        self.kernel_atttion = KernelAttention(channels, kernel_channels)  # sic: the checkpoints' spelling

    def forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x + self.beta * self.spatial_mix(self.kernel_atttion(x, kernel))
        return y + self.gamma * self.channel_mix(y)


class Encoder(nn.Module):
    """NAFNet/UFPNet encoder (AdaRevD freezes it): image (B, 3, H, W), H and W multiples of 16 -> [e0, ..., e4].

    `tlc_window` (TLC): each channel pool inside the encoder becomes a local box mean with a window of
    tlc_window / 2^level cells; None keeps global pools.
    """

    def __init__(
        self,
        *,
        kind: EncoderKind,
        width: int,
        blocks: tuple[int, ...],
        tlc_window: int | None,
        kernel_size: int = 19,
        kernel_noise: bool = True,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.kernel_noise = kernel_noise
        kk = kernel_size * kernel_size
        self.intro = nn.Conv2d(3, width, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        for level, count in enumerate(blocks):
            c = width * 2**level
            with_kernel = kind == "ufpnet" and level < 3
            level_blocks = [KernelNAFBlock(c, kk) if with_kernel else NAFBlock(c) for _ in range(count)]
            self.encoders.append(nn.ModuleList(level_blocks))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
        self.middle_blks = nn.ModuleList([NAFBlock(width * 2 ** len(blocks))])
        if kind == "ufpnet":
            self.kernel_extra = KernelCodeNet(kernel_size)
            self.flow = KernelFlow(kernel_size)
            self.kernel_down = nn.ModuleList([nn.Conv2d(kk, kk, 2, stride=2) for _ in range(2)])
        self._set_tlc(tlc_window)

    @classmethod
    def from_config(cls, config: AdaRevDConfig) -> Encoder:
        return cls(
            kind=config.encoder,
            width=config.width,
            blocks=config.encoder_blocks,
            tlc_window=config.tlc_window,
            kernel_size=config.kernel_size,
            kernel_noise=config.kernel_noise,
        )

    def _set_tlc(self, window: int | None) -> None:
        levels = [*self.encoders, self.middle_blks]
        for level, level_blocks in enumerate(levels):
            for module in level_blocks.modules():
                if isinstance(module, ChannelPool):
                    module.window = None if window is None else max(window // 2**level, 1)

    @property
    def draws_noise(self) -> bool:
        """Whether the encoder draws random numbers (UFPNet's kernel noise)."""
        return self.kind == "ufpnet" and self.kernel_noise

    def forward(self, image: torch.Tensor, seeds: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Features of (B, 3, H, W) images; `seeds`: one per image for the kernel noise (`kernel_map`)."""
        kernel = None
        if self.kind == "ufpnet":
            kernel = kernel_map(self.kernel_extra, self.flow, image, noise=self.kernel_noise, seeds=seeds)
        x = self.intro(image)
        feats: list[torch.Tensor] = []
        for level, (level_blocks, down) in enumerate(zip(self.encoders, self.downs, strict=True)):
            for block in level_blocks:
                x = block(x, kernel) if isinstance(block, KernelNAFBlock) else block(x)
            if kernel is not None and level < 2:
                kernel = self.kernel_down[level](kernel)
            feats.append(x)
            x = down(x)
        feats.append(self.middle_blks[0](x))
        return feats
