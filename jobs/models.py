"""Choosing a model for a command: a preset plus weights files, or the bundled tiny weights."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

import adarevd
from adarevd.errors import UserError

ASSETS = Path(adarevd.__file__).resolve().parent / "assets"
DEFAULT_WEIGHTS = ASSETS / "adarevd-tiny.safetensors"


class CliError(UserError):
    """A user-facing error: printed without a traceback, exit status 2."""


def load_model(preset: str, weights: Sequence[str], device: torch.device) -> tuple[adarevd.AdaRevD, str, list[str]]:
    """(model, a description of its weights, the weights files): the given files, else the bundled tiny
    weights. Loading is strict."""
    files, source = list(weights), ", ".join(weights)
    if not files:
        if preset != "adarevd-tiny":
            raise CliError(f"{preset} has no bundled weights: pass --weights (the authors' .pth files or .safetensors)")
        if not DEFAULT_WEIGHTS.exists():
            raise CliError(f"the bundled weights {DEFAULT_WEIGHTS} are missing; run `adarevd make-default-weights`")
        files, source = [str(DEFAULT_WEIGHTS)], f"bundled {DEFAULT_WEIGHTS.name}"
    first = Path(files[0])
    # Project files carry their config; the authors' .pth files fit the chosen preset.
    config = adarevd.read_config(first) if first.suffix == ".safetensors" else adarevd.PRESETS[preset]
    model = adarevd.AdaRevD(config)
    adarevd.load_weights(model, *files)
    return model.to(device).eval(), source, files


def exit_mode(text: str) -> str | int:
    if text == "adaptive" or text.isdigit():
        return text if text == "adaptive" else int(text)
    raise argparse.ArgumentTypeError(f"expected 'adaptive' or a number of columns, got {text!r}")
