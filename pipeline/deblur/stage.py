"""AdaRevD as a stage of a Ray Data pipeline: a callable class for `Dataset.map_batches`.

    import ray
    from pipeline import Deblur

    ds = ray.data.read_images("s3://bucket/frames/", mode="RGB")
    ds = ds.map_batches(Deblur, batch_format="numpy", batch_size=8, concurrency=2,
                        fn_constructor_kwargs={"exit": "adaptive", "precision": "auto"})
    ds.write_images("s3://bucket/deblurred/", column="image", file_format="png")

Ray Data builds one `Deblur` per actor of the pool (the model loads once an actor) and calls it with
batches: a column `image` of (H, W, 3) uint8 RGB arrays, any sizes in one batch. It returns the batch
with `image` deblurred and a column `exit_depth_mean` (the mean exit depth of the frame's patches).
Grey (H, W) and RGBA images come out RGB. The frames go through the deblur job's own restorer, so a
frame comes out as `adarevd deblur` writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from adarevd.errors import InvalidInput

IMAGE_COLUMN = "image"
DEPTH_COLUMN = "exit_depth_mean"


class Deblur:
    """Deblur the `image` column of a batch (see the module). Defaults: the bundled adarevd-tiny."""

    def __init__(
        self,
        *,
        model: str | None = None,
        weights: Sequence[str] = (),
        device: str = "auto",
        storage_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        """`model`: a preset (default: the weights file's own, else adarevd-tiny); `weights`: files or
        URLs as for `--weights` (URL#sha256=... cached and verified); `device`: "auto" (CUDA when this
        actor has a GPU), "cpu", "cuda", ...; `storage_options`: fsspec options for weights URLs.
        `options`: fields of `RestoreOptions`: exit ("adaptive" or a fixed depth), precision ("auto": bf16
        on CUDA with bf16 tensor cores, else fp32; "fp32"; "bf16"), encoder_mode, blend, max_frame_pixels,
        threads, compile ("on": torch.compile; "auto" and "off": eager)."""
        import dataclasses

        import torch

        from adarevd.loading import load_model
        from pipeline.deblur.job import RestoreOptions
        from pipeline.deblur.restorer import FrameRestorer
        from pipeline.store.weights_cache import local_weights

        known = {f.name for f in dataclasses.fields(RestoreOptions)} - {"jpeg_quality"}
        if unknown := sorted(set(options) - known):
            raise InvalidInput(f"Deblur: unknown option(s) {unknown}; known: {sorted(known)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        restore = RestoreOptions(**options)
        loaded, _, _ = load_model(model, local_weights(weights, storage_options), device)
        restore.check_model(loaded.num_columns)
        self.restorer = FrameRestorer(loaded, restore, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if IMAGE_COLUMN not in batch:
            raise InvalidInput(f"the batch has no {IMAGE_COLUMN!r} column (it has {sorted(batch)}); name it so")
        images = [_rgb(image, i) for i, image in enumerate(batch[IMAGE_COLUMN])]
        restored = self.restorer.restore_images(images)
        out = dict(batch)
        out[IMAGE_COLUMN] = _column([rgb for rgb, _ in restored])
        out[DEPTH_COLUMN] = np.array([depth for _, depth in restored], dtype=np.float64)
        return out


def _rgb(image: np.ndarray, index: int) -> np.ndarray:
    """One image as (H, W, 3) uint8 RGB: grey repeated, alpha dropped; anything else is refused."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InvalidInput(f"image {index} of the batch is {image.dtype}; the stage takes uint8 RGB (mode='RGB')")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise InvalidInput(f"image {index} of the batch has shape {image.shape}; the stage takes (H, W, 3) RGB")
    return np.ascontiguousarray(image[..., :3])


def _column(images: list[np.ndarray]) -> np.ndarray:
    """One array when the shapes agree (Ray Data's tensor column), else an object array of arrays."""
    if len({image.shape for image in images}) == 1:
        return np.stack(images)
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return column
