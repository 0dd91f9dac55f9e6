"""Exit-table calibration (beyond the paper, whose table is set by hand).

`patch_errors` measures, for every patch of a frame, the class the classifier gives it and the mean
squared error of the patch after 0..N columns. `propose_table` then picks, per class, how many
columns to run (0: the patch is left as it is) so that the frames' PSNR (from the mean of their
patches' errors) loses at most a budget on average against the best table, at the least decoder work:
an exact search over every table, (N+1)^K candidates, cheap for the paper's N <= 8 and K = 6.
Do no harm first: a depth at which a class's patches come out worse on average than they went in is
never chosen for that class.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adarevd import tiling
from adarevd.metrics import PSNR_CAP_DB, psnr_of_mse
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
    psnr_loss_db: float  # mean frame PSNR lost against the best table (of those that harm no class)
    mean_depth: float
    budget_db: float


def with_exit_table(model: AdaRevD, exit_table: Sequence[int]) -> AdaRevD:
    """A copy of `model` (same weights, on the CPU) whose config has `exit_table`."""
    out = AdaRevD(model.config.with_overrides(exit_table=list(exit_table)))
    out.load_state_dict(model.state_dict())
    return out


def _db(mse: np.ndarray) -> np.ndarray:
    # Capped at 50 dB (RMSE 0.8 levels): closer than that to the truth no one sees a difference, and an
    # untouched sharp frame (MSE 0) must not outweigh every other frame.
    return np.minimum(psnr_of_mse(mse), PSNR_CAP_DB)


def propose_table(frames: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int, budget_db: float) -> Calibration:
    """The exit table with the least mean depth whose mean frame PSNR is within budget_db of the best
    table's, from each frame's (classes, MSE) of `patch_errors`. A class's depth must not lower its
    patches' mean PSNR below the input's (depth 0 always qualifies). A class no patch fell into gets
    depth 0: nothing shows that columns help it."""
    n = frames[0][1].shape[1] - 1
    classes = np.concatenate([c for c, _ in frames])
    errors = np.concatenate([e for _, e in frames])
    counts = np.bincount(classes, minlength=num_classes)
    db = _db(errors)
    gains = [
        db[classes == c].mean(axis=0) - db[classes == c, 0].mean() if counts[c] else None for c in range(num_classes)
    ]
    # sums[f, c, d]: summed MSE of frame f's class-c patches exiting at d; a frame's MSE is their mean.
    sums = np.zeros((len(frames), num_classes, n + 1))
    for f, (c, e) in enumerate(frames):
        np.add.at(sums[f], c, e)
    sizes = np.array([len(c) for c, _ in frames], dtype=np.float64)
    options = [
        [d for d in range(n + 1) if d == 0 or gain[d] >= 0] if (gain := gains[c]) is not None else [0]
        for c in range(num_classes)
    ]
    index = np.arange(num_classes)
    tables = list(itertools.product(*options))
    scores = np.array([_db(sums[:, index, table].sum(axis=1) / sizes).mean() for table in tables])
    depths = np.array([np.dot(counts, table) for table in tables]) / max(int(counts.sum()), 1)
    lost = scores.max() - scores
    fits = np.flatnonzero(lost <= budget_db + 1e-12)  # the best table always fits
    best = fits[np.lexsort((lost[fits], depths[fits]))[0]]  # least depth, then least loss
    return Calibration(
        tuple(int(d) for d in tables[best]),
        tuple(int(c) for c in counts),
        tuple(tuple(round(float(g), 3) for g in gain[1:]) if gain is not None else () for gain in gains),
        round(float(lost[best]), 4),
        round(float(depths[best]), 4),
        budget_db,
    )
