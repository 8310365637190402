"""Decoding images that arrive from outside — a frame on the stream, a pyfunc request, a file
handed to ``edge-ad infer`` — so that no single image can stall or exhaust the process.

Pillow reads an image's header lazily: its format and size are known before one pixel is
decoded. Everything that bounds the cost of decoding is checked there, in this order: the byte
count, the format (an allow-list of camera formats instead of Pillow's ~40 plug-ins), the pixel
count (a 330 kB PNG may declare 13000 × 13000 16-bit pixels: 2 GB and 10 s to decode), each
side against the model's input (upscaling would invent the detail the model compares against)
and the aspect ratio. Only then are the pixels decoded, converted like training images
(:mod:`edge_ad.data.transforms`) and resized to the model's input.

Every refusal is an :class:`UntrustedImageError` whose message says why, in one line.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_ad.data.transforms import READ_ERRORS, resize_image, to_rgb_array
from edge_ad.errors import EdgeADError, first_line

#: What cameras and image tools write; everything else Pillow could open is refused.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


class UntrustedImageError(EdgeADError):
    """An image from outside that is refused before or while decoding; the message says why."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on an image from outside (defaults: generous for line cameras, small enough that
    a scorer decoding eight at once stays within a few hundred MB)."""

    max_bytes: int = 32 * 2**20
    #: 4096² (16.8 MP): above the 5–12 MP of common line cameras. Decoding one costs up to
    #: ~4 copies of 3 bytes per pixel (~200 MB), and a scorer decodes a batch at once.
    max_pixels: int = 4096 * 4096
    #: Longest side over shortest: a product view, not a line-scan strip or a 1-px sliver.
    max_aspect: float = 4.0


DEFAULT_LIMITS = ImageLimits()


def _reason(exc: BaseException) -> str:
    return first_line(exc)[:200]


def check_header(
    img: Image.Image, size: int, name: str, limits: ImageLimits = DEFAULT_LIMITS
) -> None:
    """Refuse an opened (not yet decoded) image by its header alone."""
    if img.format not in ALLOWED_FORMATS:
        allowed = ", ".join(ALLOWED_FORMATS)
        kind = img.format or "unknown"
        raise UntrustedImageError(f"{name}: format {kind} is not one of {allowed}")
    w, h = img.size
    if w * h > limits.max_pixels:
        raise UntrustedImageError(
            f"{name}: {w}x{h} px is over the {limits.max_pixels:,}-pixel limit; not decoded"
        )
    if w < size or h < size:
        raise UntrustedImageError(
            f"{name}: {w}x{h} px is smaller than the model's {size}x{size} input"
        )
    if max(w, h) > limits.max_aspect * min(w, h):
        raise UntrustedImageError(
            f"{name}: {w}x{h} px has an aspect ratio beyond {limits.max_aspect:g}:1, "
            "not a product view"
        )


def decode_untrusted(
    data: bytes, size: int, name: str = "image", limits: ImageLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Encoded bytes from outside → ``uint8`` RGB ``(size, size, 3)``, or
    :class:`UntrustedImageError` saying why not (see the module docstring)."""
    if not data:
        raise UntrustedImageError(f"{name}: empty, no image")
    if len(data) > limits.max_bytes:
        raise UntrustedImageError(
            f"{name}: {len(data):,} bytes is over the {limits.max_bytes:,}-byte limit"
        )
    try:
        with warnings.catch_warnings():
            # check_header's pixel limit is below Pillow's own bomb warning (89 MP), so that
            # a refusal says which limit it hit; "palette images with transparency" is noise.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(bytes(data)))
            check_header(img, size, name, limits)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            # EXIF rotation swaps the sides: the checks hold for the rotated image too.
            rgb = to_rgb_array(img)
    except UntrustedImageError:
        raise
    except (*READ_ERRORS, UnidentifiedImageError) as exc:
        raise UntrustedImageError(
            f"{name}: not a decodable image ({len(data):,} bytes: {_reason(exc)})"
        ) from None
    return resize_image(rgb, size)


def read_untrusted(path: str | Path, size: int, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """:func:`decode_untrusted` for a file (its size is checked before it is read)."""
    path = Path(path)
    try:
        nbytes = path.stat().st_size
        if nbytes > limits.max_bytes:
            raise UntrustedImageError(
                f"{path}: {nbytes:,} bytes is over the {limits.max_bytes:,}-byte limit"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise UntrustedImageError(f"cannot read {path}: {_reason(exc)}") from None
    return decode_untrusted(data, size, name=str(path), limits=limits)
