from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from pipeline.synth.blur import BlurSpec, Wear, linear_to_srgb, srgb_to_linear, synthesize, wear


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


def test_wear_is_repeatable_and_mild(image: np.ndarray) -> None:
    spec = Wear(noise_sigma=3.0, jpeg_quality=60)
    worn = wear(image, spec, seed=5)
    assert np.array_equal(worn, wear(image, spec, seed=5)) and not np.array_equal(worn, wear(image, spec, seed=6))
    assert np.array_equal(wear(image, Wear(), seed=5), image)  # no wear: the image as it is
    difference = worn.astype(np.float64) - image
    assert 1.0 < np.sqrt(np.mean(difference**2)) < 16 and abs(difference.mean()) < 0.5  # grain, no tone change


def test_worn_alike_a_pair_keeps_the_same_noise_field(image: np.ndarray) -> None:
    noisy = Wear(noise_sigma=4.0)
    flat = np.full_like(image, 128)
    a, b = wear(image, noisy, seed=9).astype(int) - image, wear(flat, noisy, seed=9).astype(int) - flat
    inside = (image > 20) & (image < 235)  # away from clipping the noise fields are equal
    assert np.array_equal(a[inside], b[inside])
