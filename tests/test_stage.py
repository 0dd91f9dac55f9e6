"""`from pipeline import Deblur` as a stage of a real Ray Data pipeline (an actor pool on a local Ray):
the same pixels as `adarevd deblur` writes for the same frames."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

import adarevd
from adarevd.errors import InvalidInput
from jobs.cli import main
from pipeline.formats import images
from pipeline.formats.shards import Sample, encode_shard
from pipeline.store.storage import Store
from tests.deblur_setup import pixels, routing_model
from tests.media import read_samples

pytestmark = pytest.mark.ray


def pictures() -> dict[str, np.ndarray]:
    """Frames of several sizes, photo-like (smooth), one smaller than a patch."""
    rng = np.random.default_rng(4)
    sizes = {"a": (72, 88), "b": (61, 97), "c": (72, 88), "d": (17, 23), "e": (130, 100)}
    return {k: cv2.GaussianBlur(rng.integers(0, 256, (*s, 3), dtype=np.uint8), (0, 0), 1.5) for k, s in sizes.items()}


def test_the_ray_data_stage_gives_the_pixels_of_the_deblur_job(local_ray: None, tmp_path: Path) -> None:
    import ray

    from pipeline import Deblur

    weights = tmp_path / "routing.safetensors"  # weights that change pixels (the bundled ones leave them be)
    adarevd.save_weights(routing_model().model, weights)
    frames = pictures()
    source = Store(str(tmp_path / "in"))
    samples = [Sample(k, {"png": images.encode(rgb[..., ::-1].copy())}) for k, rgb in frames.items()]
    source.commit_bytes("f-000000.tar", encode_shard(samples))
    assert main(["deblur", source.url, str(tmp_path / "out"), "--weights", str(weights), "--workers", "1"]) == 0
    by_job = {key: pixels(members) for key, members in read_samples(Store(str(tmp_path / "out"))).items()}

    dataset = ray.data.from_items([{"key": k, "image": rgb} for k, rgb in frames.items()])
    rows = dataset.map_batches(
        Deblur,
        fn_constructor_kwargs={"weights": [str(weights)], "device": "cpu"},
        batch_format="numpy",
        batch_size=2,
        concurrency=2,  # an actor pool: each actor loads the model once
        num_cpus=1,
    ).take_all()
    assert sorted(r["key"] for r in rows) == sorted(frames)
    for row in rows:
        got, key = row["image"], row["key"]
        assert got.shape == frames[key].shape and got.dtype == np.uint8
        assert np.abs(got.astype(int) - by_job[key].astype(int)).max() <= 1, key
        assert not np.array_equal(got, frames[key]) or key == "d"  # deblurred, not passed through
        assert 0 <= row["exit_depth_mean"] <= 4
    changed = sum(not np.array_equal(r["image"], frames[r["key"]]) for r in rows)
    assert changed >= 4


def test_the_stage_takes_grey_and_rgba_and_refuses_what_is_not_an_image() -> None:
    from pipeline import Deblur

    stage = Deblur(device="cpu")
    rng = np.random.default_rng(0)
    grey, rgba = rng.integers(0, 256, (20, 30), dtype=np.uint8), rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    column = np.empty(2, dtype=object)
    column[:] = [grey, rgba]
    out = stage({"image": column, "label": np.array([3, 4])})
    assert [i.shape for i in out["image"]] == [(20, 30, 3), (20, 30, 3)] and out["label"].tolist() == [3, 4]
    assert out["exit_depth_mean"].shape == (2,)
    with pytest.raises(InvalidInput, match=r"image 0 of the batch is float32"):
        stage({"image": np.zeros((1, 8, 8, 3), np.float32)})
    with pytest.raises(InvalidInput, match=r"no 'image' column \(it has \['img'\]\)"):
        stage({"img": np.zeros((1, 8, 8, 3), np.uint8)})


def test_the_stage_names_an_option_it_does_not_know() -> None:
    from pipeline import Deblur

    with pytest.raises(InvalidInput, match=r"unknown option\(s\) \['exits'\]; known: \["):
        Deblur(exits=2)
    assert Deblur(exit=2, precision="fp32", device="cpu").restorer.options.exit == 2
