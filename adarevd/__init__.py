"""AdaRevD: adaptive patch-exiting reversible decoder for image deblurring (Mao, Li, Wang, CVPR 2024).

import adarevd
model = adarevd.build("adarevd-b")
adarevd.load_weights(model, "AdaRevD-B-GoPro.pth", "AdaRevD-B-GoPro-classifier.pth")
out = model.restore(images)          # out.images (B, 3, H, W), out.depths (B, rows, cols)

The names below load on first use: `adarevd.config` and `adarevd.modes` are torch-free, and importing
them (job configs, shard workers) must not load torch.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adarevd.errors import InvalidInput

if TYPE_CHECKING:
    from adarevd.config import PRESETS, AdaRevDConfig
    from adarevd.model import AdaRevD, Restored
    from adarevd.weights import LoadReport, WeightsError, fingerprint, load_weights, read_config, save_weights

_MODULE_OF = {
    "PRESETS": "adarevd.config",
    "AdaRevDConfig": "adarevd.config",
    "AdaRevD": "adarevd.model",
    "Restored": "adarevd.model",
    "LoadReport": "adarevd.weights",
    "WeightsError": "adarevd.weights",
    "fingerprint": "adarevd.weights",
    "load_weights": "adarevd.weights",
    "read_config": "adarevd.weights",
    "save_weights": "adarevd.weights",
}
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


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'adarevd' has no attribute {name!r}")


def build(name: str, *, weights: Sequence[str | os.PathLike[str]] = (), **overrides: Any) -> AdaRevD:
    """Build a preset (`adarevd-s`, `-b`, `-l`, `-tiny`) with optional config field overrides, and load
    `weights` (local files: the authors' .pth files or this project's .safetensors) strictly. Weights
    at a URL (s3://, gs://, https://, ... with `#sha256=`): `pipeline.load_model`."""
    from adarevd.config import PRESETS
    from adarevd.model import AdaRevD
    from adarevd.weights import load_weights

    if name not in PRESETS:
        raise InvalidInput(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if urls := [str(w) for w in weights if "://" in str(w)]:
        raise InvalidInput(f"{urls[0]}: adarevd.build reads local files; pipeline.load_model fetches URLs")
    model = AdaRevD(PRESETS[name].with_overrides(**overrides))
    if weights:
        load_weights(model, *weights)
    return model
