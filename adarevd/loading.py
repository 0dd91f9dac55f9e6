"""A model from weights files: a preset plus the authors' .pth files, a project .safetensors (which
carries its config), or the bundled tiny weights. Shared by the command line and the library's
stages (the Ray Data stage)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from adarevd.config import PRESETS, AdaRevDConfig
from adarevd.errors import InvalidInput, NotFound
from adarevd.model import AdaRevD
from adarevd.weights import load_weights, read_config

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_WEIGHTS = ASSETS / "adarevd-tiny.safetensors"
# Fields a weights file may set apart from its preset: they pick exits, not shapes.
ROUTING_FIELDS = ("exit_table", "psnr_thresholds")


def load_model(
    preset: str | None, weights: Sequence[str], device: torch.device | str = "cpu"
) -> tuple[AdaRevD, str, list[str]]:
    """(model, a description of its weights, the weights files): the given files, else the bundled tiny
    weights. Loading is strict. A .safetensors file carries its config; a `preset` named beside one
    must be the same model."""
    files, source = list(weights), ", ".join(weights)
    if not files:
        preset = preset or "adarevd-tiny"
        if preset != "adarevd-tiny":
            raise InvalidInput(
                f"{preset} has no bundled weights: pass --weights (the authors' .pth files or .safetensors)"
            )
        if not DEFAULT_WEIGHTS.exists():
            raise NotFound(f"the bundled weights {DEFAULT_WEIGHTS} are missing; run `adarevd make-default-weights`")
        files, source = [str(DEFAULT_WEIGHTS)], f"bundled {DEFAULT_WEIGHTS.name}"
    first = Path(files[0])
    # Project files carry their config; the authors' .pth files fit the chosen preset.
    if first.suffix == ".safetensors":
        config = read_config(first)
        if preset is not None:
            _check_preset(preset, config, first)
    else:
        config = PRESETS[preset or "adarevd-tiny"]
    model = AdaRevD(config)
    load_weights(model, *files)
    return model.to(device).eval(), source, files


def _check_preset(preset: str, config: AdaRevDConfig, path: Path) -> None:
    """Refuse a --model whose shapes differ from the model a weights file holds."""
    wanted = PRESETS[preset]
    other = [
        f"{f.name} {getattr(config, f.name)!r} (--model: {getattr(wanted, f.name)!r})"
        for f in dataclasses.fields(wanted)
        if f.name not in ROUTING_FIELDS and getattr(config, f.name) != getattr(wanted, f.name)
    ]
    if other:
        raise InvalidInput(
            f"{path} holds another model than --model {preset}: {'; '.join(other[:4])}. Leave --model out (the "
            "file says which model it is), or give weights made for that preset"
        )
