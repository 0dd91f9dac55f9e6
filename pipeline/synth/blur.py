"""Synthetic paired motion blur, the GoPro recipe made reproducible.

A sharp image is seen through N sub-frames of a moving camera (pan, zoom, rotation, shake along a
smooth random trajectory) while an object cut from the image moves on its own path; the blurry frame
is the mean of the sub-frames in linear light (undo the sRGB gamma, average, redo it) and the ground
truth is the middle sub-frame. Camera speed varies from frame to frame (some are almost still) and the
object adds local blur, so patches fall into different PSNR classes. Same seed, same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class BlurSpec:
    """How strong the synthetic motion is. Distances are in pixels over the whole exposure."""

    sub_frames: int = 15
    max_pan: float = 32.0
    max_rotation_deg: float = 3.0
    max_zoom: float = 0.04
    shake: float = 1.0
    still_fraction: float = 0.15  # frames whose camera barely moves (sharp classes)
    object_probability: float = 0.7
    max_object_motion: float = 32.0
    noise_sigma: float = 0.0  # Gaussian noise on the blurry frame, in [0, 1] units


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def _trajectory(rng: np.random.Generator, n: int, extent: float, shake: float) -> np.ndarray:
    """(n,) positions in [-extent/2, extent/2] along a smooth path with a little jitter."""
    t = np.linspace(-0.5, 0.5, n)
    curve = rng.uniform(-0.5, 0.5)
    path = extent * (t + curve * (t**2 - 1 / 12))
    return path + rng.normal(0, shake, n) * (extent > 0)


def _camera_paths(spec: BlurSpec, rng: np.random.Generator, still: bool) -> np.ndarray:
    """(N, 4): dx, dy, rotation (deg), zoom for each sub-frame."""
    n = spec.sub_frames
    scale = 0.08 if still else rng.uniform(0.25, 1.0)
    angle = rng.uniform(0, 2 * np.pi)
    pan = _trajectory(rng, n, scale * spec.max_pan, spec.shake * scale)
    dx, dy = pan * np.cos(angle), pan * np.sin(angle)
    rot = _trajectory(rng, n, scale * rng.uniform(-1, 1) * spec.max_rotation_deg, 0.0)
    zoom = _trajectory(rng, n, scale * rng.uniform(-1, 1) * spec.max_zoom, 0.0)
    return np.stack([dx, dy, rot, zoom], axis=1)


@dataclass(frozen=True)
class Pair:
    """A synthetic blurry frame, its ground truth, and the motion that made it."""

    blurry: np.ndarray  # (H, W, 3) uint8
    sharp: np.ndarray  # (H, W, 3) uint8
    camera: np.ndarray  # (N, 4): dx, dy (pixels), rotation (degrees), zoom per sub-frame
    object_path: np.ndarray | None  # (N, 2): the moving object's top-left y, x per sub-frame
    object_size: tuple[int, int] | None  # (h, w)


def synthesize(sharp: np.ndarray, seed: int, spec: BlurSpec = BlurSpec()) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 sharp image -> (blurry, ground truth), both (H, W, 3) uint8."""
    pair = synthesize_pair(sharp, seed, spec)
    return pair.blurry, pair.sharp


def synthesize_pair(sharp: np.ndarray, seed: int, spec: BlurSpec = BlurSpec()) -> Pair:
    """Like `synthesize`, also returning the camera trajectory and the object's path."""
    _check_image(sharp)
    rng = np.random.default_rng(seed)
    h, w = sharp.shape[:2]
    linear = srgb_to_linear(sharp.astype(np.float64) / 255.0).astype(np.float32)
    camera = _camera_paths(spec, rng, still=rng.random() < spec.still_fraction)
    obj = _object(linear, rng, spec) if rng.random() < spec.object_probability else None
    frames = []
    for i, (dx, dy, rot, zoom) in enumerate(camera):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rot), float(1 + zoom))
        m[:, 2] += (dx, dy)
        frame = cv2.warpAffine(linear, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        if obj is not None:
            _paste(frame, obj, i)
        frames.append(frame)
    blurry = np.mean(frames, axis=0)
    truth = frames[len(frames) // 2]
    if spec.noise_sigma > 0:
        blurry_srgb = linear_to_srgb(blurry) + rng.normal(0, spec.noise_sigma, blurry.shape)
    else:
        blurry_srgb = linear_to_srgb(blurry)
    return Pair(
        _to_uint8(blurry_srgb),
        _to_uint8(linear_to_srgb(truth)),
        camera,
        obj.path if obj is not None else None,
        obj.pixels.shape[:2] if obj is not None else None,
    )


def _check_image(sharp: np.ndarray) -> None:
    if sharp.ndim != 3 or sharp.shape[2] != 3 or sharp.dtype != np.uint8:
        raise ValueError(f"synthesize expects an (H, W, 3) uint8 image, got {sharp.shape} {sharp.dtype}")


def synthesize_clip(
    scene: np.ndarray, seed: int, *, frames: int, size: tuple[int, int], spec: BlurSpec = BlurSpec()
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A blurry video: a (h, w) window drifts over `scene` along one continuous path, speeding up,
    slowing down and pausing, while an object crosses it. Frame k is the linear-light mean of
    sub-frames kN..kN+N-1 (N = spec.sub_frames) and its ground truth is the middle one, as in GoPro.
    A scene smaller than 1.25x the clip size is scaled up first.
    Returns `frames` (blurry, sharp) pairs of (h, w, 3) uint8."""
    _check_image(scene)
    h, w = size
    # The window needs room to drift: scale a small scene up to 1.25x the clip size.
    scale = max(1.25 * h / scene.shape[0], 1.25 * w / scene.shape[1], 1.0)
    if scale > 1:
        scene = cv2.resize(scene, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(seed)
    n, total = spec.sub_frames, frames * spec.sub_frames
    linear = srgb_to_linear(scene.astype(np.float64) / 255.0).astype(np.float32)
    centres, angles, zooms = _clip_camera(rng, total, scene.shape[:2], size, spec)
    obj = _object(linear, rng, spec)
    # The object crosses the window once over the whole clip, on a straight path.
    oh, ow = obj.pixels.shape[:2]
    start = np.array([rng.uniform(0, max(h - oh, 1)), -ow * 0.5])
    end = np.array([rng.uniform(0, max(h - oh, 1)), w - ow * 0.5])
    obj = _Object(obj.pixels, obj.mask, start + np.linspace(0, 1, total)[:, None] * (end - start))
    subs = []
    for i in range(total):
        m = cv2.getRotationMatrix2D((float(centres[i, 1]), float(centres[i, 0])), float(angles[i]), float(zooms[i]))
        m[:, 2] += (w / 2 - centres[i, 1], h / 2 - centres[i, 0])  # the window's centre follows the path
        sub = cv2.warpAffine(linear, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        _paste(sub, obj, i)
        subs.append(sub)
    out = []
    for k in range(frames):
        window = subs[k * n : (k + 1) * n]
        blurry = linear_to_srgb(np.mean(window, axis=0))
        if spec.noise_sigma > 0:
            blurry = blurry + rng.normal(0, spec.noise_sigma, blurry.shape)
        out.append((_to_uint8(blurry), _to_uint8(linear_to_srgb(window[n // 2]))))
    return out


def _clip_camera(
    rng: np.random.Generator, total: int, scene: tuple[int, int], size: tuple[int, int], spec: BlurSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(total, 2) window centres (y, x), (total,) rotation in degrees and zoom, over sub-frames."""
    t = np.linspace(0, 1, total)
    # Speed: a slow random wave, clipped at 0 so the camera pauses now and then; up to max_pan per frame.
    wave = sum(rng.uniform(0.5, 1) * np.sin(2 * np.pi * (f * t + rng.uniform())) for f in (0.7, 1.6, 3.1))
    speed = np.clip(wave / 2 + 0.25, 0, 1) * spec.max_pan / spec.sub_frames
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.02, total))
    step = np.stack([np.sin(heading), np.cos(heading)], axis=1) * speed[:, None]
    step += rng.normal(0, spec.shake / spec.sub_frames, step.shape)
    # Bounce off the scene's edges so the window never leaves it.
    low = np.array(size, float) / 2 + 1
    high = np.array(scene, float) - np.array(size, float) / 2 - 1
    centre = rng.uniform(low, np.maximum(high, low))
    centres = np.empty((total, 2))
    for i in range(total):
        centre = centre + step[i]
        for axis in (0, 1):
            if centre[axis] < low[axis] or centre[axis] > high[axis]:
                step[i:, axis] *= -1
                centre[axis] = np.clip(centre[axis], low[axis], max(high[axis], low[axis]))
        centres[i] = centre
    angles = spec.max_rotation_deg * np.sin(2 * np.pi * (0.5 * t + rng.uniform())) * speed / (speed.max() + 1e-9)
    zooms = 1 + spec.max_zoom * np.sin(2 * np.pi * (0.3 * t + rng.uniform()))
    return centres, angles, zooms


@dataclass(frozen=True)
class _Object:
    pixels: np.ndarray  # (h, w, 3) linear
    mask: np.ndarray  # (h, w, 1) soft ellipse
    path: np.ndarray  # (N, 2) top-left positions


def _object(linear: np.ndarray, rng: np.random.Generator, spec: BlurSpec) -> _Object:
    h, w = linear.shape[:2]
    oh, ow = int(rng.uniform(0.2, 0.45) * h), int(rng.uniform(0.2, 0.45) * w)
    sy, sx = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
    pixels = linear[sy : sy + oh, sx : sx + ow].copy()
    yy, xx = np.mgrid[0:oh, 0:ow]
    ellipse = ((yy - oh / 2) / (oh / 2)) ** 2 + ((xx - ow / 2) / (ow / 2)) ** 2
    mask = np.clip((1 - ellipse) * 4, 0, 1)[..., None].astype(np.float32)
    ty, tx = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
    angle = rng.uniform(0, 2 * np.pi)
    travel = _trajectory(rng, spec.sub_frames, rng.uniform(0.3, 1.0) * spec.max_object_motion, 0.3)
    path = np.stack([ty + travel * np.sin(angle), tx + travel * np.cos(angle)], axis=1)
    return _Object(pixels, mask, path)


def _paste(frame: np.ndarray, obj: _Object, i: int) -> None:
    h, w = frame.shape[:2]
    oh, ow = obj.pixels.shape[:2]
    y, x = obj.path[i]
    # Sub-pixel placement: shift the object and its mask onto the integer grid.
    m = np.float32([[1, 0, x - int(np.floor(x))], [0, 1, y - int(np.floor(y))]])
    pixels = cv2.warpAffine(obj.pixels, m, (ow, oh), borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(obj.mask, m, (ow, oh), borderMode=cv2.BORDER_CONSTANT)[..., None]
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    ys, xs = slice(max(y0, 0), min(y0 + oh, h)), slice(max(x0, 0), min(x0 + ow, w))
    oy, ox = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    region = frame[ys, xs]
    frame[ys, xs] = region * (1 - mask[oy, ox]) + pixels[oy, ox] * mask[oy, ox]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Wear:
    """The state archive footage is in: sensor noise, then lossy compression. Applied alike to both
    members of a pair (the same noise field; each compressed at the same quality), so a model trained
    on such pairs removes blur and leaves the footage's own grain and artefacts alone."""

    noise_sigma: float = 0.0  # Gaussian sensor noise, in 8-bit levels
    jpeg_quality: int | None = None  # None: no compression

    @classmethod
    def random(cls, rng: np.random.Generator) -> Wear:
        """Mild wear as archives show it: noise 0-4 levels half the time, JPEG quality 40-95 most of the time."""
        sigma = float(rng.uniform(0, 4)) if rng.random() < 0.5 else 0.0
        quality = int(rng.integers(40, 96)) if rng.random() < 0.8 else None
        return cls(noise_sigma=sigma, jpeg_quality=quality)


def wear(image: np.ndarray, spec: Wear, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> the same worn by `spec`; the same seed gives the same noise field."""
    out = image
    if spec.noise_sigma > 0:
        noise = np.random.default_rng(seed).normal(0, spec.noise_sigma, image.shape)
        out = _to_uint8((image + noise) / 255.0)
    if spec.jpeg_quality is not None:
        ok, encoded = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality])
        assert ok, "OpenCV could not encode a JPEG"
        out = np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1])
    return out
