"""Fused restorers vs a split encode -> decoder-pool pipeline, end to end on Ray, same frames.

- fused (what `adarevd deblur` runs): N restorer actors; each takes RGB frames and runs encoder,
  classifier, every depth of its patches, and stitching. Only RGB crosses processes.
- split: one encode+classify actor ships each frame's patch features (e0..e4, fp32) and exit depths
  through the object store to a pool of decoder actors (columns + heads, the patches of a frame
  pooled); the driver stitches the residuals. The pool gets the CPUs the encoder does not need
  (decoding is about 10x the encoder's work here), i.e. pools sized from the work per depth.

The job's own depth-pools layout (`--routing depth-pools`: features split by exit depth, one pool per
depth) is measured against the fused one end to end, with shards in and out, by
`benchmarks/deblur_pipeline.py`.

Both use one torch thread per actor and the bundled tiny weights with adaptive exit, on a 320x240
clip; frames/s over the same frames, measured in one run.

    python -m benchmarks.routing_split [--frames 48 --decoders 2]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import deque

import numpy as np
import ray
import torch

import adarevd
from benchmarks.common import write
from jobs.cli import DEFAULT_WEIGHTS
from pipeline.deblur.ray import driver
from pipeline.synth.blur import synthesize_clip
from pipeline.synth.scenes import load_sample


def load_model() -> adarevd.AdaRevD:
    torch.set_num_threads(1)
    model = adarevd.AdaRevD(adarevd.read_config(DEFAULT_WEIGHTS))
    adarevd.load_weights(model, DEFAULT_WEIGHTS)
    return model.eval()


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() / 255


@ray.remote(num_cpus=0.5)
class Fused:
    def __init__(self) -> None:
        self.model = load_model()

    def restore(self, rgb: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.model.restore(to_tensor(rgb)).images[0]
        return out.mul(255).round().byte().permute(1, 2, 0).numpy()


@ray.remote(num_cpus=0.5)
class Encoder:
    def __init__(self) -> None:
        self.model = load_model()

    def encode(self, rgb: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        model = self.model
        with torch.no_grad():
            padded = model.pad(to_tensor(rgb))
            features = model.cut(model.encode(padded), model.grid(*padded.shape[-2:]))
            depths = model.exit_depths(model.classify(features))
        return [f.numpy() for f in features], depths.numpy()


@ray.remote(num_cpus=0.5)
class Decoder:
    def __init__(self) -> None:
        self.model = load_model()

    def decode(self, encoded: tuple[list[np.ndarray], np.ndarray]) -> np.ndarray:
        features, depths = encoded
        with torch.no_grad():
            feats = [torch.from_numpy(np.array(f)) for f in features]
            residual = self.model.decode(*self.model.initial_state(feats), torch.from_numpy(np.array(depths)))
        return residual.numpy()


def run_fused(frames: list[np.ndarray], workers: int) -> float:
    actors = [Fused.remote() for _ in range(workers)]
    ray.get([a.restore.remote(frames[0]) for a in actors])  # up and warm
    start = time.perf_counter()
    pending: deque = deque()
    for i, frame in enumerate(frames):
        pending.append(actors[i % workers].restore.remote(frame))
        if len(pending) >= 2 * workers:
            ray.get(pending.popleft())
    ray.get(list(pending))
    seconds = time.perf_counter() - start
    for a in actors:
        ray.kill(a)
    return seconds


def run_split(frames: list[np.ndarray], decoders: int, model: adarevd.AdaRevD) -> float:
    encoder = Encoder.remote()
    pool = [Decoder.remote() for _ in range(decoders)]
    ray.get([d.decode.remote(encoder.encode.remote(frames[0])) for d in pool])  # up and warm
    start = time.perf_counter()
    pending: deque = deque()
    for i, frame in enumerate(frames):
        # The features go encoder -> object store -> decoder; the driver only passes the reference.
        pending.append((frame, pool[i % decoders].decode.remote(encoder.encode.remote(frame))))
        if len(pending) >= 2 * decoders + 1:
            stitch(model, *pending.popleft())
    while pending:
        stitch(model, *pending.popleft())
    seconds = time.perf_counter() - start
    for a in [encoder, *pool]:
        ray.kill(a)
    return seconds


def stitch(model: adarevd.AdaRevD, rgb: np.ndarray, residual_ref: object) -> np.ndarray:
    image = to_tensor(rgb)
    padded = model.pad(image)
    grid = model.grid(*padded.shape[-2:])
    h, w = image.shape[-2:]
    out = (model.stitch(torch.from_numpy(ray.get(residual_ref)), grid)[..., :h, :w] + image).clamp(0, 1)
    return out[0].mul(255).round().byte().permute(1, 2, 0).numpy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--decoders", type=int, default=2)
    args = p.parse_args()
    cpus = os.cpu_count() or 1
    clip = synthesize_clip(load_sample("astronaut"), 11, frames=args.frames, size=(240, 320))
    frames = [blurry for blurry, _ in clip]
    model = load_model()
    driver.ensure_ray(None, num_cpus=cpus)
    try:
        fused = run_fused(frames, workers=cpus)
        split = run_split(frames, args.decoders, model)
    finally:
        ray.shutdown()
    write(
        "routing_split",
        {
            "frames": args.frames,
            "size": "320x240",
            "fused": {"actors": cpus, "fps": round(args.frames / fused, 3)},
            "split": {"encoders": 1, "decoders": args.decoders, "fps": round(args.frames / split, 3)},
            "fused_over_split": round(split / fused, 3),
        },
    )


if __name__ == "__main__":
    main()
