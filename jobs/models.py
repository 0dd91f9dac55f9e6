"""Choosing a model for a command: a preset plus weights files, or the bundled tiny weights."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

import adarevd
from adarevd.errors import UserError

ASSETS = Path(adarevd.__file__).resolve().parent / "assets"
DEFAULT_WEIGHTS = ASSETS / "adarevd-tiny.safetensors"


class CliError(UserError):
    """A user-facing error: printed without a traceback, exit status 2."""


# Fields a weights file may set apart from its preset: they pick exits, not shapes.
ROUTING_FIELDS = ("exit_table", "psnr_thresholds")


def add_weights_option(parser: argparse.ArgumentParser, default: str) -> None:
    """`--weights FILE`, once per file (the authors' model and classifier: twice). One value an option,
    so it never takes the positional arguments that follow it."""
    parser.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="FILE",
        help=f"a weights file: .safetensors, or the authors' .pth; repeat for their classifier (default: {default})",
    )


def add_blend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--blend",
        default="normalised",
        choices=["normalised", "reference"],
        help="overlapping patches: normalised (default: a weighted mean) or reference (the authors' code's "
        "weights, to match published numbers; they differ where the last patch nearly meets the one before)",
    )


def load_model(
    preset: str | None, weights: Sequence[str], device: torch.device
) -> tuple[adarevd.AdaRevD, str, list[str]]:
    """(model, a description of its weights, the weights files): the given files, else the bundled tiny
    weights. Loading is strict. A .safetensors file carries its config; a `preset` named beside one
    must be the same model."""
    files, source = list(weights), ", ".join(weights)
    if not files:
        preset = preset or "adarevd-tiny"
        if preset != "adarevd-tiny":
            raise CliError(f"{preset} has no bundled weights: pass --weights (the authors' .pth files or .safetensors)")
        if not DEFAULT_WEIGHTS.exists():
            raise CliError(f"the bundled weights {DEFAULT_WEIGHTS} are missing; run `adarevd make-default-weights`")
        files, source = [str(DEFAULT_WEIGHTS)], f"bundled {DEFAULT_WEIGHTS.name}"
    first = Path(files[0])
    # Project files carry their config; the authors' .pth files fit the chosen preset.
    if first.suffix == ".safetensors":
        config = adarevd.read_config(first)
        if preset is not None:
            _check_preset(preset, config, first)
    else:
        config = adarevd.PRESETS[preset or "adarevd-tiny"]
    model = adarevd.AdaRevD(config)
    adarevd.load_weights(model, *files)
    return model.to(device).eval(), source, files


def _check_preset(preset: str, config: adarevd.AdaRevDConfig, path: Path) -> None:
    """Refuse a --model whose shapes differ from the model a weights file holds."""
    wanted = adarevd.PRESETS[preset]
    other = [
        f"{f.name} {getattr(config, f.name)!r} (--model: {getattr(wanted, f.name)!r})"
        for f in dataclasses.fields(wanted)
        if f.name not in ROUTING_FIELDS and getattr(config, f.name) != getattr(wanted, f.name)
    ]
    if other:
        raise CliError(
            f"{path} holds another model than --model {preset}: {'; '.join(other[:4])}. Leave --model out (the "
            "file says which model it is), or give weights made for that preset"
        )


def exit_mode(text: str) -> str | int:
    if text == "adaptive" or text.isdigit():
        return text if text == "adaptive" else int(text)
    raise argparse.ArgumentTypeError(f"expected 'adaptive' or a number of columns, got {text!r}")
