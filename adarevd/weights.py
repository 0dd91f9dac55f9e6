"""Weights I/O: the authors' `.pth` files (read without executing code) and the project's safetensors.

Accepted layouts: BasicSR dicts `{"params": ..., "params_ema": ...}`, `{"state_dict": ...}`, bare state
dicts, any of them with DDP's `module.` prefix; the classifier released alone (`ape.*` keys only) is
loaded next to the main file. Several files merge in order, a later file overriding an earlier one.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from adarevd.config import AdaRevDConfig
from adarevd.errors import InvalidInput

CONFIG_KEY = "adarevd.config"
FORMAT_KEY = "adarevd.format"
FORMAT = "adarevd-weights/1"


class WeightsError(InvalidInput):
    """A weights file that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class LoadReport:
    """What a load did: keys loaded, and (non-strict only) what did not fit."""

    files: tuple[str, ...]
    loaded: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()  # "key: file shape vs model shape"
    overridden: tuple[str, ...] = field(default=())  # keys a later file replaced


def read_state_dict(path: str | Path, *, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one weights file. Pickles are read with `weights_only=True`, so a file
    that would run code is refused."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a folder, not a weights file; give the .safetensors or .pth file in it")
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return safetensors.torch.load_file(str(path)), metadata
        except (safetensors.SafetensorError, OSError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    with path.open("rb") as f:
        head = f.read(4)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # torch's zip format, or a legacy pickle
        raise WeightsError(
            f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle) nor a .safetensors file; "
            "give the weights file itself"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refused; it is not a plain tensor checkpoint and loading it would run code. "
            f"Convert it to safetensors on a trusted machine. ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # an untrusted file: torch's reader fails on garbage in many ways (KeyError, ...)
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    return _unwrap(obj, path, use_ema), {}


def _unwrap(obj: object, path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        wanted = ("params_ema", "params") if use_ema else ("params", "params_ema")
        for key in (*wanted, "state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key.removeprefix("module.")] = value
    return out


def load_weights(model: nn.Module, *paths: str | Path, strict: bool = True, use_ema: bool = False) -> LoadReport:
    """Load one or more weights files into `model`.

    strict: every model key must be set and every file key used, with matching shapes; otherwise a
    WeightsError names the missing, unexpected and mis-shaped keys. Non-strict loads what fits and
    reports the rest. use_ema: prefer BasicSR's `params_ema` over `params`.
    """
    if not paths:
        raise WeightsError("load_weights needs at least one file")
    merged: dict[str, torch.Tensor] = {}
    overridden: list[str] = []
    for path in paths:
        tensors, _ = read_state_dict(path, use_ema=use_ema)
        overridden += [k for k in tensors if k in merged]
        merged.update(tensors)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(merged))
    unexpected = sorted(set(merged) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(merged[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(merged) & set(expected)
        if merged[k].shape != expected[k].shape
    )
    files = tuple(str(p) for p in paths)
    if strict and (missing or unexpected or mismatched):
        raise WeightsError(_mismatch_message(files, missing, unexpected, mismatched))
    fitting = {k: v for k, v in merged.items() if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(fitting, strict=False)
    return LoadReport(files, len(fitting), tuple(missing), tuple(unexpected), tuple(mismatched), tuple(overridden))


def _mismatch_message(files: tuple[str, ...], missing: list[str], unexpected: list[str], bad: list[str]) -> str:
    def listing(title: str, keys: list[str]) -> str:
        shown = "\n    ".join(keys[:12]) + (f"\n    ... and {len(keys) - 12} more" if len(keys) > 12 else "")
        return f"\n  {len(keys)} {title}:\n    {shown}" if keys else ""

    hint = ""
    if missing and all(k.startswith("ape.") for k in missing):
        hint = "\n  Only the classifier (ape.*) is missing: the authors release it as a separate file; pass it too."
    return (
        f"weights {', '.join(files)} do not fit the model"
        + hint
        + listing("missing keys (in the model, not in the files)", missing)
        + listing("unexpected keys (in the files, not in the model)", unexpected)
        + listing("keys with the wrong shape", bad)
        + "\n  Check the preset and overrides (width, encoder, num_columns, num_classes, classifier_input), "
        "or pass strict=False to load what fits."
    )


def save_weights(model: nn.Module, path: str | Path, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write the model's state dict as safetensors, with its config and `metadata` in the header."""
    meta = {FORMAT_KEY: FORMAT, **(metadata or {})}
    config = getattr(model, "config", None)
    if isinstance(config, AdaRevDConfig):
        meta[CONFIG_KEY] = config.to_json()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def read_config(path: str | Path) -> AdaRevDConfig:
    """The model config stored in a project safetensors file."""
    _, metadata = read_state_dict(path)
    if CONFIG_KEY not in metadata:
        raise WeightsError(f"{path}: no {CONFIG_KEY} in its metadata; build the model by preset and load_weights")
    return AdaRevDConfig.from_json(metadata[CONFIG_KEY])


def fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict's names, shapes, dtypes and bytes: identifies the weights in manifests."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().contiguous().cpu()
        digest.update(json.dumps([key, list(t.shape), str(t.dtype)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
