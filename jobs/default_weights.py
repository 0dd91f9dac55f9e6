"""The recipe behind the bundled default weights (`adarevd-tiny`) and the bundled demo image.

Training frames are synthesised (pipeline.synth) from real photos that installed packages ship, so the
recipe runs offline and reproduces from its seed. The photos are split by image into train, validation
and test sets: no test scene is ever trained or calibrated on. Half the blurred pairs are worn alike
(sensor noise, JPEG), as archive footage is. The classifier also sees identity pairs (a sharp photo,
clean or worn, as its own target): it learns to give sharp patches the sharpest class, and calibration
gives that class depth 0, so sharp footage passes untouched. The deblurring stages never see identity
pairs: with them, L1 pins the zero-initialised residual at zero (measured: a pre-trainer with 20%
identity pairs stayed the exact identity). Stages: encoder pre-training as a plain deblurrer, stage 1
(columns, heads, feature scales) on L1, the same parameters tuned on the PSNR loss (`psnr_loss`: every
crop counts alike in dB, so columns stop sharpening mildly blurred crops too hard), and stage 2
(classifier), then exit-table calibration on validation frames and an evaluation on test frames:
blurred ones, and sharp ones fed through as they are (`sharp_in`). `adarevd make-default-weights` runs
it in one process with the same `Stage` code the `adarevd train` jobs use; the numbers go into the
weights' metadata and the README.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import av
import cv2
import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

import adarevd
from adarevd.calibration import with_exit_table
from adarevd.errors import InvalidInput
from adarevd.training import EncoderPretrainer, Stage, StageConfig, dihedral, freeze_all_but, make_deterministic
from pipeline.synth.blur import Wear, synthesize, wear
from pipeline.synth.scenes import load_sample as load_image
from pipeline.train.evaluate import calibrate, evaluate

# Split by image; a scene never crosses splits (motorcycle_left/right are one scene). The test photos
# include the demo clip's scene (astronaut) and the demo image's (chelsea).
TRAIN_IMAGES = (
    "brick",
    "grass",
    "gravel",
    "moon",
    "page",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "cell",
    "motorcycle_left",
    "motorcycle_right",
    "grace_hopper",
)
VALIDATION_IMAGES = ("rocket", "coins")
TEST_IMAGES = ("astronaut", "chelsea", "coffee")
TRAIN_SEEDS, TEST_SEEDS, VALIDATION_SEEDS = range(0, 16), range(1000, 1008), range(2000, 2004)
# Sharp test frames in the states archives hold them: as shot, JPEG, noisy + JPEG, H.264 (yuv420p).
SHARP_STATES: dict[str, Wear | None] = {
    "clean": Wear(),
    "jpeg60": Wear(jpeg_quality=60),
    "noise3-jpeg85": Wear(noise_sigma=3.0, jpeg_quality=85),
    "h264-crf23": None,
}
DEMO_IMAGE, DEMO_SEED = "chelsea", 20261128
ASSETS = Path(__file__).resolve().parents[1] / "adarevd" / "assets"


@dataclass(frozen=True)
class Recipe:
    """Everything the default weights' training depends on (with the seeds above). Presets: `RECIPES`."""

    seed: int = 0
    train_images: tuple[str, ...] = TRAIN_IMAGES
    validation_images: tuple[str, ...] = VALIDATION_IMAGES  # exit-table calibration
    test_images: tuple[str, ...] = TEST_IMAGES  # the metrics in the metadata and the README
    identity_per_image: int = 4  # identity pairs per photo for the classifier: as shot, then worn (`Wear.random`)
    worn_fraction: float = 0.5  # blurred pairs worn alike on both members
    crop: int = 96  # blur reaches 32 px: crops need room around it
    batch: int = 8
    pretrain_iterations: int = 6000
    pretrain_lr: float = 2e-3
    stage1_iterations: int = 4000
    stage1_lr: float = 2e-3  # the paper's 1e-3 is for 200k iterations; this schedule is 50x shorter
    tune_iterations: int = 1000  # stage 1 again, on the PSNR loss: columns that leave mild blur alone
    tune_lr: float = 5e-4
    stage2_iterations: int = 800
    calibration_budget_db: float = 0.03  # patch-based estimate; whole frames lose a little more
    ema_warmup: bool = True  # each stage's EMA (StageConfig)


RECIPES: dict[str, Recipe] = {
    # What made the bundled file: about an hour on 2 CPU cores.
    "cpu": Recipe(),
    # For one GPU, sized by estimate (never run yet): at width 8 a step is bound by the host's kernel
    # launches, not the card, so its time hardly grows with the batch. Counted with TorchDispatchMode
    # (foreach AdamW, as on CUDA), a step runs 1906 ops in pre-training, 5926 in stage 1 and 1675 in
    # stage 2; at about 10 us of host time an op that is 19 / 59 / 17 ms a step, so 8x the batch at
    # 128-pixel crops (14x the pixels a step) for about 4 minutes of training (8 at 20 us an op),
    # within one device call. `--work` keeps each finished stage if a run is cut short.
    "gpu": Recipe(crop=128, batch=64, pretrain_iterations=6000, stage1_iterations=2000, stage2_iterations=800),
}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float().div(255)


def _rng(*key: int | str) -> np.random.Generator:
    """A generator fixed by its key (names hashed with CRC-32, which is stable across runs)."""
    return np.random.default_rng([zlib.crc32(k.encode()) if isinstance(k, str) else k for k in key])


def make_pairs(
    names: tuple[str, ...], seeds: range, device: torch.device | str = "cpu", *, worn_fraction: float = 0.0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(blurry, sharp) tensors of every photo blurred with every seed; `worn_fraction` of them worn alike."""
    pairs = []
    for name in names:
        sharp = load_image(name)
        for seed in seeds:
            blurry, truth = synthesize(sharp, seed=seed)
            rng = _rng(name, seed)
            if rng.random() < worn_fraction:
                spec, noise_seed = Wear.random(rng), int(rng.integers(2**31))
                blurry, truth = wear(blurry, spec, noise_seed), wear(truth, spec, noise_seed)
            pairs.append((to_tensor(blurry).to(device), to_tensor(truth).to(device)))
    return pairs


def identity_pairs(
    names: tuple[str, ...], per_image: int, device: torch.device | str = "cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(frame, frame) pairs: each photo as shot, then worn `per_image - 1` times (`Wear.random`)."""
    pairs = []
    for name in names:
        sharp = load_image(name)
        for k in range(per_image):
            rng = _rng(name, "identity", k)
            frame = sharp if k == 0 else wear(sharp, Wear.random(rng), int(rng.integers(2**31)))
            tensor = to_tensor(frame).to(device)
            pairs.append((tensor, tensor))
    return pairs


def h264(image: np.ndarray, crf: int = 23) -> np.ndarray:
    """(H, W, 3) uint8 RGB through one H.264 frame (libx264, yuv420p) and back."""
    h, w = image.shape[:2]
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
    codec.options = {"crf": str(crf), "preset": "medium"}
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[: h - h % 2, : w - w % 2]), format="rgb24")
    packets = [*codec.encode(frame.reformat(format="yuv420p")), *codec.encode(None)]
    decoder = av.CodecContext.create("h264", "r")
    decoded = [f for p in packets for f in decoder.decode(p)] + list(decoder.decode(None))
    return decoded[0].to_ndarray(format="rgb24")


def sharp_frames(names: tuple[str, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    """("photo/state", frame) for every photo in every state of `SHARP_STATES`."""
    for name in names:
        sharp = load_image(name)
        for state, spec in SHARP_STATES.items():
            frame = h264(sharp) if spec is None else wear(sharp, spec, seed=zlib.crc32(name.encode()))
            yield f"{name}/{state}", to_tensor(frame)


def crops(pairs: list, batch: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random aligned crops with one of 8 flips/rotations each."""
    blurry, sharp = [], []
    for _ in range(batch):
        b, s = pairs[int(torch.randint(len(pairs), (1,), generator=g))]
        y = int(torch.randint(b.shape[1] - size + 1, (1,), generator=g))
        x = int(torch.randint(b.shape[2] - size + 1, (1,), generator=g))
        k = int(torch.randint(8, (1,), generator=g))
        blurry.append(dihedral(b[:, y : y + size, x : x + size], k))
        sharp.append(dihedral(s[:, y : y + size, x : x + size], k))
    return torch.stack(blurry), torch.stack(sharp)


def run_stage(name: str, stage: Stage, step: Callable[[], float], log: Callable[[str], None]) -> nn.Module:
    """`step` (one step of `stage`) for the stage's iterations, logging progress; the EMA model."""
    iterations = stage.config.iterations
    start, recent = time.perf_counter(), []
    for i in range(1, iterations + 1):
        recent = [*recent[-49:], step()]
        if i % 250 == 0 or i == iterations:
            log(f"{name}: {i}/{iterations} loss {np.mean(recent):.4f} ({time.perf_counter() - start:.0f} s)")
    return stage.averaged()


def make_default_weights(
    output: Path,
    recipe: Recipe = Recipe(),
    log: Callable[[str], None] = print,
    device: str = "cpu",
    work: Path | None = None,
) -> dict:
    """Train adarevd-tiny by the recipe on `device`, calibrate its exit table and write it, with
    provenance, to `output` (safetensors). Returns the test metrics. `work`: keep each finished
    stage there, and skip the stages a previous run of the same recipe kept."""
    trained = train_default_weights(recipe, log, device, work)
    return finish_default_weights(trained, output, recipe, log, trained_on=device_name(device))


def device_name(device: str) -> str:
    """`cpu`, or the CUDA card's name (recorded in the weights' provenance)."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def train_default_weights(
    recipe: Recipe, log: Callable[[str], None] = print, device: str = "cpu", work: Path | None = None
) -> adarevd.AdaRevD:
    """The three training stages of the recipe on `device`; the trained model comes back on the CPU.
    With `work`, each finished stage is kept there and a re-run skips the stages found (see `Marks`)."""
    make_deterministic(device)
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    marks = Marks(work, recipe, device, g)
    marks.check()  # a folder of another recipe is refused before the pairs are made
    train = make_pairs(recipe.train_images, TRAIN_SEEDS, device, worn_fraction=recipe.worn_fraction)
    sharp = identity_pairs(recipe.train_images, recipe.identity_per_image, device)  # for the classifier only
    log(f"{len(train)} blurred and {len(sharp)} sharp training frames on {device_name(device)}")
    config = adarevd.PRESETS["adarevd-tiny"]
    settings = partial(StageConfig, ema_warmup=recipe.ema_warmup)

    if (encoder := marks.load("encoder", log)) is None:
        pre = EncoderPretrainer(config).to(device)
        stage = Stage(pre, pre.parameters(), settings(recipe.pretrain_iterations, recipe.pretrain_lr))
        step = lambda: stage.train_step(*crops(train, recipe.batch, recipe.crop, g))  # noqa: E731
        encoder = run_stage("encoder", stage, step, log).encoder.state_dict()
        marks.save("encoder", encoder)

    model = adarevd.AdaRevD(config).to(device)
    model.encoder.load_state_dict(encoder)
    freeze_all_but(model, model.conv_features, model.subdenets, model.outputs)  # stage 1 and its tuning

    def columns_stage(name: str, stage_config: StageConfig) -> dict[str, torch.Tensor]:
        """Stage 1's parameters trained by `stage_config`, kept as `name`."""
        if (kept := marks.load(name, log)) is not None:
            return kept
        stage = Stage(model, model.parameters(), stage_config)
        # Plain autograd here: the same gradients as the reversible path (tested), faster at this size.
        step = lambda: stage.train_step(*crops(train, recipe.batch, recipe.crop, g), reversible=False)  # noqa: E731
        trained = run_stage(name, stage, step, log).state_dict()
        marks.save(name, trained)
        return trained

    model.load_state_dict(columns_stage("columns", settings(recipe.stage1_iterations, recipe.stage1_lr)))
    model.load_state_dict(columns_stage("tuned", settings(recipe.tune_iterations, recipe.tune_lr, loss="psnr")))

    freeze_all_but(model, model.ape)
    stage = Stage(model, model.parameters(), settings(recipe.stage2_iterations, 3e-4, 3e-4, grad_clip=0.01))
    step = lambda: stage.classifier_step(*crops(train + sharp, recipe.batch, config.patch_size, g))  # noqa: E731
    model.load_state_dict(run_stage("classifier", stage, step, log).state_dict())
    model.requires_grad_(True)
    return model.cpu()


class Marks:
    """Finished stages of one recipe run in a folder (`--work`): `encoder.safetensors` after the
    pre-training, `columns.safetensors` after stage 1, `tuned.safetensors` after its tuning, each with
    the recipe fields it depends on, the device and every random state the later stages draw from (the
    crop generator, torch's CPU RNG and the card's), so a run stopped anywhere and re-run with the same
    folder ends with the weights of an unbroken run. A kept stage that another device or other values of
    its fields made is refused. The fields of the stages after the last kept one (`LATER_FIELDS`) may
    change: a re-run then trains only those stages."""

    # The kept stages, in order (each as <name>.safetensors), and the recipe fields each one adds to
    # those of the stages before it.
    STAGE_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "encoder": (
            "seed",
            "train_images",
            "worn_fraction",
            "crop",
            "batch",
            "ema_warmup",
            "pretrain_iterations",
            "pretrain_lr",
        ),
        "columns": ("stage1_iterations", "stage1_lr"),
        "tuned": ("tune_iterations", "tune_lr"),
    }
    STAGES = tuple(STAGE_FIELDS)
    # The classifier, calibration and test: they draw nothing that a kept stage depends on.
    LATER_FIELDS = (
        "identity_per_image",
        "stage2_iterations",
        "validation_images",
        "test_images",
        "calibration_budget_db",
    )

    def __init__(self, folder: Path | None, recipe: Recipe, device: str, generator: torch.Generator) -> None:
        self.folder, self.generator = folder, generator
        self.device = torch.device(device)
        fields = asdict(recipe)
        self.made_by: dict[str, dict[str, str]] = {}  # stage -> the metadata it must hold
        for i, stage in enumerate(self.STAGES):
            used = {f: fields[f] for before in self.STAGES[: i + 1] for f in self.STAGE_FIELDS[before]}
            self.made_by[stage] = {"recipe": json.dumps(used, sort_keys=True), "device": device_name(device)}

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        rng = {"generator": self.generator.get_state().tolist(), "torch": torch.get_rng_state().tolist()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device).tolist()
        tmp = self.folder / f".{name}.safetensors.tmp"
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        safetensors.torch.save_file(cpu, str(tmp), metadata=self.made_by[name] | {"rng": json.dumps(rng)})
        os.replace(tmp, self.folder / f"{name}.safetensors")

    def check(self) -> None:
        """Refuse a folder whose kept stages another recipe or device made (or that are not stages)."""
        for name in self.STAGES:
            if (path := self._path(name)) is not None:
                self._metadata(path, name)

    def load(self, name: str, log: Callable[[str], None]) -> dict[str, torch.Tensor] | None:
        """The stage's tensors (on the device) with the random states put back, or None if not kept."""
        if (path := self._path(name)) is None:
            return None
        rng = json.loads(self._metadata(path, name)["rng"])
        self.generator.set_state(torch.tensor(rng["generator"], dtype=torch.uint8))
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "cuda" in rng:
            torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8), self.device)
        log(f"{name}: kept in {path}, not trained again")
        return safetensors.torch.load_file(str(path), device=str(self.device))

    def _path(self, name: str) -> Path | None:
        """The kept stage's file, or None."""
        path = self.folder / f"{name}.safetensors" if self.folder is not None else None
        return path if path is not None and path.exists() else None

    def _metadata(self, path: Path, name: str) -> dict[str, str]:
        """Kept stage `name`'s metadata, checked to be of this recipe's values of its fields and this device."""
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
        except (OSError, safetensors.SafetensorError) as e:
            raise InvalidInput(f"{path} is not a kept stage ({e}); delete it, or use another --work folder") from e
        if "rng" not in metadata:
            raise InvalidInput(f"{path} holds no random states: not a kept stage; use another --work folder")
        for key, value in self.made_by[name].items():
            if metadata.get(key) != value:
                raise InvalidInput(
                    f"{path} was made with another {key} ({metadata.get(key)!r}, this run: {value!r}); "
                    "use another --work folder, or the options that made it"
                )
        return metadata


def finish_default_weights(
    trained: adarevd.AdaRevD,
    output: Path,
    recipe: Recipe,
    log: Callable[[str], None] = print,
    trained_on: str = "cpu",
) -> dict:
    """Calibrate the exit table on validation frames (blurred and sharp), evaluate on test frames (both
    on the CPU), write the weights. Returns the test metrics: `blurred` (with each class's gain) and
    `sharp_in` (sharp frames fed through as they are)."""
    validation = make_pairs(recipe.validation_images, VALIDATION_SEEDS, worn_fraction=recipe.worn_fraction)
    validation += identity_pairs(recipe.validation_images, recipe.identity_per_image)
    found = calibrate(trained, validation, recipe.calibration_budget_db)
    log(
        f"calibrated exit table {found.exit_table}: mean depth {found.mean_depth}, "
        f"estimated loss {found.psnr_loss_db} dB"
    )
    model = with_exit_table(trained, found.exit_table).eval()
    blurred = evaluate(model, make_pairs(recipe.test_images, TEST_SEEDS))
    blurred["class_gain_db"] = {c: row["gain_db"] for c, row in blurred.pop("by_class").items()}
    sharp = evaluate(model, ((frame, frame) for _, frame in sharp_frames(recipe.test_images)))["sharp_in"]
    metrics = {"blurred": blurred, "sharp_in": sharp}
    log(f"test: {json.dumps(metrics)}")
    provenance = {
        "recipe": asdict(recipe),
        "trained_on": trained_on,
        "train_seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop],
        "validation_seeds": [VALIDATION_SEEDS.start, VALIDATION_SEEDS.stop],
        "test_seeds": [TEST_SEEDS.start, TEST_SEEDS.stop],
        "sharp_states": list(SHARP_STATES),
        "test_metrics": metrics,
        "calibration": asdict(found),
        "command": "adarevd make-default-weights",
    }
    tmp = output.with_name(f".{output.name}.tmp")  # then moved: the bundled file is never half-written
    adarevd.save_weights(model, tmp, metadata={"adarevd.provenance": json.dumps(provenance)})
    os.replace(tmp, output)
    return metrics


def make_demo_image(directory: Path = ASSETS) -> tuple[Path, Path]:
    """The bundled demo pair: an image blurred with a seed the training never used."""
    blurry, sharp = synthesize(load_image(DEMO_IMAGE), seed=DEMO_SEED)
    paths = directory / "demo_blurry.png", directory / "demo_sharp.png"
    for path, image in zip(paths, (blurry, sharp), strict=True):
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return paths
