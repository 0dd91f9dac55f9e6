"""The exit classifier: reads a patch's e3 (or e4) features and picks how many columns it runs.

Keys follow the authors' checkpoints: with e3, `ape.0` (2x2 stride-2 conv 8w->16w), `ape.1` (NAFBlock),
`ape.2` (head); with e4, `ape.0` (NAFBlock) and `ape.1` (head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from adarevd.blocks import NAFBlock
from adarevd.metrics import psnr
from adarevd.modes import ClassifierInput


class ClassifierHead(nn.Module):
    """Global pool -> LayerNorm -> Linear C->C/2 -> GELU -> Linear -> logits * alpha (init 1/sqrt(K))."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.LayerNorm(channels, eps=1e-6),
            nn.Linear(channels, channels // 2),
            nn.GELU(),
            nn.Linear(channels // 2, num_classes),
        )
        self.alpha = nn.Parameter(torch.full((1, num_classes), 1 / math.sqrt(num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.mean(dim=(-2, -1))) * self.alpha


def build_classifier(width: int, num_classes: int, source: ClassifierInput) -> nn.Sequential:
    """The `ape` module: (P, 8w, h, w) e3 patches or (P, 16w, h/2, w/2) e4 patches -> (P, K) logits."""
    c = 16 * width
    if source == "e3":
        return nn.Sequential(nn.Conv2d(8 * width, c, 2, stride=2), NAFBlock(c), ClassifierHead(c, num_classes))
    return nn.Sequential(NAFBlock(c), ClassifierHead(c, num_classes))


def psnr_bucket(values: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Class of each PSNR value: how many thresholds it strictly exceeds (0 = blurriest)."""
    limits = torch.tensor(list(thresholds), dtype=values.dtype, device=values.device)
    return (values[:, None] > limits[None, :]).sum(dim=1)


def psnr_classes(blurry: torch.Tensor, sharp: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Training label of each crop: the bucket of PSNR(blurry, sharp)."""
    return psnr_bucket(psnr(blurry, sharp), thresholds)


def exit_depths(logits: torch.Tensor, exit_table: Sequence[int], num_columns: int) -> torch.Tensor:
    """Columns each patch runs: exit_table[argmax class], capped at num_columns (0: zero residual)."""
    table = torch.tensor(list(exit_table), device=logits.device).clamp(0, num_columns)
    return table[logits.argmax(dim=1)]
