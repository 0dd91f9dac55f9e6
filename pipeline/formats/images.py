"""Image bytes <-> 8-bit 3-channel pixels, with every conversion named.

Frames travel as (H, W, 3) uint8 arrays in OpenCV's BGR order (what VideoCapture and imdecode give,
and what imencode takes), so ingest never converts twice. Grey, RGBA and 16-bit images are converted
and the conversion is returned as a note for the index. A frame's identity is `pixel_sha256`: the
SHA-256 of its pixels as (H, W, 3) uint8 in RGB order, independent of the file format.
"""

from __future__ import annotations

import hashlib
import io
from typing import Literal

import cv2
import numpy as np
import PIL.Image

from adarevd.errors import InvalidInput

ImageFormat = Literal["png", "jpg"]
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"})


ORIENTATION_TAG = 0x0112


class ImageError(InvalidInput):
    """Bytes that are not a usable image; the caller adds the file or key."""


def decode(data: bytes) -> tuple[np.ndarray, list[str]]:
    """Image file bytes -> ((H, W, 3) uint8 BGR, notes on conversions made)."""
    if not data:
        raise ImageError("0 bytes")
    if data[:2] == b"\xff\xd8" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        # libjpeg decodes a cut-off JPEG into a half-grey picture with only a warning.
        raise ImageError("truncated JPEG (no end-of-image marker)")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-16:]:
        raise ImageError("truncated PNG (no IEND chunk)")
    orientation = exif_orientation(data)
    # IMREAD_COLOR turns the picture as its EXIF orientation says (as viewers show it); IMREAD_UNCHANGED,
    # which keeps 16 bits and alpha, does not. JPEGs, where the tag lives, are 8-bit colour or grey.
    flags = cv2.IMREAD_COLOR if orientation != 1 else cv2.IMREAD_UNCHANGED
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None or image.size == 0:
        raise ImageError("cannot be decoded as an image (not an image, or damaged)")
    bgr, notes = to_bgr8(image)
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation} applied (the picture is turned as viewers show it)")
    return bgr, notes


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag of a JPEG (1..8; 1: as stored), 1 when there is none or it is unreadable."""
    if data[:2] != b"\xff\xd8":
        return 1
    try:
        with PIL.Image.open(io.BytesIO(data)) as picture:
            value = picture.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):  # Pillow's errors for damaged headers
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_bgr8(image: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Any OpenCV image (grey/BGR/BGRA, 8/16-bit, float) -> (H, W, 3) uint8 BGR and notes."""
    notes = []
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(x / 257)
        notes.append("16-bit converted to 8-bit")
    elif image.dtype in (np.float32, np.float64):
        image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
        notes.append("floating point converted to 8-bit")
    elif image.dtype != np.uint8:
        raise ImageError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 2 or image.shape[2] == 1:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        notes.append("grey converted to RGB")
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        notes.append("alpha channel dropped")
    elif image.shape[2] != 3:
        raise ImageError(f"{image.shape[2]} channels")
    return np.ascontiguousarray(image), notes


def encode(bgr: np.ndarray, fmt: ImageFormat | str = "png", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 BGR -> PNG (lossless, OpenCV's default compression), JPEG at `quality`, or any
    other format OpenCV writes (webp is written lossless)."""
    params = {
        "jpg": [cv2.IMWRITE_JPEG_QUALITY, quality],
        "jpeg": [cv2.IMWRITE_JPEG_QUALITY, quality],
        "webp": [cv2.IMWRITE_WEBP_QUALITY, 101],
    }.get(fmt, [])
    ok, buffer = cv2.imencode(f".{fmt}", bgr, params)
    if not ok:
        raise ImageError(f"OpenCV could not encode a {bgr.shape} image as {fmt}")
    return buffer.tobytes()


def pixel_sha256(bgr: np.ndarray) -> str:
    # cvtColor and hashlib both release the GIL, so this overlaps with decoding on other threads.
    rgb = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2RGB)
    return hashlib.sha256(rgb.data).hexdigest()
