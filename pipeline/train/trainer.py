"""One training stage (`encoder`, `decoders` or `classifier`) as a plain loop, free of Ray.

`train(spec, rank, world)` is what each data-parallel worker runs; with `world == 1` it is a complete
single-process trainer. Workers average gradients with one all-reduce per step (`torch.distributed`,
gloo or NCCL, set up by the caller), so they hold identical weights without DDP wrappers (the reversible
backward computes parameter gradients itself). Batches come from `PairStream` and depend only on the
seed, the rank and the step; with the optimiser, EMA, schedule and RNG restored from the newest
checkpoint, a resumed run continues exactly as the unbroken run would have.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

import adarevd
from adarevd import AdaRevD, AdaRevDConfig
from adarevd.errors import InvalidInput
from adarevd.train_state import load_stage_state, stage_state
from adarevd.training import (
    DEBLUR_LOSSES,
    DeblurLoss,
    EncoderPretrainer,
    Stage,
    StageConfig,
    freeze_all_but,
    make_deterministic,
)
from adarevd.weights import read_state_dict
from pipeline.store.scratch import scratch
from pipeline.store.storage import Store, file_store, redact
from pipeline.store.weights_cache import local_weights
from pipeline.train.checkpoints import Checkpoints
from pipeline.train.pair_stream import PairStream, StreamConfig

TrainKind = Literal["encoder", "decoders", "classifier"]
KINDS: tuple[TrainKind, ...] = ("encoder", "decoders", "classifier")
HISTORY_KEY = "adarevd.training"

# ADAREVD.md section 7; the encoder pre-training follows stage 1's optimiser.
STAGE_DEFAULTS: dict[TrainKind, StageConfig] = {
    "encoder": StageConfig(iterations=1, lr=1e-3, weight_decay=1e-3),
    "decoders": StageConfig(iterations=1, lr=1e-3, weight_decay=1e-3),
    "classifier": StageConfig(iterations=1, lr=3e-4, weight_decay=3e-4, grad_clip=0.01),
}


class TrainError(InvalidInput):
    """A training job that cannot start as asked (message says what to change)."""


@dataclass(frozen=True)
class TrainSpec:
    kind: TrainKind
    data: str  # folder of paired shards
    output: str  # weights file (.safetensors) on any fsspec URL
    checkpoints: str | None = None  # folder URL; resume from its newest checkpoint
    preset: str = "adarevd-tiny"  # used when no project weights give the config
    weights: tuple[str, ...] = ()  # starting weights; decoders and classifier need a trained encoder
    iterations: int = 1000
    batch: int = 8  # crops per worker per step
    crop: int | None = None  # None: 96 (deblurring) or the model's patch size (classifier)
    lr: float | None = None  # None: STAGE_DEFAULTS
    weight_decay: float | None = None
    grad_clip: float | None = None
    ema_decay: float = 0.999
    ema_warmup: bool = True  # see StageConfig
    seed: int = 0
    reversible: bool = True
    checkpoint_every: int = 500
    log_every: int = 50
    repeats: int = 4
    psnr_thresholds: tuple[float, ...] | None = None  # classifier: class boundaries (None: the model's)
    loss_function: DeblurLoss = "l1_fft"  # encoder, decoders: the authors' L1 + FFT loss, or `psnr_loss`
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TrainError(f"unknown training kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if min(self.iterations, self.batch, self.checkpoint_every, self.log_every) < 1:
            raise TrainError("iterations, batch, checkpoint_every and log_every must be >= 1")
        if self.kind != "encoder" and not self.weights:
            raise TrainError(
                f"train {self.kind} needs --weights with a trained encoder (from `adarevd train encoder`, "
                "or the authors' checkpoint)"
            )
        if self.loss_function not in DEBLUR_LOSSES:
            raise TrainError(f"unknown loss {self.loss_function!r}; choose from {', '.join(DEBLUR_LOSSES)}")
        if self.kind == "classifier" and self.loss_function != "l1_fft":
            raise TrainError("--loss is for the encoder and decoders stages; the classifier learns by cross-entropy")
        if not self.output.endswith(".safetensors"):
            raise TrainError(f"--output must name a .safetensors file, got {redact(self.output)}")

    def stage_config(self) -> StageConfig:
        base = STAGE_DEFAULTS[self.kind]
        return replace(
            base,
            iterations=self.iterations,
            lr=self.lr if self.lr is not None else base.lr,
            weight_decay=self.weight_decay if self.weight_decay is not None else base.weight_decay,
            grad_clip=self.grad_clip if self.grad_clip is not None else base.grad_clip,
            ema_decay=self.ema_decay,
            ema_warmup=self.ema_warmup,
            loss=self.loss_function,
        )

    def weight_files(self) -> list[str]:
        """`weights` as local files: URLs fetched into this node's cache (`URL#sha256=` verified)."""
        return local_weights(self.weights, self.storage_options)

    def identity(self, world: int) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (everything that changes the result)."""
        keep = (
            "kind",
            "preset",
            "weights",
            "iterations",
            "batch",
            "crop",
            "lr",
            "weight_decay",
            "grad_clip",
            "ema_decay",
            "ema_warmup",
            "seed",
            "reversible",
            "repeats",
            "psnr_thresholds",
            "loss_function",
        )
        identity = {k: v for k, v in asdict(self).items() if k in keep} | {"data": redact(self.data), "world": world}
        return json.loads(json.dumps(identity))  # as a checkpoint gives it back (tuples are lists)


@dataclass(frozen=True)
class Progress:
    step: int
    iterations: int
    loss: float
    metric: float  # PSNR (dB) of the final output, or classifier accuracy (%)
    crops_per_s: float
    resumed_from: int


@dataclass(frozen=True)
class TrainResult:
    output: str
    steps: int
    resumed_from: int
    loss: float
    metric: float
    seconds: float


def model_config(spec: TrainSpec, files: list[str]) -> AdaRevDConfig:
    """The stage's config: the first weights file's own (a .safetensors), else the preset's. `files`:
    `spec.weight_files()`."""
    if files and files[0].endswith(".safetensors"):
        config = adarevd.read_config(files[0])
    elif spec.preset in adarevd.PRESETS:
        config = adarevd.PRESETS[spec.preset]
    else:
        raise TrainError(f"unknown preset {spec.preset!r}; choose from {', '.join(adarevd.PRESETS)}")
    if spec.psnr_thresholds is not None:
        if list(spec.psnr_thresholds) != sorted(spec.psnr_thresholds):
            raise TrainError(f"--psnr-thresholds must increase, got {list(spec.psnr_thresholds)}")
        config = config.with_overrides(psnr_thresholds=list(spec.psnr_thresholds))
    return config


def build(spec: TrainSpec, files: list[str]) -> tuple[AdaRevD, nn.Module]:
    """(the AdaRevD model the output is made from, the module this stage trains), frozen as the stage says.
    `files`: `spec.weight_files()`, the weights it starts from."""
    model = AdaRevD(model_config(spec, files))
    if files:
        adarevd.load_weights(model, *files)
    if spec.kind == "encoder":
        trained: nn.Module = EncoderPretrainer(model.config)
        trained.encoder.load_state_dict(model.encoder.state_dict())
        return model, trained
    if spec.kind == "decoders":
        freeze_all_but(model, model.conv_features, model.subdenets, model.outputs)
    else:
        freeze_all_but(model, model.ape)
    return model, model


def train(
    spec: TrainSpec,
    rank: int = 0,
    world: int = 1,
    *,
    device: torch.device | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> TrainResult | None:
    """Run the stage; rank 0 writes checkpoints and the output and returns the result (others: None).
    `on_progress` is called on every rank every `log_every` steps, with the mean over workers."""
    start_time = time.perf_counter()
    device = device or torch.device("cpu")
    make_deterministic(device)  # on a GPU too, a resumed run gives the unbroken run's weights
    torch.manual_seed(spec.seed)
    files = spec.weight_files()  # once: a URL without a sha256 is fetched on every call
    model, trained = build(spec, files)
    trained.to(device)
    if world > 1:
        for tensor in trained.state_dict().values():
            dist.broadcast(tensor, src=0)
    stage = Stage(trained, trained.parameters(), spec.stage_config(), average_gradients if world > 1 else None)
    identity = spec.identity(world)
    checkpoints = Checkpoints(Store(spec.checkpoints, spec.storage_options)) if spec.checkpoints else None
    start = 0
    if checkpoints is not None and (members := checkpoints.latest()) is not None:
        saved = json.loads(members["state.json"])["extra"].get("identity")
        if saved != identity:
            raise TrainError(
                f"the checkpoints in {redact(spec.checkpoints or '')} were made by another job "
                f"({_difference(saved, identity)}); use a new --checkpoints folder or the same options"
            )
        start = int(load_stage_state(stage, members)["step"])
    crop = spec.crop or (model.config.patch_size if spec.kind == "classifier" else 96)
    stream_config = StreamConfig(batch=spec.batch, crop=crop, repeats=spec.repeats, seed=spec.seed)
    batches = PairStream(Store(spec.data, spec.storage_options), stream_config, rank, world).batches(start)
    loss = metric = float("nan")
    window_start, window_steps = time.perf_counter(), 0
    for step in range(start + 1, spec.iterations + 1):
        blurry, sharp = (t.to(device) for t in next(batches))
        if spec.kind == "classifier":
            loss = stage.classifier_step(blurry, sharp)
        else:
            loss = stage.train_step(blurry, sharp, reversible=spec.reversible)
        metric = stage.last_metric
        window_steps += 1
        if step % spec.log_every == 0 or step == spec.iterations:
            loss, metric = _mean_over_workers([loss, metric], world, device)
            elapsed = time.perf_counter() - window_start
            rate = window_steps * spec.batch * world / max(elapsed, 1e-9)
            if on_progress is not None:  # on every rank; the caller decides which one prints
                on_progress(Progress(step, spec.iterations, loss, metric, rate, start))
            window_start, window_steps = time.perf_counter(), 0
        if checkpoints is not None and rank == 0 and (step % spec.checkpoint_every == 0 or step == spec.iterations):
            checkpoints.save(step, stage_state(stage, step, {"identity": identity}))
    if rank != 0:
        return None
    finished(model, stage, spec)
    seconds = time.perf_counter() - start_time
    outcome = {"loss": loss, "metric": metric, "world": world, "resumed_from": start, "seconds": seconds}
    write_output(model, spec, outcome, files)
    return TrainResult(spec.output, spec.iterations, start, loss, metric, seconds)


def read_result(spec: TrainSpec) -> TrainResult:
    """The result of a finished stage, from the training history in its output weights."""
    store, name = file_store(spec.output, spec.storage_options)
    with scratch("weights") as tmp:
        local = Path(tmp) / "weights.safetensors"
        local.write_bytes(store.read_bytes(name))
        entry = json.loads(read_state_dict(local)[1][HISTORY_KEY])[-1]
    return TrainResult(
        spec.output, entry["iterations"], entry["resumed_from"], entry["loss"], entry["metric"], entry["seconds"]
    )


def finished(model: AdaRevD, stage: Stage, spec: TrainSpec) -> None:
    """Copy the EMA weights of what the stage trained into `model`."""
    averaged = stage.averaged()
    if spec.kind == "encoder":
        model.encoder.load_state_dict(averaged.encoder.state_dict())
    else:
        model.load_state_dict(averaged.state_dict())
    model.requires_grad_(True)
    model.cpu()


def write_output(model: AdaRevD, spec: TrainSpec, outcome: dict[str, Any], files: list[str]) -> None:
    """The weights with their config and the training history (earlier stages' plus this one, from the
    first of `files`, the weights the stage started from)."""
    history = []
    if files and files[0].endswith(".safetensors"):
        history = json.loads(read_state_dict(files[0])[1].get(HISTORY_KEY, "[]"))
    entry = spec.identity(outcome["world"]) | {k: _round(v) for k, v in outcome.items()}
    entry["weights"] = [posixpath.basename(w.partition("#")[0]) for w in spec.weights]
    history.append(entry)
    publish_weights(model, spec.output, spec.storage_options, {HISTORY_KEY: json.dumps(history)})


def publish_weights(model: AdaRevD, url: str, options: Mapping[str, Any], metadata: dict[str, str]) -> None:
    """`adarevd.save_weights` to a file on any fsspec URL, committed whole."""
    store, name = file_store(url, options)
    with scratch("weights") as tmp:
        local = Path(tmp) / "weights.safetensors"
        adarevd.save_weights(model, local, metadata=metadata)
        store.commit_file(name, str(local))
        store.remove_tmp_folder()


def average_gradients(params: list[nn.Parameter]) -> None:
    """Replace each gradient by its mean over all workers, in one all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def _mean_over_workers(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def _difference(saved: dict[str, Any] | None, current: dict[str, Any]) -> str:
    if saved is None:
        return "no job identity recorded"
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in keys)


def _round(value: Any) -> Any:
    return round(value, 5) if isinstance(value, float) else value
