"""Inputs and helpers shared by the deblur job tests (real shards, the bundled tiny weights)."""

from __future__ import annotations

import glob
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import ray
import torch

import adarevd
from adarevd.calibration import with_exit_table
from jobs.cli import DEFAULT_WEIGHTS
from pipeline.formats import images
from pipeline.formats.shards import Sample, encode_shard
from pipeline.formats.sink import ShardLimits
from pipeline.ingest.run import IngestConfig, ingest
from pipeline.store.scratch import pattern
from pipeline.store.storage import Store
from tests.media import frames, read_samples, write_video


@dataclass(frozen=True)
class Model:
    model: adarevd.AdaRevD
    fingerprint: str


def bundled_model() -> Model:
    model = adarevd.AdaRevD(adarevd.read_config(DEFAULT_WEIGHTS))
    adarevd.load_weights(model, DEFAULT_WEIGHTS)
    return Model(model.eval(), adarevd.fingerprint(model))


def routing_model() -> Model:
    """The bundled weights with an exit table that sends every class to depth 2, 3 or 4 (the classes the
    bundled classifier uses, 0, 1, 4 and 5, to 4, 3, 2 and 3). The bundled table gives every class
    depth 0 (do no harm), which leaves the depth pools no work; these tests need work at depth 3."""
    model = with_exit_table(bundled_model().model, (4, 3, 4, 4, 2, 3)).eval()
    return Model(model, adarevd.fingerprint(model))


def make_input(folder: Path, store: Store) -> dict[str, np.ndarray]:
    """Two video shards (7 frames, 4 per shard) and an image-dataset shard with labels, odd sizes, a
    1x1 and a 17x23 frame. Returns key -> input RGB."""
    video = write_video(folder / "street.mkv", frames(7, height=72, width=88, seed=5))
    ingest([str(video)], store, IngestConfig(prefix="video", limits=ShardLimits(max_samples=4)))
    rng = np.random.default_rng(9)
    pictures = {
        "img_a": cv2.GaussianBlur(rng.integers(0, 256, (61, 97, 3), dtype=np.uint8), (0, 0), 2),
        "img_tiny": rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
        "img_odd": rng.integers(0, 256, (17, 23, 3), dtype=np.uint8),
    }
    samples = [
        Sample(
            key,
            {
                "jpg" if key == "img_a" else "png": images.encode(
                    rgb[..., ::-1].copy(), "jpg" if key == "img_a" else "png"
                ),
                "cls": str(i).encode(),
                "txt": f"caption {i}".encode(),
            },
        )
        for i, (key, rgb) in enumerate(pictures.items())
    ]
    store.commit_bytes("images-000000.tar", encode_shard(samples))
    return {key: pixels(members).copy() for key, members in read_samples(store).items()}


def input_shards(factory: pytest.TempPathFactory, name: str) -> tuple[Store, dict[str, np.ndarray]]:
    """`make_input` in a fresh temporary folder: the shards' store and key -> input RGB."""
    folder = factory.mktemp(name)
    store = Store(str(folder / "shards"))
    return store, make_input(folder, store)


def tar_bytes(store: Store) -> dict[str, bytes]:
    return {name: store.read_bytes(name) for name in store.glob("*.tar")}


def restore_u8(model: adarevd.AdaRevD, rgb: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model.restore(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255).images[0]
    return out.mul(255).round().byte().permute(1, 2, 0).numpy()


def pixels(members: dict[str, bytes]) -> np.ndarray:
    member = "jpg" if "jpg" in members else "png"
    return cv2.imdecode(np.frombuffer(members[member], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]


def run_record(store: Store) -> dict:
    return json.loads(store.read_bytes("_run.json"))


def shard_work_started(before: set[str], timeout: float = 60.0) -> bool:
    """Wait until a shard worker opens a local output folder not in `before` (the actors are up and the
    first batch is on its way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(glob.glob(pattern("deblur"))) - before:
            return True
        time.sleep(0.02)
    return False


class ActorKiller:
    """Kills one actor per name prefix, in order, once shard work has started, each with Ray's restart
    allowed; `mid_run` says whether the run was still going at every kill."""

    def __init__(self, *prefixes: str, pause: float = 0.3) -> None:
        self.prefixes, self.pause = prefixes, pause
        self.killed: list[str] = []
        self.finished = threading.Event()
        self.mid_run = True
        self.before = set(glob.glob(pattern("deblur")))
        self.thread = threading.Thread(target=self._kill)

    def __enter__(self) -> ActorKiller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finished.set()
        self.thread.join()

    def _kill(self) -> None:
        if not shard_work_started(self.before):
            return
        for prefix in self.prefixes:
            time.sleep(self.pause)
            names: list[str] = []
            while not names and not self.finished.is_set():  # an actor Ray is restarting is not listed
                names = sorted(n for n in ray.util.list_named_actors() if n.startswith(prefix))
                time.sleep(0 if names else 0.05)
            if not names:
                return
            self.mid_run = self.mid_run and not self.finished.is_set()
            ray.kill(ray.get_actor(names[0]), no_restart=False)
            self.killed.append(names[0])
