"""Images from outside (stream frames, pyfunc requests, files to infer) are checked on their
header before any pixel is decoded: bytes, format, pixel count, sides, aspect ratio."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from edge_ad.data.untrusted import (
    ImageLimits,
    UntrustedImageError,
    decode_untrusted,
    read_untrusted,
)
from edge_ad.errors import EdgeADError
from edge_ad.pyfunc_model import frames_from_input
from edge_ad.stream.schema import BadFrame
from edge_ad.stream.scoring import decode_frame_image


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb(png_bomb) -> bytes:
    return png_bomb(13000)


def test_a_decompression_bomb_is_refused_from_its_header(bomb: bytes) -> None:
    """Before: the 13000² 16-bit PNG was decoded first (+2.2 GB RSS, ~10 s per frame)."""
    assert len(bomb) < 2 * 2**20
    start = time.process_time()
    with pytest.raises(UntrustedImageError, match=r"13000x13000 px is over the .*not decoded"):
        decode_untrusted(bomb, 256)
    # Refused from the header: far less CPU than decoding 338 MB would take.
    assert time.process_time() - start < 1.0
    with pytest.raises(BadFrame, match="pixel limit"):
        decode_frame_image(bomb, 256)


def test_formats_outside_the_camera_list_are_refused() -> None:
    for fmt in ("GIF", "PPM", "ICO"):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, fmt)
        with pytest.raises(UntrustedImageError, match=f"format {fmt} is not one of PNG"):
            decode_untrusted(buf.getvalue(), 32)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "JPEG")
    assert decode_untrusted(buf.getvalue(), 32).shape == (32, 32, 3)


def test_byte_and_pixel_limits_are_settable() -> None:
    data = _png(64, 64)
    with pytest.raises(UntrustedImageError, match="byte limit"):
        decode_untrusted(data, 32, limits=ImageLimits(max_bytes=len(data) - 1))
    with pytest.raises(UntrustedImageError, match="4,095-pixel limit"):
        decode_untrusted(data, 32, limits=ImageLimits(max_pixels=64 * 64 - 1))
    assert decode_untrusted(data, 32, limits=ImageLimits(max_pixels=64 * 64)).shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("w", "h", "word"),
    [(1, 1, "smaller than the model"), (64, 20000, "aspect ratio beyond 4:1")],
    ids=["1x1", "64x20000"],
)
def test_the_pyfunc_refuses_what_the_stream_refuses(w: int, h: int, word: str) -> None:
    """Before: 1×1 and 64×20000 images were silently rescaled and scored by the pyfunc."""
    data = _png(w, h, "L")
    with pytest.raises(EdgeADError, match=word):
        frames_from_input([data], 32)
    with pytest.raises(BadFrame, match=word):
        decode_frame_image(data, 32)


def test_infer_reads_files_through_the_same_checks(tmp_path) -> None:
    """Before: ``edge-ad infer`` scored a 1×1 file upscaled to the model's input."""
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(_png(1, 1))
    with pytest.raises(UntrustedImageError, match=r"tiny\.png: 1x1 px is smaller"):
        read_untrusted(tiny, 32)
    with pytest.raises(UntrustedImageError, match="cannot read"):
        read_untrusted(tmp_path / "missing.png", 32)
    good = tmp_path / "good.png"
    good.write_bytes(_png(40, 48))
    assert read_untrusted(good, 32).shape == (32, 32, 3)


def test_exif_rotation_is_applied_after_the_checks() -> None:
    """A portrait JPEG stored landscape with an EXIF orientation comes out rotated."""
    img = Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert decode_untrusted(buf.getvalue(), 40).shape == (40, 40, 3)
