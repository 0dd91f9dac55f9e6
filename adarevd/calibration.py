"""Exit-table calibration (beyond the paper, whose table is set by hand).

`patch_errors` measures, for every patch of a frame, the class the classifier gives it and the mean
squared error of the patch after 0..N columns. `propose_table` then picks, per class, how many
columns to run so that the frames' PSNR (from the mean of their patches' errors) loses at most a
budget on average against full depth, at the least decoder work: an exact search over every table,
(N+1)^K candidates, cheap for the paper's N <= 8 and K = 6.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adarevd import tiling
from adarevd.model import AdaRevD


@torch.no_grad()
def patch_errors(model: AdaRevD, blurry: torch.Tensor, sharp: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """For (1, 3, H, W) frames in [0, 1]: (classes (P,), MSE (P, N+1) after 0..N columns) of each patch,
    run as `restore` runs it (whole-frame encoder, patches cut from the features)."""
    model.eval()
    padded, truth = model.pad(blurry), model.pad(sharp)
    grid = model.grid(*padded.shape[-2:])
    features = model.cut(model.encode(padded), grid)
    classes = model.classify(features).argmax(dim=1)
    inputs, targets = tiling.cut(padded, grid), tiling.cut(truth, grid)

    def mse(images: torch.Tensor) -> torch.Tensor:
        return (images.clamp(0, 1) - targets).square().flatten(1).mean(dim=1)

    columns = [mse(inputs)]
    x, state = model.initial_state(features)
    for j in range(model.num_columns):
        state = model.run_column(j, x, state)
        columns.append(mse(inputs + model.head(j, state)))
    return classes.numpy(), torch.stack(columns, dim=1).double().numpy()


@dataclass(frozen=True)
class Calibration:
    exit_table: tuple[int, ...]
    patches_per_class: tuple[int, ...]
    gain_per_column: tuple[tuple[float, ...], ...]  # per class: PSNR of its patches after 1..N columns minus input
    psnr_loss_db: float  # mean frame PSNR lost against full depth with this table
    mean_depth: float
    budget_db: float


def with_exit_table(model: AdaRevD, exit_table: Sequence[int]) -> AdaRevD:
    """A copy of `model` (same weights, on the CPU) whose config has `exit_table`."""
    out = AdaRevD(model.config.with_overrides(exit_table=list(exit_table)))
    out.load_state_dict(model.state_dict())
    return out


def _db(mse: np.ndarray) -> np.ndarray:
    return -10 * np.log10(mse + 1e-10)


def propose_table(
    frames: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int, budget_db: float, current: Sequence[int]
) -> Calibration:
    """The exit table with the least mean depth whose mean frame PSNR loss vs full depth is <= budget_db,
    from each frame's (classes, MSE) of `patch_errors`. Classes no patch fell into keep their `current`
    depth."""
    n = frames[0][1].shape[1] - 1
    classes = np.concatenate([c for c, _ in frames])
    errors = np.concatenate([e for _, e in frames])
    counts = np.bincount(classes, minlength=num_classes)
    # sums[f, c, d]: summed MSE of frame f's class-c patches exiting at d; a frame's MSE is their mean.
    sums = np.zeros((len(frames), num_classes, n + 1))
    for f, (c, e) in enumerate(frames):
        np.add.at(sums[f], c, e)
    sizes = np.array([len(c) for c, _ in frames], dtype=np.float64)
    full = _db(sums[:, :, n].sum(axis=1) / sizes)
    options = [range(n + 1) if counts[c] else [min(current[c], n)] for c in range(num_classes)]
    index = np.arange(num_classes)
    best: tuple[float, float, tuple[int, ...]] | None = None
    for table in itertools.product(*options):
        lost = float((full - _db(sums[:, index, table].sum(axis=1) / sizes)).mean())
        depth = float(np.dot(counts, table)) / max(int(counts.sum()), 1)
        if lost <= budget_db + 1e-12 and (best is None or (depth, lost) < best[:2]):
            best = (depth, lost, table)
    assert best is not None  # full depth always qualifies: it loses nothing
    db = _db(errors)
    gains = tuple(
        tuple(round(float(db[classes == c, d].mean() - db[classes == c, 0].mean()), 3) for d in range(1, n + 1))
        if counts[c]
        else ()
        for c in range(num_classes)
    )
    return Calibration(
        tuple(int(d) for d in best[2]),
        tuple(int(c) for c in counts),
        gains,
        round(best[1], 4),
        round(best[0], 4),
        budget_db,
    )
