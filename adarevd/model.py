"""AdaRevD: frozen encoder -> scaled features -> reversible columns with per-column heads -> residual,
with a classifier that lets each patch exit after fewer columns.

`restore` is built from the step-wise API the distributed pipeline uses on its own:
`pad` -> `encode` -> `grid` + `cut` -> `classify` + `exit_depths` -> `initial_state` -> `run_column` /
`head` (or `decode` for all depths at once) -> `stitch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adarevd import classifier, tiling
from adarevd.config import AdaRevDConfig
from adarevd.encoders import Encoder
from adarevd.kernel_prior import content_seeds, patch_seeds
from adarevd.modes import Blend, EncoderMode, ExitMode
from adarevd.reversible import Column, State, run_columns
from adarevd.tiling import PatchGrid


@dataclass(frozen=True)
class Restored:
    """Restored images (B, 3, H, W) in [0, 1] and each patch's exit depth (B, rows, cols)."""

    images: torch.Tensor
    depths: torch.Tensor
    grid: PatchGrid


class AdaRevD(nn.Module):
    """The AdaRevD model. Parameter names are those of the authors' checkpoints."""

    def __init__(self, config: AdaRevDConfig) -> None:
        super().__init__()
        self.config = config
        w, n = config.width, config.num_columns
        self.encoder = Encoder.from_config(config)
        self.encoder.requires_grad_(False)
        self.conv_features = nn.ParameterList([nn.Parameter(torch.ones(1, w * 2**level, 1, 1)) for level in range(5)])
        self.subdenets = nn.ModuleList([Column(w) for _ in range(n)])
        self.outputs = nn.ModuleList([nn.Sequential(nn.Conv2d(w, 3, 3, padding=1)) for _ in range(n)])
        for head in self.outputs:  # zero residual: an untrained model is the identity (checkpoints set them)
            nn.init.zeros_(head[0].weight)
            nn.init.zeros_(head[0].bias)
        self.ape = classifier.build_classifier(w, config.num_classes, config.classifier_input)
        self.encoder.eval()

    @property
    def num_columns(self) -> int:
        return self.config.num_columns

    def train(self, mode: bool = True) -> AdaRevD:
        super().train(mode)
        self.encoder.eval()  # always frozen
        return self

    # ---- step-wise API -------------------------------------------------------------------------

    @staticmethod
    def pad(images: torch.Tensor) -> torch.Tensor:
        """Reflect-pad bottom/right to a multiple of 16 (replicate where a side is too short to reflect)."""
        h, w = images.shape[-2:]
        ph, pw = -h % 16, -w % 16
        if ph == 0 and pw == 0:
            return images
        mode = "reflect" if ph < h and pw < w else "replicate"
        return F.pad(images, (0, pw, 0, ph), mode=mode)

    def encode(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Padded images (B, 3, H, W) -> scaled features [e0 (w, H), ..., e4 (16w, H/16)]. `seeds`: one
        per image for UFPNet's kernel noise; without, it draws from torch's default generator."""
        with torch.no_grad():
            feats = self.encoder(images, seeds)
        return [f * k for f, k in zip(feats, self.conv_features, strict=True)]

    def grid(self, height: int, width: int) -> PatchGrid:
        """The patch grid over a padded frame of this size."""
        return PatchGrid.build(height, width, self.config.patch_size, self.config.overlap)

    @staticmethod
    def cut(features: list[torch.Tensor], grid: PatchGrid) -> list[torch.Tensor]:
        """Cut every feature level with the same grid: (B, C, h, w) -> (B * patches, C, k, k) each."""
        return [tiling.cut(f, grid, level) for level, f in enumerate(features)]

    def classify(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Patch features -> class logits (P, K), in fp32 even under autocast: the classifier is a small
        part of the work, and a patch's exit depth should not move with the columns' precision."""
        x = features[3] if self.config.classifier_input == "e3" else features[4]
        with torch.autocast(x.device.type, enabled=False):
            return self.ape(x.float())

    def exit_depths(self, logits: torch.Tensor) -> torch.Tensor:
        """Class logits -> number of columns each patch runs (0..N)."""
        return classifier.exit_depths(logits, self.config.exit_table, self.num_columns)

    @staticmethod
    def initial_state(features: list[torch.Tensor]) -> tuple[torch.Tensor, State]:
        """(x, state) entering column 1: x = e4, state = (e3, e2, e1, e0), coarse to fine."""
        return features[4], (features[3], features[2], features[1], features[0])

    def run_column(self, index: int, x: torch.Tensor, state: State) -> State:
        """Column `index` (0-based) on a batch of states."""
        return self.subdenets[index](x, state)

    def head(self, index: int, state: State) -> torch.Tensor:
        """Residual (P, 3, k, k) of column `index` (0-based) from its output state."""
        return self.outputs[index](state[-1])

    def decode(self, x: torch.Tensor, state: State, depths: torch.Tensor) -> torch.Tensor:
        """Residuals (P, 3, k, k) of patches exiting at `depths` (P,): each patch runs columns 1..d and
        takes head d; depth 0 is a zero residual. Patches are sorted by depth, deepest first, so the
        patches still running after column j are a prefix: each column runs once, on one batch."""
        order = torch.argsort(depths, descending=True, stable=True)
        sorted_depths = depths[order]
        x, state = x[order], tuple(t[order] for t in state)
        residual = torch.zeros(x.shape[0], 3, *state[-1].shape[-2:], device=x.device)
        for j in range(int(sorted_depths.max().item()) if len(depths) else 0):
            active = int((sorted_depths > j).sum().item())
            x, state = x[:active], tuple(t[:active] for t in state)
            state = self.run_column(j, x, state)
            leaving = int((sorted_depths > j + 1).sum().item())
            if leaving < active:
                residual[leaving:active] = self.head(j, tuple(t[leaving:active] for t in state)).to(residual.dtype)
        return residual[torch.argsort(order)]

    @staticmethod
    def stitch(residuals: torch.Tensor, grid: PatchGrid, blend: Blend = "normalised") -> torch.Tensor:
        """Blend (B * patches, 3, k, k) residual patches into (B, 3, H, W) (`tiling.stitch`)."""
        return tiling.stitch(residuals, grid, blend)

    # ---- whole-image inference and training forward ----------------------------------------------

    @torch.no_grad()
    def restore(
        self,
        images: torch.Tensor,
        *,
        exit: ExitMode = "adaptive",
        encoder_mode: EncoderMode = "frame",
        autocast_dtype: torch.dtype | None = None,
        encoder_batch: int = 8,
        blend: Blend = "normalised",
    ) -> Restored:
        """Deblur (B, 3, H, W) images in [0, 1].

        exit: "adaptive" (the classifier picks each patch's depth) or a fixed depth 0..N for every patch.
        encoder_mode: "frame" runs the encoder on the whole frame with TLC (the paper's inference);
        "patch" runs it per image patch (`encoder_batch` at a time), for frames too large for a
        whole-frame encoder.
        autocast_dtype: e.g. torch.bfloat16 to run under autocast; None is full precision.
        blend: how overlapping patches are blended: "normalised" (a weighted mean) or "reference" (the
        reference code's weights, to match published numbers; `adarevd.tiling`).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"restore expects (B, 3, H, W) images, got shape {tuple(images.shape)}")
        if exit != "adaptive" and not (isinstance(exit, int) and 0 <= exit <= self.num_columns):
            raise ValueError(f"exit must be 'adaptive' or a depth 0..{self.num_columns}, got {exit!r}")
        if encoder_mode not in ("frame", "patch"):
            raise ValueError(f"encoder_mode must be 'frame' or 'patch', got {encoder_mode!r}")
        h, w = images.shape[-2:]
        padded = self.pad(images)
        grid = self.grid(*padded.shape[-2:])
        with torch.autocast(
            images.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        ):
            patches = self.encode_patches(padded, grid, encoder_mode, encoder_batch)
            depths = self.choose_depths(patches, exit)
            residuals = self.decode(*self.initial_state(patches), depths)
        restored = (self.stitch(residuals.float(), grid, blend)[..., :h, :w] + images).clamp(0, 1)
        return Restored(restored, depths.reshape(images.shape[0], *grid.shape), grid)

    def encode_patches(
        self, padded: torch.Tensor, grid: tiling.PatchGrid, mode: EncoderMode = "frame", batch: int = 8
    ) -> list[torch.Tensor]:
        """Each patch's encoder features, per level: the whole frame encoded, then cut ("frame"), or each
        patch of the image encoded apart, `batch` at a time ("patch": memory bounded by the patch).
        UFPNet's kernel noise is seeded by each frame's values (and each patch's place in patch mode):
        a frame comes out the same in any batch, run, worker or order."""
        seeds = content_seeds(padded) if self.encoder.draws_noise else None
        if mode == "frame":
            return self.cut(self.encode(padded, seeds), grid)
        patches = tiling.cut(padded, grid)
        per_patch = patch_seeds(seeds, len(patches) // len(padded)) if seeds is not None else None
        chunks = [
            self.encode(chunk, per_patch[i : i + batch] if per_patch is not None else None)
            for i, chunk in zip(range(0, len(patches), batch), patches.split(batch), strict=True)
        ]
        return [torch.cat(level) for level in zip(*chunks, strict=True)]

    def choose_depths(self, patches: list[torch.Tensor], exit: ExitMode = "adaptive") -> torch.Tensor:
        """Each patch's exit depth: the classifier's pick ("adaptive") or `exit` for all."""
        if exit == "adaptive":
            return self.exit_depths(self.classify(patches))
        return torch.full((patches[0].shape[0],), int(exit), dtype=torch.long, device=patches[0].device)

    def forward(self, images: torch.Tensor, *, reversible: bool = True) -> list[torch.Tensor]:
        """Training forward on (B, 3, H, W) crops: the restored image of every column, in order.
        `reversible` selects the memory-saving backward (same weights, same gradients)."""
        h, w = images.shape[-2:]
        padded = self.pad(images)
        x, state = self.initial_state(self.encode(padded))
        residuals = run_columns(self.subdenets, self.outputs, x, state, reversible=reversible)
        return [r[..., :h, :w] + images for r in residuals]
