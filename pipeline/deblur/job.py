"""What a deblur run is asked to do: plain frozen data, no Ray and no torch, so that it travels to
every shard task and actor cheaply."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from adarevd.config import AdaRevDConfig
from adarevd.errors import InvalidInput, NotFound, UserError
from adarevd.modes import Blend, Compile, EncoderMode, ExitMode, Precision
from pipeline.deblur.input_shards import Listing, list_folder, list_shards, split_input, without_output
from pipeline.deblur.shard import ShardTask
from pipeline.store.storage import Store, redact

# fused: each restorer actor runs a batch through every stage (the default: measured fastest, see
# docs/ARCHITECTURE.md). depth-pools: encoder actors -> one pool per exit depth -> encoder actors.
Routing = Literal["fused", "depth-pools"]


class StallError(UserError, RuntimeError):
    """No progress for too long; the message says what is waiting on what."""


class DeviceError(UserError, RuntimeError):
    """The actors were given GPUs that their torch cannot use."""


class ActorStartError(UserError, RuntimeError):
    """A model actor's constructor failed (weights unreadable where it runs, a broken device, ...): at the
    start, or when Ray restarted the actor after a crash. Ray then holds it dead for good."""


def start_failure(error: BaseException, *, restarted: bool) -> ActorStartError | None:
    """The short form of a Ray actor error whose actor's constructor raised (which actor, the last line
    of its traceback, what to check); None for any other error."""
    if not getattr(error, "actor_init_failed", False):
        return None
    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(getattr(error, "error_msg", error)))  # Ray colours names
    actor = re.search(r"ray::([\w.-]+):", plain)
    lines = [line.strip() for line in plain.splitlines() if line.strip()]
    what = f"{'actor ' + actor.group(1) if actor else 'an actor'} failed to {'restart' if restarted else 'start'}"
    kept = " The shards committed so far are kept: the same command resumes once that node is fixed or left out."
    after = kept if restarted else ""
    return ActorStartError(
        f"{what}: {lines[-1] if lines else plain}. Each model actor builds the model itself where Ray placed "
        "it, so the weights must be readable there and its device must work; the actor's log on that node "
        f"has the whole traceback.{after}"
    )


def _require(ok: bool, setting: str, rule: str, value: object) -> None:
    """Refuse a bad setting at construction, named as the user gives it: its `adarevd deblur` flag (a job
    spec's [options] use the same names), or the field where no flag sets it."""
    if not ok:
        raise InvalidInput(f"{setting} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class RestoreOptions:
    exit: ExitMode = "adaptive"
    encoder_mode: EncoderMode = "frame"
    # bf16 autocast: auto is fp32 on CPUs (`precision_on`), and on a GPU bf16 where it has bf16 tensor
    # cores (each restorer decides on its card: `adarevd.speed.precision_for`).
    precision: Precision = "auto"
    jpeg_quality: int = 95
    blend: Blend = "normalised"  # overlapping patches: a weighted mean, or the reference's weights
    threads: int = 0  # torch threads in this worker; 0 leaves torch's default
    # Frame mode holds the whole frame's activations; larger frames are encoded per patch (bounded by
    # the patch size) and say so in their manifest notes. 0 = no limit. Default: 4K UHD.
    max_frame_pixels: int = 3840 * 2160
    # torch.compile the model (`adarevd.speed`): on, off, or auto (the job turns it on for inputs of
    # `COMPILE_MIN_BYTES` or more; a restorer given auto runs eager).
    compile: Compile = "auto"

    def __post_init__(self) -> None:
        depth = isinstance(self.exit, int) and not isinstance(self.exit, bool) and self.exit >= 0
        _require(self.exit == "adaptive" or depth, "--exit", "'adaptive' or a depth >= 0", self.exit)
        _require(1 <= self.jpeg_quality <= 100, "jpeg_quality", "1..100", self.jpeg_quality)
        _require(self.blend in ("normalised", "reference"), "--blend", "'normalised' or 'reference'", self.blend)
        _require(self.threads >= 0, "threads", ">= 0 (0: by the actor's CPUs)", self.threads)
        _require(self.max_frame_pixels >= 0, "--max-frame-pixels", ">= 0 (0: no limit)", self.max_frame_pixels)
        _require(self.compile in ("auto", "on", "off"), "--compile", "'auto', 'on' or 'off'", self.compile)
        _require(self.precision in ("auto", "fp32", "bf16"), "--precision", "'auto', 'fp32' or 'bf16'", self.precision)

    def compile_for(self, input_bytes: int) -> RestoreOptions:
        """These options with `compile` decided: auto is on for inputs of `COMPILE_MIN_BYTES` or more.
        It depends on the whole input, never on what is left: a resumed run decides as the first did."""
        if self.compile != "auto":
            return self
        return replace(self, compile="on" if input_bytes >= COMPILE_MIN_BYTES else "off")

    def precision_on(self, *, gpus: bool) -> RestoreOptions:
        """These options with `auto` precision decided where the resources decide it: fp32 when no model
        actor holds a GPU. With GPUs, each restorer decides on its card (`adarevd.speed.precision_for`).
        The decided value goes into `made_with`: a CPU run resumes an fp32 output, and an output begun on
        GPUs is not finished on CPUs in another precision without saying so."""
        return self if self.precision != "auto" or gpus else replace(self, precision="fp32")

    def check_model(self, num_columns: int) -> None:
        """A fixed exit the model has: refused before any actor starts or shard is read."""
        if self.exit != "adaptive" and self.exit > num_columns:
            raise InvalidInput(
                f"--exit must be 'adaptive' or a depth 0..{num_columns} for this model "
                f"({num_columns} columns), got {self.exit}"
            )


# Input shards of this size hold about 200 million pixels of PNG frames (`adarevd.speed.COMPILE_MIN_PIXELS`),
# where compiling repays its minute of CPU; JPEG inputs hold more pixels per byte, so they pass sooner.
COMPILE_MIN_BYTES = 300 * 2**20


@dataclass(frozen=True)
class Resources:
    # Restorer actors (depth-pools layout: the depth pools' actors); 0 = as many as fit the cluster's
    # CPUs (or GPUs) once the encoders have theirs.
    workers: int = 0
    cpus_per_worker: float = 1.0
    # GPU shares. None (both): the cluster's GPUs if it has any (fused: a GPU per restorer; depth pools:
    # a quarter per encoder and pool actor), else none. Give either and the other defaults to 0.
    gpus_per_worker: float | None = None
    shards_in_flight: int = 0  # 0 = workers + 1 (depth pools: encoders + 1)
    worker_resource: str | None = None  # a custom node resource the actors need (1 each): pins them to nodes
    # Depth-pools layout only: the encode + classify + stitch actors.
    encoders: int = 1
    cpus_per_encoder: float = 1.0
    gpus_per_encoder: float | None = None

    def __post_init__(self) -> None:
        for setting, value in (
            ("--workers", self.workers),
            ("--encoders", self.encoders),
            ("shards_in_flight", self.shards_in_flight),
            ("--cpus-per-worker", self.cpus_per_worker),
            ("--cpus-per-encoder", self.cpus_per_encoder),
        ):
            _require(value >= 0, setting, ">= 0", value)
        shares = (("--gpus-per-worker", self.gpus_per_worker), ("--gpus-per-encoder", self.gpus_per_encoder))
        for setting, share in shares:
            _require(share is None or share >= 0, setting, ">= 0 (fractions are fine)", share)

    def resolve(self, cluster: Mapping[str, float], routing: Routing = "fused") -> Resources:
        """Every number decided: GPU shares, actor counts (as many as fit), shards in flight."""
        split = routing == "depth-pools"
        encoders = max(1, self.encoders) if split else 0
        gpus_per_worker, gpus_per_encoder = self.gpu_shares(cluster.get("GPU", 0), split)
        workers = self.workers
        if not workers:
            cpus = cluster.get("CPU", 1) - encoders * self.cpus_per_encoder
            limits = [int(cpus // self.cpus_per_worker) if self.cpus_per_worker else 1]
            if gpus_per_worker:
                gpus = cluster.get("GPU", 0) - encoders * gpus_per_encoder
                limits.append(int(gpus / gpus_per_worker + 1e-9))  # 1e-9: 0.75 / 0.25 may floor to 2
            if self.worker_resource:
                limits.append(int(cluster.get(self.worker_resource, 0)) - encoders)
            workers = max(1, min(limits))
        return replace(
            self,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            gpus_per_encoder=gpus_per_encoder,
            shards_in_flight=self.shards_in_flight or (encoders if split else workers) + 1,
            encoders=encoders,
        )

    def gpu_shares(self, cluster_gpus: float, split: bool) -> tuple[float, float]:
        """(per restorer or pool actor, per encoder): as given, or by the cluster (see the fields)."""
        if self.gpus_per_worker is None and self.gpus_per_encoder is None:
            if cluster_gpus < 1:
                return 0.0, 0.0
            return (0.25, 0.25) if split else (1.0, 0.0)
        return self.gpus_per_worker or 0.0, (self.gpus_per_encoder or 0.0) if split else 0.0

    def uses_gpus(self) -> bool:
        """Resolved resources only: does any model actor hold a GPU share?"""
        return bool(self.gpus_per_worker or self.gpus_per_encoder)  # resolve zeroes a fused job's encoder share


@dataclass(frozen=True)
class DeblurJob:
    input_url: str  # a folder of shards, or a pattern naming some (pipeline/deblur/input_shards.py)
    output_url: str
    restore: RestoreOptions = field(default_factory=RestoreOptions)
    resources: Resources = field(default_factory=Resources)
    routing: Routing = "fused"
    # Frames whose patches are pooled in one call. 0 = by device: 1 on CPU workers, where a larger
    # batch is slower per patch (memory-bound blocks; 8 frames ran at 0.61x of 1, see ARCHITECTURE),
    # 16 on GPU workers, where pooling fills the device.
    frames_per_batch: int = 0
    # > 0: a batch also goes out when its first frame has waited this long (frames read ahead in a
    # thread). Batch composition then depends on timing: pooled results may differ in the last bit.
    flush_timeout_s: float = 0.0
    image_member: str | None = None
    max_frames: int | None = None
    stall_timeout_s: float = 600.0
    take_over: bool = False  # take the output's lease from a run that holds it (the user knows it died)
    lock_stale_s: float = 120.0  # a lease whose heartbeat is older than this is free
    storage_retry_s: float = 60.0  # how long a store that does not answer is retried before the job fails

    def __post_init__(self) -> None:
        _require(self.routing in ("fused", "depth-pools"), "--routing", "'fused' or 'depth-pools'", self.routing)
        _require(self.frames_per_batch >= 0, "--frames-per-batch", ">= 0 (0: by device)", self.frames_per_batch)
        _require(self.flush_timeout_s >= 0, "--flush-timeout", "seconds >= 0 (0: off)", self.flush_timeout_s)
        _require(self.max_frames is None or self.max_frames >= 1, "--max-frames", ">= 1", self.max_frames)
        _require(self.stall_timeout_s > 0, "--stall-timeout", "seconds > 0", self.stall_timeout_s)
        _require(self.lock_stale_s > 0, "lock_stale_s", "seconds > 0", self.lock_stale_s)
        _require(self.storage_retry_s >= 0, "--storage-retry", "seconds >= 0", self.storage_retry_s)

    def stores(self, options: Mapping[str, Any]) -> tuple[Store, Store]:
        """(input, output) stores with the job's retry budget."""
        return (
            Store(split_input(self.input_url)[0], options, self.storage_retry_s),
            Store(self.output_url, options, self.storage_retry_s),
        )

    def shards(self, options: Mapping[str, Any]) -> list[str]:
        """The input shards this job reads: `listing(options).shards`."""
        return self.listing(options).shards

    def listing(self, options: Mapping[str, Any]) -> Listing:
        """The input shards this job reads (`list_shards`), never the output's own (`without_output`),
        and those a folder holds under hidden names; a pattern naming a missing shard, a folder with
        none, or an output over the input raises here."""
        source, output = self.stores(options)
        pattern = split_input(self.input_url)[1]
        found = list_folder(source) if pattern is None else Listing(list_shards(source, pattern))
        shards = without_output(found.shards, source, output)
        if not shards:
            raise NotFound(
                f"{redact(self.input_url)}: every shard it names is in the output folder {redact(self.output_url)}; "
                "name the input shards, not the deblurred ones"
            )
        return replace(found, shards=shards)

    def made_with(self, fingerprint: str, config: AdaRevDConfig) -> dict[str, Any]:
        """What decides an output frame's pixels, recorded in each manifest: a resume must not mix
        outputs made otherwise. The weights' tensors (`fingerprint`) and the model's config (its exit
        table: a re-calibrated file has the same tensors). Batch size, routing and resources are left
        out: they move only the last bit of float rounding, and a run may resume on other hardware."""
        r = self.restore
        return {
            "model_fingerprint": fingerprint,
            "model_config": json.loads(config.to_json()),
            "exit": r.exit,
            "encoder_mode": r.encoder_mode,
            "precision": r.precision,
            "jpeg_quality": r.jpeg_quality,
            "blend": r.blend,
            "image_member": self.image_member,
        }

    def task(
        self, shard: str, index: int, *, made_with: Mapping[str, Any], run_id: str, max_frames: int | None
    ) -> ShardTask:
        """Shard `shard`'s work in this run (the `index`-th handed out); `made_with`: `made_with(...)`;
        `max_frames`: the budget left."""
        return ShardTask(
            shard=shard,
            index=index,
            frames_per_batch=self.batch_frames(),
            flush_s=self.flush_timeout_s,
            image_member=self.image_member,
            fingerprint=made_with["model_fingerprint"],
            run_id=run_id,
            max_frames=max_frames,
            made_with=made_with,
        )

    def batch_frames(self) -> int:
        """Frames per call; on a resolved job (`resolved`), the default follows the actors' device."""
        return self.frames_per_batch or (16 if self.resources.uses_gpus() else 1)

    def resolved(self, cluster: Mapping[str, float]) -> DeblurJob:
        """This job with its resources decided for the cluster (`Resources.resolve`), and its precision
        where that is decided by them (`RestoreOptions.precision_on`)."""
        resources = self.resources.resolve(cluster, self.routing)
        return replace(self, resources=resources, restore=self.restore.precision_on(gpus=resources.uses_gpus()))
