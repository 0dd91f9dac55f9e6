"""Sharp scenes for synthetic blur: the sample images scikit-image ships (they work offline)."""

from __future__ import annotations

import cv2
import numpy as np

# The bundled ones that need no download; eagle, skin and others would fetch from the network.
SAMPLE_IMAGES = (
    "astronaut",
    "coffee",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
    "camera",
    "brick",
    "grass",
    "gravel",
    "coins",
    "moon",
    "page",
    "chelsea",
    "rocket",
)


def load_sample(name: str, max_side: int = 512) -> np.ndarray:
    """A scikit-image sample image as (H, W, 3) uint8 RGB, its longer side at most max_side."""
    from skimage import data

    if name not in SAMPLE_IMAGES:
        raise ValueError(f"unknown sample image {name!r}; choose from {', '.join(SAMPLE_IMAGES)}")
    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = (image.astype(np.float64) / image.max() * 255).round().astype(np.uint8)
    scale = max_side / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def fit(image: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random (h, w) crop, after scaling the image up if it is smaller than that."""
    h, w = size
    scale = max(h / image.shape[0], w / image.shape[1], 1.0)
    if scale > 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        image = image[: max(h, image.shape[0]), : max(w, image.shape[1])]
    y = int(rng.integers(0, image.shape[0] - h + 1))
    x = int(rng.integers(0, image.shape[1] - w + 1))
    return np.ascontiguousarray(image[y : y + h, x : x + w])
