"""A training stage's full state as plain bytes: safetensors for tensors, JSON for the rest. No pickle.

A checkpoint is four members: `model.safetensors` (the module being trained), `ema.safetensors` (its
EMA copy), `optimizer.safetensors` (AdamW moments and step counts) and `state.json` (step, optimiser
hyper-parameters, the schedule, the torch CPU RNG, the CUDA RNG of the model's card when it trains on
one (UFPNet's kernel noise draws there), and whatever the caller adds). Loading them into a
freshly built `Stage` continues the run exactly where it stopped.
"""

from __future__ import annotations

import json
from typing import Any

import safetensors.torch
import torch

from adarevd.errors import InvalidInput
from adarevd.training import Stage

MEMBERS = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")


class TrainStateError(InvalidInput):
    """A checkpoint that does not fit the stage being resumed."""


def stage_state(stage: Stage, step: int, extra: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The members of a checkpoint of `stage` after `step` steps."""
    optimizer = stage.optimizer.state_dict()
    moments = {
        f"{index}.{name}": value.detach().contiguous().cpu()
        for index, entries in optimizer["state"].items()
        for name, value in entries.items()
    }
    state = {
        "step": step,
        "param_groups": optimizer["param_groups"],
        "schedule": stage.schedule.state_dict(),
        "torch_rng": torch.get_rng_state().tolist(),
        "extra": extra or {},
    }
    if (device := _device(stage)).type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device).tolist()
    return {
        "model.safetensors": _tensors(stage.model.state_dict()),
        "ema.safetensors": _tensors(stage.ema.state_dict()),
        "optimizer.safetensors": _tensors(moments),
        "state.json": json.dumps(state, sort_keys=True).encode(),
    }


def load_stage_state(stage: Stage, members: dict[str, bytes]) -> dict[str, Any]:
    """Put a checkpoint back into `stage` (built the same way as the one saved); returns state.json."""
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise TrainStateError(f"checkpoint lacks {missing}")
    state = json.loads(members["state.json"])
    try:
        stage.model.load_state_dict(safetensors.torch.load(members["model.safetensors"]))
        stage.ema.load_state_dict(safetensors.torch.load(members["ema.safetensors"]))
        entries: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in safetensors.torch.load(members["optimizer.safetensors"]).items():
            index, name = key.split(".", 1)
            entries.setdefault(int(index), {})[name] = value
        stage.optimizer.load_state_dict({"state": entries, "param_groups": state["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as e:
        raise TrainStateError(f"checkpoint does not fit this model or stage: {e}") from e
    stage.schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    # A run resumed on another kind of device draws other numbers anyway: its CUDA state has no use.
    if "cuda_rng" in state and (device := _device(stage)).type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda_rng"], dtype=torch.uint8), device)
    return state


def _device(stage: Stage) -> torch.device:
    return next(stage.model.parameters()).device


def _tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()})
