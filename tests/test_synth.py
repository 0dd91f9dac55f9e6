from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from pipeline.synth import BlurSpec, linear_to_srgb, srgb_to_linear, synthesize


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[::4, ::4])  # 128 x 128


def test_same_seed_same_bytes_and_seeds_differ(image: np.ndarray) -> None:
    a_blurry, a_sharp = synthesize(image, seed=3)
    b_blurry, b_sharp = synthesize(image, seed=3)
    assert a_blurry.tobytes() == b_blurry.tobytes() and a_sharp.tobytes() == b_sharp.tobytes()
    c_blurry, _ = synthesize(image, seed=4)
    assert c_blurry.tobytes() != a_blurry.tobytes()
    assert a_blurry.shape == image.shape and a_blurry.dtype == np.uint8


def test_no_motion_gives_back_the_image(image: np.ndarray) -> None:
    still = BlurSpec(max_pan=0, max_rotation_deg=0, max_zoom=0, shake=0, object_probability=0)
    blurry, sharp = synthesize(image, seed=0, spec=still)
    assert np.abs(blurry.astype(int) - image).max() <= 1
    assert np.abs(sharp.astype(int) - image).max() <= 1


def test_motion_blurs_in_linear_light(image: np.ndarray) -> None:
    blurry, sharp = synthesize(image, seed=1, spec=BlurSpec(still_fraction=0.0, max_pan=20))
    # Blur removes high frequencies: the Laplacian's energy drops.
    lap = lambda x: np.abs(np.diff(x.astype(float), 2, axis=0)).mean()  # noqa: E731
    assert lap(blurry) < 0.8 * lap(sharp)
    x = np.linspace(0, 1, 101)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-12)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="uint8"):
        synthesize(np.zeros((8, 8), np.uint8), seed=0)
