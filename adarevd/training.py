"""Training pieces of the recipe (ADAREVD.md section 7), single process and free of Ray and I/O.

- `EncoderPretrainer`: the encoder with a NAFNet-style decoder of its own, trained as a plain deblurrer
  for users without an authors' encoder checkpoint; its `encoder` then drops into AdaRevD.
- `deblur_loss`: L1 + 0.01 * L1 of the 2-D spectra (real and imaginary parts), averaged over columns.
- `psnr_loss`: minus each crop's PSNR (capped at 50 dB), averaged over crops and columns.
- `Stage`: one optimisation stage (AdamW, cosine to 1e-7, EMA, optional grad-norm clip) over the
  parameters that stage trains; `train_step` for the pretrainer and stage 1, `classifier_step` for
  stage 2 (cross-entropy on PSNR buckets of the blurry crop).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from adarevd.blocks import NAFBlock
from adarevd.classifier import psnr_classes
from adarevd.config import AdaRevDConfig
from adarevd.encoders import Encoder
from adarevd.metrics import PSNR_CAP_DB, mse, psnr
from adarevd.model import AdaRevD


def make_deterministic(device: torch.device | str) -> None:
    """On CUDA, pick deterministic kernels (cuDNN's, cuBLAS's and PyTorch's own; an op that has none
    warns), so a resumed run repeats the unbroken one bit for bit there too, as it does on the CPU.
    Process-wide; call it before the first CUDA work. A no-op on the CPU."""
    if torch.device(device).type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def deblur_loss(restored: Sequence[torch.Tensor], sharp: torch.Tensor, fft_weight: float = 0.01) -> torch.Tensor:
    """Mean over outputs of L1(out, sharp) + fft_weight * mean |rfft2(out) - rfft2(sharp)| (Re and Im)."""
    target = torch.fft.rfft2(sharp.float())
    losses = []
    for out in restored:
        diff = torch.fft.rfft2(out.float()) - target
        losses.append(F.l1_loss(out, sharp) + fft_weight * (diff.real.abs().mean() + diff.imag.abs().mean()) / 2)
    return torch.stack(losses).mean()


def psnr_loss(restored: Sequence[torch.Tensor], sharp: torch.Tensor, cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """Mean over outputs and crops of -PSNR(out, sharp) in dB, each crop's MSE floored at the cap's.

    The metric eval and calibration score, crop by crop: every crop counts alike in dB. Under L1, a
    nearly sharp crop's errors are small next to a blurred crop's, so sharpening it too hard costs
    little in the loss, though in dB it loses most.
    """
    floor = 10 ** (-cap_db / 10)
    return torch.stack([10 * torch.log10(mse(out, sharp) + floor).mean() for out in restored]).mean()


def dihedral(images: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flip/rotation variants (k in 0..7) of (..., H, W) images."""
    out = torch.rot90(images, k % 4, dims=(-2, -1))
    return out.flip(-1) if k >= 4 else out


class EncoderPretrainer(nn.Module):
    """Encoder + NAFNet decoder (pixel-shuffle ups, skip sums, one block a level) + 3x3 ending: a plain
    deblurrer whose encoder features are what AdaRevD's columns later decode."""

    def __init__(self, config: AdaRevDConfig) -> None:
        super().__init__()
        w = config.width
        self.encoder = Encoder.from_config(config)
        channels = [w * 2**level for level in range(4)]
        self.ups = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(2 * c, 4 * c, 1, bias=False), nn.PixelShuffle(2)) for c in reversed(channels)]
        )
        self.decoders = nn.ModuleList([NAFBlock(c) for c in reversed(channels)])
        self.ending = nn.Conv2d(w, 3, 3, padding=1)
        nn.init.zeros_(self.ending.weight)  # start as the identity, as AdaRevD's heads do
        nn.init.zeros_(self.ending.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h, w = images.shape[-2:]
        padded = AdaRevD.pad(images)
        *skips, x = self.encoder(padded)
        for up, block, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = block(up(x) + skip)
        return [self.ending(x)[..., :h, :w] + images]


DeblurLoss = Literal["l1_fft", "psnr"]
DEBLUR_LOSSES: tuple[DeblurLoss, ...] = ("l1_fft", "psnr")  # `deblur_loss`, `psnr_loss`


@dataclass(frozen=True)
class StageConfig:
    iterations: int
    lr: float = 1e-3
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.9)
    min_lr: float = 1e-7
    ema_decay: float = 0.999
    # Warm the EMA up: decay min(ema_decay, (1 + n) / (10 + n)) after n updates. Plain 0.999 keeps 37%
    # of its weight on the first 2000 of 3000 steps and gave +0.51 dB where the raw weights gave +0.94
    # (encoder pre-training, 14 held-out frames); warmed up it gave +0.93.
    ema_warmup: bool = True
    grad_clip: float | None = None
    loss: DeblurLoss = "l1_fft"  # deblurring stages: `deblur_loss` or `psnr_loss`


GradSync = Callable[[list[nn.Parameter]], None]


def ema_with_warmup(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """AveragedModel's multi_avg_fn for an EMA whose decay after n updates is min(decay, (1+n)/(10+n)):
    it follows the weights closely early on and settles at `decay` after about 10/(1-decay) steps."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        for a, c in zip(averaged, current, strict=True):
            a.lerp_(c, 1 - d)

    return update


class Stage:
    """Optimiser, cosine schedule and EMA over the trainable parameters of `model`.

    `sync`, when given, is called on the trainable parameters after each backward, before clipping and
    the update: data-parallel training averages the gradients of all workers there. After each step,
    `last_metric` is the mean PSNR of the batch's final output (deblurring) or the accuracy in percent
    of the classifier."""

    def __init__(
        self, model: nn.Module, params: Iterable[nn.Parameter], config: StageConfig, sync: GradSync | None = None
    ) -> None:
        self.model = model
        self.params = [p for p in params if p.requires_grad]
        self.config = config
        self.sync = sync
        self.last_metric = float("nan")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas
        )
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config.iterations, eta_min=config.min_lr
        )
        average = ema_with_warmup(config.ema_decay) if config.ema_warmup else get_ema_multi_avg_fn(config.ema_decay)
        self.ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True)

    def _apply(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.sync is not None:
            self.sync(self.params)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.ema.update_parameters(self.model)
        return loss.item()

    def train_step(self, blurry: torch.Tensor, sharp: torch.Tensor, *, reversible: bool = True) -> float:
        """One step of the deblurring loss over every output of the model."""
        self.model.train()
        outputs = self.model(blurry, reversible=reversible) if isinstance(self.model, AdaRevD) else self.model(blurry)
        loss = psnr_loss(outputs, sharp) if self.config.loss == "psnr" else deblur_loss(outputs, sharp)
        self.last_metric = psnr(outputs[-1].detach().clamp(0, 1), sharp).mean().item()
        return self._apply(loss)

    def classifier_step(self, blurry: torch.Tensor, sharp: torch.Tensor) -> float:
        """Stage 2: cross-entropy of the classifier on the PSNR bucket of each blurry crop."""
        model = self.model
        assert isinstance(model, AdaRevD)
        model.train()
        labels = psnr_classes(blurry, sharp, model.config.psnr_thresholds)
        with torch.no_grad():
            features = model.encode(model.pad(blurry))
        logits = model.classify(features)
        self.last_metric = 100 * (logits.argmax(dim=1) == labels).float().mean().item()
        return self._apply(F.cross_entropy(logits, labels))

    def averaged(self) -> nn.Module:
        """The EMA copy of the model."""
        return self.ema.module


def freeze_all_but(model: AdaRevD, *trainable: nn.Module | nn.Parameter) -> None:
    """Freeze every parameter of `model` except those of the given modules/parameters."""
    model.requires_grad_(False)
    for item in trainable:
        item.requires_grad_(True)
