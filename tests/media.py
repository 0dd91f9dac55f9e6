"""Small real media files for tests (videos written with OpenCV), and reading shards back."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.formats.shards import iter_samples
from pipeline.store.storage import Store


def read_samples(store: Store) -> dict[str, dict[str, bytes]]:
    """key -> members of every sample in the store's top-level .tar shards."""
    out = {}
    for name in store.glob("*.tar"):
        with store.open(name) as stream:
            out.update({s.key: dict(s.members) for s in iter_samples(stream, name)})
    return out


def frames(count: int, height: int = 48, width: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Distinct (H, W, 3) uint8 BGR frames: noise over a moving gradient."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    return [
        np.clip(np.roll(ramp, 3 * i, axis=1) + rng.integers(0, 55, (height, width, 3)), 0, 255).astype(np.uint8)
        for i in range(count)
    ]


def write_video(path: Path, pictures: list[np.ndarray], fps: float = 10.0) -> Path:
    """FFV1 in .mkv (lossless: decodes back bit-exactly), mp4v in .mp4."""
    fourcc = {".mkv": "FFV1", ".mp4": "mp4v", ".avi": "MJPG"}[path.suffix]
    height, width = pictures[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for picture in pictures:
        writer.write(picture)
    writer.release()
    return path


def decode_video(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, picture = capture.read()
        if not ok:
            return out
        out.append(picture)
