"""`adarevd eval` and `adarevd calibrate` over paired shards (every pair, in shard order).

Eval restores each blurry frame at full depth and adaptively, quantises to 8 bits as the deblur job
writes it, and reports PSNR (dB, capped at 80 for identical images) and SSIM (scikit-image, on the
RGB pixels) of the input, the full-depth output and the adaptive output, with mean depth and compute
saved, overall and by class (the PSNR bucket of the blurry frame, with the model's thresholds), and the
worst class's gain. Pairs whose blurry member equals the sharp one (identity pairs: footage that needs
nothing) are also summarised on their own under `sharp_in`: how close the output stays to its input
(mean and worst PSNR) and its tone shift (mean output minus input per RGB channel, in 8-bit levels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from adarevd import AdaRevD
from adarevd.calibration import Calibration, patch_errors, propose_table
from adarevd.classifier import psnr_bucket
from adarevd.errors import InvalidInput
from adarevd.metrics import psnr, ssim_uint8, tone_shift
from pipeline.formats.shards import iter_samples
from pipeline.store.storage import Store
from pipeline.train.pair_stream import decode_pair, paired_shards


def pairs(store: Store, limit: int | None = None) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, blurry, sharp) of every pair in the store's shards, (3, H, W) in [0, 1]."""
    count = 0
    for shard in paired_shards(store):
        with store.open(shard) as stream:
            for sample in iter_samples(stream, shard):
                if limit is not None and count >= limit:
                    return
                count += 1
                yield sample.key, *decode_pair(sample, shard)


def _quantised(image: torch.Tensor) -> torch.Tensor:
    return image.clamp(0, 1).mul(255).round().div(255)


def _ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    def pixels(t: torch.Tensor) -> np.ndarray:
        return t[0].mul(255).round().byte().permute(1, 2, 0).numpy()

    return ssim_uint8(pixels(a), pixels(b))


Frames = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (blurry, sharp), (3, H, W) in [0, 1]


def frames_of(store: Store, limit: int | None = None) -> Frames:
    return ((blurry, sharp) for _, blurry, sharp in pairs(store, limit))


@torch.no_grad()
def evaluate(model: AdaRevD, frames: Frames, *, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    model.eval()
    rows = []
    for blurry, sharp in frames:
        b, s = blurry[None], sharp[None]
        full = _quantised(model.restore(b, exit=model.num_columns).images)
        adaptive = model.restore(b)
        out = _quantised(adaptive.images)
        input_psnr = psnr(b, s)
        rows.append(
            {
                "class": int(psnr_bucket(input_psnr, model.config.psnr_thresholds)[0]),
                "identity": bool(torch.equal(blurry, sharp)),
                "shift": tone_shift(b[0].permute(1, 2, 0).numpy(), out[0].permute(1, 2, 0).numpy(), scale=255),
                "psnr_input": input_psnr.item(),
                "psnr_full_depth": psnr(full, s).item(),
                "psnr_output": psnr(out, s).item(),
                "ssim_input": _ssim(b, s),
                "ssim_full_depth": _ssim(full, s),
                "ssim_output": _ssim(out, s),
                "mean_depth": adaptive.depths.float().mean().item(),
            }
        )
        if progress:
            progress(1)
    if not rows:
        raise InvalidInput("no pairs to evaluate: the shards hold none")
    result = _summary(rows, model.num_columns)
    result["by_class"] = {
        str(c): _summary([r for r in rows if r["class"] == c], model.num_columns)
        for c in sorted({r["class"] for r in rows})
    }
    result["worst_class_gain_db"] = min(row["gain_db"] for row in result["by_class"].values())
    if identity := [r for r in rows if r["identity"]]:
        result["sharp_in"] = sharp_in_summary(identity)
    return result


def sharp_in_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How much the model changed frames that needed nothing (identity pairs)."""
    shifts = np.array([r["shift"] for r in rows])  # (frames, 3) in 8-bit levels
    return {
        "frames": len(rows),
        "psnr_mean": round(float(np.mean([r["psnr_output"] for r in rows])), 4),
        "psnr_worst": round(float(np.min([r["psnr_output"] for r in rows])), 4),
        "tone_shift": [round(float(v), 4) for v in shifts.mean(axis=0)],  # R, G, B
        "tone_shift_worst": round(float(np.abs(shifts).max()), 4),  # the largest |shift| of one frame's channel
    }


def _summary(rows: list[dict[str, Any]], num_columns: int) -> dict[str, Any]:
    def mean(name: str) -> float:
        return round(float(np.mean([r[name] for r in rows])), 4)

    names = ("psnr_input", "psnr_full_depth", "psnr_output", "ssim_input", "ssim_full_depth", "ssim_output")
    summary: dict[str, Any] = {"frames": len(rows)} | {name: mean(name) for name in names}
    summary["gain_db"] = round(summary["psnr_output"] - summary["psnr_input"], 4)
    summary["adaptive_vs_full_db"] = round(summary["psnr_output"] - summary["psnr_full_depth"], 4)
    summary["tone_shift"] = [round(float(v), 4) for v in np.mean([r["shift"] for r in rows], axis=0)]
    summary["mean_depth"] = mean("mean_depth")
    summary["compute_saved"] = round(1 - summary["mean_depth"] / num_columns, 4)
    return summary


@torch.no_grad()
def calibrate(
    model: AdaRevD, frames: Frames, budget_db: float, *, progress: Callable[[int], None] | None = None
) -> Calibration:
    """Measure every patch of the frames and propose the cheapest exit table within `budget_db`."""
    measured = []
    for blurry, sharp in frames:
        measured.append(patch_errors(model, blurry[None], sharp[None]))
        if progress:
            progress(1)
    if not measured:
        raise InvalidInput("no pairs to calibrate on: the shards hold none")
    return propose_table(measured, model.config.num_classes, budget_db)
