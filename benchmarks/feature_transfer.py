"""What a split pipeline would ship: a patch's feature pyramid between two Ray actors, vs its RGB.

The restorer runs all depths of its batch itself, so only RGB frames cross between processes. A
split into encode actors and depth pools would ship each patch's encoder features (e0..e4) from the
encoder to the pool instead. This measures that hop on this machine (actor -> object store -> actor,
median of repeats) for the bundled tiny model's 320x240 frame (its real patch grid and widths) and
for one 384-pixel patch of the paper's models (width 64), next to the tiny model's compute per frame.

    python -m benchmarks.feature_transfer [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ray
import torch

import adarevd
from benchmarks.common import write
from jobs.cli import DEFAULT_WEIGHTS
from pipeline.deblur.ray import driver


def pyramid(width: int, patch: int, patches: int, dtype: type) -> list[np.ndarray]:
    """Encoder features of `patches` patches: level l has width*2^l channels at patch/2^l pixels."""
    return [np.ones((patches, width * 2**level, patch // 2**level, patch // 2**level), dtype) for level in range(5)]


@ray.remote(num_cpus=0)
class Producer:
    def __init__(self) -> None:
        self.payloads: dict[str, list[np.ndarray]] = {}

    def prepare(self, name: str, arrays: list[tuple[tuple[int, ...], str]]) -> int:
        self.payloads[name] = [np.ones(shape, dtype) for shape, dtype in arrays]
        return sum(a.nbytes for a in self.payloads[name])

    def send(self, name: str) -> list[np.ndarray]:
        return self.payloads[name]


@ray.remote(num_cpus=0)
class Consumer:
    def receive(self, arrays: list[np.ndarray]) -> float:
        return float(sum(a.reshape(-1)[0] for a in arrays))  # touch every array


def transfer_seconds(producer: object, consumer: object, name: str, repeats: int) -> float:
    samples = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        ray.get(consumer.receive.remote(producer.send.remote(name)))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    model = adarevd.AdaRevD(adarevd.read_config(DEFAULT_WEIGHTS))
    adarevd.load_weights(model, DEFAULT_WEIGHTS)
    model.eval()
    frame = torch.rand(1, 3, 240, 320)
    with torch.no_grad():
        model.restore(frame)
        start = time.perf_counter()
        for _ in range(args.repeats):
            model.restore(frame)
    compute = (time.perf_counter() - start) / args.repeats
    cfg = model.config
    patches = model.grid(*model.pad(frame).shape[-2:]).num_patches

    tiny = pyramid(cfg.width, cfg.patch_size, patches, np.float32)
    payloads = {
        "tiny_frame_rgb": [((240, 320, 3), "uint8")],
        "tiny_frame_features_fp32": [(a.shape, "float32") for a in tiny],
        "paper_patch384_rgb": [((384, 384, 3), "uint8")],
        "paper_patch384_features_fp16": [(a.shape, "float16") for a in pyramid(64, 384, 1, np.float16)],
    }
    driver.ensure_ray(None)
    try:
        producer, consumer = Producer.remote(), Consumer.remote()
        sizes = {name: ray.get(producer.prepare.remote(name, arrays)) for name, arrays in payloads.items()}
        seconds = {name: transfer_seconds(producer, consumer, name, args.repeats) for name in payloads}
        write(
            "feature_transfer",
            {
                "tiny_model": {"frame": "320x240", "patches": patches, "compute_s_per_frame": round(compute, 4)},
                "bytes": sizes,
                "transfer_ms": {k: round(v * 1e3, 2) for k, v in seconds.items()},
                "tiny_features_transfer_vs_compute": round(seconds["tiny_frame_features_fp32"] / compute, 4),
                "features_vs_rgb_bytes": {
                    "tiny_frame": round(sizes["tiny_frame_features_fp32"] / sizes["tiny_frame_rgb"], 1),
                    "paper_patch384": round(sizes["paper_patch384_features_fp16"] / sizes["paper_patch384_rgb"], 1),
                },
            },
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
