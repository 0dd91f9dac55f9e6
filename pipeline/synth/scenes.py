"""Sharp scenes for synthetic blur: real photos that installed packages ship (they work offline).

scikit-image ships most of them; matplotlib (a dependency for the report) ships `grace_hopper`.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from adarevd.errors import InvalidInput


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()

    return load


def _motorcycle(view: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return data.stereo_motorcycle()[view]

    return load


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook
    import matplotlib.image

    return matplotlib.image.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


_SKIMAGE = (
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
    "cell",
)
# The bundled ones that need no download; eagle, skin and others would fetch from the network.
_LOADERS: dict[str, Callable[[], np.ndarray]] = {name: _skimage(name) for name in _SKIMAGE} | {
    "motorcycle_left": _motorcycle(0),
    "motorcycle_right": _motorcycle(1),  # the same scene as motorcycle_left: keep both in one split
    "grace_hopper": _grace_hopper,
}
SAMPLE_IMAGES = tuple(_LOADERS)


def load_sample(name: str, max_side: int = 512) -> np.ndarray:
    """A sample image as (H, W, 3) uint8 RGB, its longer side at most max_side."""
    if name not in _LOADERS:
        raise InvalidInput(f"unknown sample image {name!r}; choose from {', '.join(SAMPLE_IMAGES)}")
    image = _LOADERS[name]()
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
