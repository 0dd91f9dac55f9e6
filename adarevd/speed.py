"""The fast inference path: the model's parts through `torch.compile`, decided by the work ahead.

On this project's CPU a compiled AdaRevD with channels-last weights restores a 720p frame about 1.8x
faster than eager (the tiny preset, and adarevd-b at width 16; outputs within 5e-7). Compiling costs
about a minute of CPU per process first, so it pays only on long runs: `worth_compiling` says yes from
`COMPILE_MIN_PIXELS` pixels on.
Patches reach the columns, heads and classifier in batches of any size: those compile once with a
dynamic batch. The encoder sees whole frames: it compiles once per frame size (a run has few).
A machine where compiling fails (no C++ compiler) runs eager: `suppress_errors` falls back per graph.

Precision: `auto` runs bf16 autocast on CUDA devices with bf16 tensor cores (compute capability 8.0
and up: A100, H100, RTX 30xx and later), fp32 elsewhere. On CPU fp32 stays the default: its outputs
match the reference code to 1e-7, and the compiled fp32 path already reaches the speed goal there.
The classifier runs in fp32 under either (`AdaRevD.classify`).
"""

from __future__ import annotations

from typing import Literal

import torch

from adarevd.model import AdaRevD
from adarevd.modes import Compile, Precision

# About 200 frames of 720p (or 2,600 of 320x240): at the measured 1.8x, one process's eager time for
# them is a few times its compile time.
COMPILE_MIN_PIXELS = 200_000_000


def worth_compiling(setting: Compile, pixels: int) -> bool:
    """`on`, `off`, or for `auto`: whether `pixels` of work repay the compile time."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"compile must be 'auto', 'on' or 'off', got {setting!r}")
    return setting == "on" or (setting == "auto" and pixels >= COMPILE_MIN_PIXELS)


# The first CUDA compute capability with bf16 tensor cores (Ampere). Older cards emulate bf16 slowly.
BF16_CAPABILITY = (8, 0)


def precision_for(setting: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """`fp32` or `bf16` as given; for `auto`, bf16 on a CUDA device with bf16 tensor cores, else fp32."""
    if setting not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {setting!r}")
    if setting != "auto":
        return setting
    native = device.type == "cuda" and torch.cuda.get_device_capability(device) >= BF16_CAPABILITY
    return "bf16" if native else "fp32"


def autocast_dtype(precision: Literal["fp32", "bf16"]) -> torch.dtype | None:
    """The dtype `AdaRevD.restore` runs under for a decided precision (None: full precision)."""
    return torch.bfloat16 if precision == "bf16" else None


def compile_for_inference(model: AdaRevD) -> AdaRevD:
    """Compile the model's parts in place (lazily: the first call of each shape compiles); returns it."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # no compiler here: eager, not an error
    model.to(memory_format=torch.channels_last)  # measured: 1.77x with it, 1.60x without (720p, adarevd-b)
    model.encoder.compile()
    for module in (*model.subdenets, *model.outputs, model.ape):
        module.compile(dynamic=True)
    return model
