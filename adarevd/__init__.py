"""AdaRevD: adaptive patch-exiting reversible decoder for image deblurring (Mao, Li, Wang, CVPR 2024).

import adarevd
model = adarevd.build("adarevd-b")
adarevd.load_weights(model, "AdaRevD-B-GoPro.pth", "AdaRevD-B-GoPro-classifier.pth")
out = model.restore(images)          # out.images (B, 3, H, W), out.depths (B, rows, cols)
"""

from __future__ import annotations

from typing import Any

from adarevd.config import PRESETS, AdaRevDConfig
from adarevd.model import AdaRevD, Restored
from adarevd.weights import LoadReport, WeightsError, fingerprint, load_weights, read_config, save_weights

__all__ = [
    "PRESETS",
    "AdaRevD",
    "AdaRevDConfig",
    "LoadReport",
    "Restored",
    "WeightsError",
    "build",
    "fingerprint",
    "load_weights",
    "read_config",
    "save_weights",
]


def build(name: str, **overrides: Any) -> AdaRevD:
    """Build a preset (`adarevd-s`, `-b`, `-l`, `-tiny`) with optional config field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return AdaRevD(PRESETS[name].with_overrides(**overrides))
