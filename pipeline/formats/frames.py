"""Samples in, samples out: which member is the image, and everything else passed through untouched.

A frame shard's image member is `png` or `jpg`; an image dataset may use `jpeg`, `webp`, ...; a
paired shard has `blur.png` (name it with `image_member`). The deblurred image is written back under
the same member name and format (PNG lossless, JPEG at `jpeg_quality`, webp lossless, ...); every
other member (json, labels, captions) is copied byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.formats import images
from pipeline.formats.shards import Sample

IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "ppm")


@dataclass(frozen=True)
class FrameIn:
    """A decoded frame and its sample. `rgb` is (H, W, 3) uint8."""

    key: str
    member: str
    rgb: np.ndarray
    sample: Sample
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PatchMap:
    """Where a frame's patches lie (level-0 pixels of the padded frame, which starts at the frame's
    top-left corner) and the exit depth of each, row-major: what the report draws."""

    ys: tuple[int, ...]
    xs: tuple[int, ...]
    size_h: int
    size_w: int
    depths: tuple[int, ...]  # len(ys) * len(xs)


@dataclass(frozen=True)
class FrameOut:
    """A deblurred sample and what the manifest records about it."""

    sample: Sample
    member: str
    width: int
    height: int
    sha256: str  # of the output image member
    depth_histogram: tuple[int, ...]  # patches per exit depth 0..N
    mean_depth: float
    compute_saved: float  # 1 - mean depth / N: decoder work not done vs full depth
    blur_before: float
    blur_after: float
    seam: float
    tone_shift: tuple[float, float, float]  # mean output minus input per channel (RGB), in 8-bit levels
    encode_ms: float
    decode_ms: float
    stitch_ms: float
    notes: tuple[str, ...] = ()
    patches: PatchMap | None = None


@dataclass(frozen=True)
class Rejected:
    """A sample that cannot be processed: it goes to quarantine with its original bytes."""

    key: str
    reason: str
    sample: Sample


def image_member(members: Mapping[str, bytes], wanted: str | None) -> str:
    """The member to deblur: `wanted`, else the one plain image extension present (png, jpg, ...)."""
    if wanted is not None:
        if wanted not in members:
            raise images.ImageError(f"no {wanted!r} member (members: {', '.join(sorted(members))})")
        return wanted
    found = [m for m in IMAGE_MEMBERS if m in members]
    if len(found) != 1:
        what = "no image member" if not found else f"several image members ({', '.join(found)})"
        raise images.ImageError(f"{what}; members: {', '.join(sorted(members))}; choose one with --image-member")
    return found[0]


def decode_sample(sample: Sample, wanted: str | None = None) -> FrameIn | Rejected:
    try:
        member = image_member(sample.members, wanted)
        bgr, notes = images.decode(sample.members[member])
    except images.ImageError as e:
        return Rejected(sample.key, str(e), sample)
    return FrameIn(sample.key, member, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), sample, tuple(notes))


def encode_output(frame: FrameIn, rgb: np.ndarray, jpeg_quality: int = 95) -> Sample:
    """The output sample: the deblurred image under the input's member name and format, the rest unchanged."""
    fmt = frame.member.rsplit(".", 1)[-1]
    data = images.encode(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), fmt, jpeg_quality)
    return Sample(frame.key, {**frame.sample.members, frame.member: data})
