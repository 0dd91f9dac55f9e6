"""Fused restorers vs a split encode -> decoder-pool pipeline, end to end on Ray, same frames.

- fused (what `adarevd deblur` runs): N restorer actors; each takes RGB frames and runs encoder,
  classifier, every depth of its patches, and stitching. Only RGB crosses processes.
- split: one encode+classify actor ships each frame's patch features (e0..e4, fp32) and exit depths
  through the object store to a pool of decoder actors (columns + heads, the patches of a frame
  pooled); the driver stitches the residuals. The pool gets the CPUs the encoder does not need
  (decoding is about 10x the encoder's work here), i.e. pools sized from the work per depth.

- depth pools (the design sketch's literal dataflow): the encode+classify actor returns each frame's
  patch features already split by exit depth, one object per depth; the driver routes them, without
  fetching them, to depth-specific pools, pooling the depth-d patches of `--window` frames into one
  call; a depth-d actor runs columns 1..d on its patches. Pools are sized from the work per depth
  (patches x depth) of the exit mix observed so far, re-balanced every window; the driver stitches.

All use one torch thread per actor and the bundled tiny weights with adaptive exit, on a 320x240
clip; frames/s over the same frames, measured in one run.

    python -m benchmarks.routing_split [--frames 48 --decoders 2 --window 4]
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
from pipeline import deblur
from pipeline.scenes import load_sample
from pipeline.synth import synthesize_clip


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


@ray.remote(num_cpus=0.5)
class DepthEncoder:
    """Encode + classify; the patch features come back as one object per exit depth 1..N."""

    def __init__(self) -> None:
        self.model = load_model()

    def encode(self, rgb: np.ndarray) -> list:
        model = self.model
        with torch.no_grad():
            padded = model.pad(to_tensor(rgb))
            features = model.cut(model.encode(padded), model.grid(*padded.shape[-2:]))
            depths = model.exit_depths(model.classify(features))
        groups = [[f[depths == d].numpy() for f in features] for d in range(1, model.num_columns + 1)]
        return [depths.numpy(), *groups]


@ray.remote(num_cpus=0.5)
class DepthDecoder:
    """Any depth: runs columns 1..d over the pooled depth-d patches of several frames."""

    def __init__(self) -> None:
        self.model = load_model()

    def decode(self, depth: int, *groups: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(g[0]) for g in groups]
        features = [torch.from_numpy(np.concatenate([g[level] for g in groups])) for level in range(len(groups[0]))]
        with torch.no_grad():
            x, state = self.model.initial_state(features)
            residual = self.model.decode(x, state, torch.full((sum(sizes),), depth, dtype=torch.long))
        return [r.numpy() for r in residual.split(sizes)]


def pool_sizes(work: list[float], actors: int) -> list[int]:
    """Actors per depth 1..N in proportion to the work (patches x depth), every depth with work at least 1."""
    active = [d for d, w in enumerate(work) if w > 0]
    sizes = [0] * len(work)
    for d in active:
        sizes[d] = 1
    for _ in range(actors - len(active)):
        d = max(active, key=lambda i: work[i] / sizes[i])
        sizes[d] += 1
    return sizes


def run_depth_pools(
    frames: list[np.ndarray], decoders: int, window: int, model: adarevd.AdaRevD
) -> tuple[float, list[list[int]], np.ndarray]:
    """Seconds, actors per depth of each window, and the first frame's output (checked by main)."""
    n = model.num_columns
    encoder = DepthEncoder.remote()
    actors = [DepthDecoder.remote() for _ in range(decoders)]

    def encode(chunk: list[np.ndarray]) -> list:
        return [encoder.encode.options(num_returns=n + 1).remote(f) for f in chunk]

    warm = encode(frames[:1])[0]
    deepest = int(ray.get(warm[0]).max())
    ray.get([a.decode.remote(deepest, warm[deepest]) for a in actors])  # all up and warm
    work = [0.0] * n
    layouts: list[list[int]] = []
    first = np.zeros(0)
    windows = [frames[b : b + window] for b in range(0, len(frames), window)]
    start = time.perf_counter()
    upcoming = encode(windows[0])
    for w, chunk in enumerate(windows):
        encoded, upcoming = upcoming, encode(windows[w + 1]) if w + 1 < len(windows) else []  # encode ahead
        depths = ray.get([e[0] for e in encoded])
        for d in depths:  # the observed exit mix: work per depth = patches x depth
            for k in range(1, n + 1):
                work[k - 1] += float((d == k).sum()) * k
        sizes = pool_sizes(work, len(actors)) if len(actors) >= sum(x > 0 for x in work) else [1] * n
        layouts.append(sizes)
        # Depth k's pool is the next sizes[k-1] actors; each call pools the depth-k patches of its frames.
        calls, turn = {}, 0
        for k in range(1, n + 1):
            members = [i for i, d in enumerate(depths) if (d == k).any()]
            if not members:
                continue
            pool = [actors[(turn + j) % len(actors)] for j in range(max(1, sizes[k - 1]))]
            turn += max(1, sizes[k - 1])
            per = -(-len(members) // len(pool))
            for j, actor in enumerate(pool):
                part = members[j * per : (j + 1) * per]
                if part:
                    calls[(k, tuple(part))] = actor.decode.remote(k, *[encoded[i][k] for i in part])
        residuals: dict[int, dict[int, np.ndarray]] = {i: {} for i in range(len(chunk))}
        for (k, part), ref in calls.items():
            for i, r in zip(part, ray.get(ref), strict=True):
                residuals[i][k] = r
        for i, frame in enumerate(chunk):
            out = stitch_groups(model, frame, depths[i], residuals[i])
            first = out if w == 0 and i == 0 else first
    seconds = time.perf_counter() - start
    for a in [encoder, *actors]:
        ray.kill(a)
    return seconds, layouts, first


def stitch_groups(
    model: adarevd.AdaRevD, rgb: np.ndarray, depths: np.ndarray, groups: dict[int, np.ndarray]
) -> np.ndarray:
    image = to_tensor(rgb)
    padded = model.pad(image)
    grid = model.grid(*padded.shape[-2:])
    residual = torch.zeros(len(depths), 3, grid.size_h, grid.size_w)
    for k, r in groups.items():
        residual[torch.from_numpy(depths == k)] = torch.from_numpy(r)
    h, w = image.shape[-2:]
    out = (model.stitch(residual, grid)[..., :h, :w] + image).clamp(0, 1)
    return out[0].mul(255).round().byte().permute(1, 2, 0).numpy()


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
    p.add_argument("--window", type=int, default=4, help="frames whose depth-d patches share a call")
    args = p.parse_args()
    cpus = os.cpu_count() or 1
    clip = synthesize_clip(load_sample("astronaut"), 11, frames=args.frames, size=(240, 320))
    frames = [blurry for blurry, _ in clip]
    model = load_model()
    deblur.ensure_ray(None, num_cpus=cpus)
    try:
        fused = run_fused(frames, workers=cpus)
        split = run_split(frames, args.decoders, model)
        pools, layouts, first = run_depth_pools(frames, args.decoders + 1, args.window, model)
    finally:
        ray.shutdown()
    with torch.no_grad():
        reference = model.restore(to_tensor(frames[0])).images[0].mul(255).round().byte().permute(1, 2, 0).numpy()
    difference = int(np.abs(first.astype(int) - reference).max())
    assert difference <= 1, f"the depth-pool pipeline's output is off by {difference} levels"
    write(
        "routing_split",
        {
            "frames": args.frames,
            "size": "320x240",
            "fused": {"actors": cpus, "fps": round(args.frames / fused, 3)},
            "split": {"encoders": 1, "decoders": args.decoders, "fps": round(args.frames / split, 3)},
            "fused_over_split": round(split / fused, 3),
            "depth_pools": {
                "encoders": 1,
                "decoder_actors": args.decoders + 1,
                "window_frames": args.window,
                "fps": round(args.frames / pools, 3),
                "actors_per_depth_last_window": layouts[-1],
            },
            "fused_over_depth_pools": round(pools / fused, 3),
            "depth_pools_max_difference_vs_restore": difference,
        },
    )


if __name__ == "__main__":
    main()
