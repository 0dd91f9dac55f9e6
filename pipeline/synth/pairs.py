"""`adarevd synth`: paired (blurry, sharp) training shards and a blurry demo clip, reproducibly.

Each sample is a random crop of a scikit-image scene blurred by `pipeline.synth.blur` with its own seed
(`seed + i`), stored as `blur.png` + `sharp.png` + `json` (scene, seed, N, camera trajectory, object
path, PSNR of the whole frame and of each patch). Same options, same bytes. `write_clip` makes a
blurry video from one continuous camera path over a scene (the bundled demo clip).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from adarevd.errors import InvalidInput
from adarevd.metrics import psnr_uint8
from pipeline.formats import images
from pipeline.formats.sharded_run import ShardedOutput, ShardedRun
from pipeline.formats.shards import Sample, check_key
from pipeline.formats.sink import ShardLimits
from pipeline.formats.video import write_video
from pipeline.ingest.run import INDEX_NAME
from pipeline.store.scratch import scratch
from pipeline.store.storage import Store
from pipeline.synth.blur import BlurSpec, synthesize_clip, synthesize_pair
from pipeline.synth.scenes import SAMPLE_IMAGES, fit, load_sample


@dataclass(frozen=True)
class SynthConfig:
    count: int = 64
    size: tuple[int, int] = (256, 256)  # (height, width)
    seed: int = 0
    scenes: tuple[str, ...] = SAMPLE_IMAGES
    spec: BlurSpec = field(default_factory=BlurSpec)
    jpeg_quality: int | None = None  # JPEG-compress the blurry frame (archive footage is rarely lossless)
    patch_size: int = 64  # for the per-patch PSNR grid
    prefix: str = "pairs"
    limits: ShardLimits = field(default_factory=ShardLimits)

    def __post_init__(self) -> None:
        if self.count < 1 or min(self.size) < 8 or self.patch_size < 1:
            raise InvalidInput(f"synth needs count >= 1, size >= 8 and patch size >= 1, got {self}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise InvalidInput(f"JPEG quality must be 1..100, got {self.jpeg_quality}")
        unknown = sorted(set(self.scenes) - set(SAMPLE_IMAGES))
        if unknown or not self.scenes:
            raise InvalidInput(f"unknown scene(s) {unknown or '(none given)'}; choose from {', '.join(SAMPLE_IMAGES)}")
        check_key(self.prefix)


def patch_psnr(a: np.ndarray, b: np.ndarray, size: int) -> list[list[float]]:
    """PSNR of each size x size tile (edge tiles smaller), row by row."""
    rows = []
    for y in range(0, a.shape[0], size):
        rows.append(
            [
                round(psnr_uint8(a[y : y + size, x : x + size], b[y : y + size, x : x + size]), 3)
                for x in range(0, a.shape[1], size)
            ]
        )
    return rows


def degrade_jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(images.encode(rgb[..., ::-1].copy(), "jpg", quality), np.uint8), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[..., ::-1])


def pair_sample(i: int, config: SynthConfig, scenes: dict[str, np.ndarray]) -> Sample:
    seed = config.seed + i
    name = config.scenes[i % len(config.scenes)]
    sharp_scene = fit(scenes[name], config.size, np.random.default_rng([config.seed, i]))
    pair = synthesize_pair(sharp_scene, seed, config.spec)
    blurry = pair.blurry if config.jpeg_quality is None else degrade_jpeg(pair.blurry, config.jpeg_quality)
    meta = {
        "scene": name,
        "seed": seed,
        "sub_frames": config.spec.sub_frames,
        "spec": asdict(config.spec),
        "jpeg_quality": config.jpeg_quality,
        "camera": np.round(pair.camera, 4).tolist(),  # per sub-frame: dx, dy, rotation deg, zoom
        "object_path": None if pair.object_path is None else np.round(pair.object_path, 3).tolist(),
        "object_size": pair.object_size,
        "width": config.size[1],
        "height": config.size[0],
        "psnr": round(psnr_uint8(blurry, pair.sharp), 4),
        "patch_size": config.patch_size,
        "patch_psnr": patch_psnr(blurry, pair.sharp, config.patch_size),
    }
    return Sample(
        f"synth-s{config.seed}_{i:06d}",
        {
            "blur.png": images.encode(np.ascontiguousarray(blurry[..., ::-1])),
            "sharp.png": images.encode(np.ascontiguousarray(pair.sharp[..., ::-1])),
            "json": json.dumps(meta, sort_keys=True).encode(),
        },
    )


def write_pairs(
    output: Store,
    config: SynthConfig,
    progress: Callable[[int], None] | None = None,
    *,
    overwrite: bool = False,
    take_over: bool = False,
) -> list[str]:
    """Write `config.count` pairs as shards + an index, holding `output`'s lease; returns the shard
    names. An output holding an earlier set is refused unless `overwrite` (then its shards are
    replaced, none left over)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = ShardedOutput(
        output=output,
        prefix=config.prefix,
        kind="synth",
        limits=config.limits,
        overwrite=overwrite,
        take_over=take_over,
        earlier_index=INDEX_NAME,
    )
    with ShardedRun(spec) as run, scratch("index") as tmp:
        scenes = {name: load_sample(name) for name in dict.fromkeys(config.scenes)}
        rows = []
        for i in range(config.count):
            sample = pair_sample(i, config, scenes)
            meta = json.loads(sample.members["json"])
            shard = run.add(sample)
            rows.append(
                {"shard": shard, "key": sample.key, "scene": meta["scene"], "seed": meta["seed"], "psnr": meta["psnr"]}
            )
            if progress:
                progress(1)
        local = os.path.join(tmp, INDEX_NAME)
        pq.write_table(pa.Table.from_pylist(rows), local)
        return run.finish(INDEX_NAME, local)


@dataclass(frozen=True)
class ClipConfig:
    scene: str = "astronaut"
    frames: int = 48
    fps: float = 12.0
    size: tuple[int, int] = (240, 320)  # (height, width)
    seed: int = 0
    spec: BlurSpec = field(default_factory=BlurSpec)


def write_clip(path: Path, config: ClipConfig, sharp_path: Path | None = None) -> int:
    """A blurry video (and optionally its sharp ground truth) from one continuous camera path."""
    clip = synthesize_clip(
        load_sample(config.scene), config.seed, frames=config.frames, size=config.size, spec=config.spec
    )
    if sharp_path is not None:
        write_video(sharp_path, (sharp for _, sharp in clip), fps=config.fps)
    return write_video(path, (blurry for blurry, _ in clip), fps=config.fps)
