"""Model configuration: one frozen dataclass and a few named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from adarevd.errors import InvalidInput
from adarevd.modes import ClassifierInput, EncoderKind

GOPRO_THRESHOLDS = (20.0, 25.0, 30.0, 35.0, 40.0)


@dataclass(frozen=True)
class AdaRevDConfig:
    """Everything that shapes an AdaRevD model. Sizes are in level-0 pixels."""

    width: int = 64
    encoder: EncoderKind = "ufpnet"
    encoder_blocks: tuple[int, ...] = (1, 1, 1, 28)
    num_columns: int = 4
    num_classes: int = 6
    exit_table: tuple[int, ...] = (4, 4, 3, 3, 2, 1)
    classifier_input: ClassifierInput = "e3"
    psnr_thresholds: tuple[float, ...] = GOPRO_THRESHOLDS
    patch_size: int = 384
    overlap: int = 32
    tlc_window: int | None = 384  # TLC box at level 0 (1.5 x the 256 training crop); None: global pools
    kernel_size: int = 19  # UFPNet blur kernels are kernel_size^2 per pixel
    kernel_noise: bool = True  # UFPNet's one random draw at inference; False for a deterministic encoder

    def __post_init__(self) -> None:
        problems = []
        if self.width < 2 or self.width % 2:
            problems.append(f"width must be an even number >= 2, got {self.width}")
        if self.encoder not in ("ufpnet", "nafnet"):
            problems.append(f"encoder must be 'ufpnet' or 'nafnet', got {self.encoder!r}")
        if len(self.encoder_blocks) != 4 or min(self.encoder_blocks) < 1:
            problems.append(f"encoder_blocks needs 4 positive counts, got {self.encoder_blocks}")
        elif self.encoder == "ufpnet" and self.encoder_blocks[:3] != (1, 1, 1):
            problems.append(f"the UFPNet encoder has one kernel block at levels 0-2, got {self.encoder_blocks}")
        if self.num_columns < 1:
            problems.append(f"num_columns must be >= 1, got {self.num_columns}")
        if len(self.exit_table) != self.num_classes or min(self.exit_table, default=0) < 0:
            problems.append(f"exit_table needs {self.num_classes} depths >= 0, got {self.exit_table}")
        if len(self.psnr_thresholds) != self.num_classes - 1:
            problems.append(f"psnr_thresholds needs {self.num_classes - 1} values, got {self.psnr_thresholds}")
        if self.classifier_input not in ("e3", "e4"):
            problems.append(f"classifier_input must be 'e3' or 'e4', got {self.classifier_input!r}")
        if self.patch_size % 16 or self.overlap % 16 or not 0 <= self.overlap < self.patch_size // 2:
            problems.append(
                f"patch_size and overlap must be multiples of 16 with overlap < patch_size/2, "
                f"got {self.patch_size} and {self.overlap}"
            )
        if self.tlc_window is not None and self.tlc_window < 16:
            problems.append(f"tlc_window must be >= 16 or None, got {self.tlc_window}")
        if problems:
            raise InvalidInput("invalid AdaRevD config: " + "; ".join(problems))

    def with_overrides(self, **fields: Any) -> AdaRevDConfig:
        """A copy with some fields replaced (lists become tuples); unknown names are an error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise InvalidInput(f"unknown AdaRevD config field(s) {unknown}; known: {sorted(known)}")
        tuples = {k: tuple(v) for k, v in fields.items() if isinstance(v, list)}
        return dataclasses.replace(self, **(fields | tuples))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdaRevDConfig:
        return cls().with_overrides(**json.loads(text))


PRESETS: dict[str, AdaRevDConfig] = {
    # The authors' models (UFPNet encoder, width 64). S has no table of its own: B's, capped at 2.
    "adarevd-s": AdaRevDConfig(num_columns=2, exit_table=(2, 2, 2, 2, 2, 1)),
    "adarevd-b": AdaRevDConfig(num_columns=4, exit_table=(4, 4, 3, 3, 2, 1)),
    "adarevd-l": AdaRevDConfig(num_columns=8, exit_table=(7, 6, 5, 2, 2, 2)),
    # CPU-sized: tests, the demo and the bundled default weights.
    "adarevd-tiny": AdaRevDConfig(
        width=8,
        encoder="nafnet",
        encoder_blocks=(1, 1, 1, 2),
        num_columns=4,
        exit_table=(4, 4, 3, 3, 2, 1),
        patch_size=64,
        overlap=16,
        tlc_window=96,
        kernel_noise=False,
    ),
}
