"""Choosing a model for a command: a preset plus weights files, or the bundled tiny weights."""

from __future__ import annotations

import argparse

import torch

from adarevd.errors import UserError
from adarevd.loading import ASSETS, DEFAULT_WEIGHTS, load_model
from adarevd.model import AdaRevD
from pipeline.store.storage import parse_storage_options, redact
from pipeline.store.weights_cache import local_weights

__all__ = [
    "ASSETS",
    "DEFAULT_WEIGHTS",
    "CliError",
    "add_blend_option",
    "add_precision_option",
    "add_weights_option",
    "exit_mode",
    "load_model",
    "model_from",
]


class CliError(UserError):
    """A user-facing error: printed without a traceback, exit status 2."""


def add_weights_option(parser: argparse.ArgumentParser, default: str) -> None:
    """`--weights FILE`, once per file (the authors' model and classifier: twice). One value an option,
    so it never takes the positional arguments that follow it."""
    parser.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="FILE",
        help="a weights file (.safetensors, or the authors' .pth), a path or any fsspec URL, optionally "
        f"URL#sha256=HEX (cached, verified); repeat for their classifier (default: {default})",
    )


def model_from(args: argparse.Namespace, device: torch.device) -> tuple[AdaRevD, str, list[str]]:
    """The model of a command's --model and --weights: files, or URLs fetched with its --storage-option
    (`pipeline.store.weights_cache`). Returns (model, what the weights are, the local files)."""
    files = local_weights(args.weights, parse_storage_options(getattr(args, "storage_option", [])))
    model, source, files = load_model(args.model, files, device)
    return model, ", ".join(redact(w) for w in args.weights) or source, files


def add_blend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--blend",
        default="normalised",
        choices=["normalised", "reference"],
        help="overlapping patches: normalised (default: a weighted mean) or reference (the authors' code's "
        "weights, to match published numbers; they differ where the last patch nearly meets the one before)",
    )


def add_compile_option(parser: argparse.ArgumentParser, auto: str) -> None:
    """--compile auto|on|off (`adarevd.speed`); `auto`: when auto compiles, for this command."""
    parser.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help=f"torch.compile the model: about 1.8x faster on CPU after a minute of compiling per process; "
        f"auto (default): on {auto}",
    )


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    """--precision auto|fp32|bf16 (`adarevd.speed.precision_for`)."""
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto (default): bf16 autocast on CUDA GPUs with bf16 tensor cores (compute capability 8.0+), "
        "fp32 elsewhere; fp32; or bf16 (the exit depths are chosen in fp32 either way)",
    )


def exit_mode(text: str) -> str | int:
    if text == "adaptive" or text.isdigit():
        return text if text == "adaptive" else int(text)
    raise argparse.ArgumentTypeError(f"expected 'adaptive' or a number of columns, got {text!r}")
