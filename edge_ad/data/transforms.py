"""Reading images and masks, and converting them to and from tensors.

Conventions:

* Images are ``uint8`` RGB arrays ``(H, W, 3)`` with ``H == W == size``. Whatever the file
  holds is converted to RGB: greyscale (``L``, ``1``) is replicated to three channels; the
  alpha channel of ``RGBA``/``LA`` is dropped (not composited); palette images go through
  their palette; 16-bit greyscale is scaled to 8 bits (``value / 257``); CMYK/YCbCr/LAB are
  converted by Pillow. EXIF orientation is applied (as cv2.imread does).
* Images of any size are resized to ``size x size`` without keeping the aspect ratio (as
  MVTec/anomalib do): ``cv2.INTER_AREA`` when shrinking, ``cv2.INTER_LINEAR`` otherwise.
* Masks are ``bool`` arrays ``(H, W)``, ``True`` = defect = any non-zero pixel (VisA masks
  hold 0/1..n, MVTec masks 0/255), resized with nearest neighbour. ``None`` reads as all
  ``False``.
* Tensors are ``float32`` ``(N, 3, H, W)`` in ``[-1, 1]`` (what the diffusion autoencoder
  expects; backbones renormalise from there themselves).

An unreadable or corrupt file is a :class:`~edge_ad.errors.DatasetError` naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from edge_ad.data.samples import Sample
from edge_ad.errors import DatasetError, first_line

Progress = Callable[[int, int], None]
"""Progress callback: called as ``progress(done, total)`` after each image."""

READ_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)


def _open(source: Path | bytes, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "palette images with transparency"
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            img.load()  # truncated files fail here, not in open()
            return ImageOps.exif_transpose(img) or img
    except FileNotFoundError as exc:
        raise DatasetError(f"image {name} not found; check the dataset folder") from exc
    except READ_ERRORS as exc:
        raise DatasetError(
            f"cannot read image {name} ({first_line(exc)}); replace or remove the corrupt file"
        ) from exc


def to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale (Pillow opens 16-bit PNG/TIFF as I;16 or I): scale to 8 bits.
        arr = np.asarray(img).astype(np.float32) / 257.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img).astype(np.float32)
        if np.nanmax(arr, initial=0.0) <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA")  # applies the palette (and its transparency) first
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, LA, RGBA, CMYK, YCbCr, LAB: alpha is dropped
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _resize(arr: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    if nearest:
        interp = cv2.INTER_NEAREST_EXACT
    else:
        interp = cv2.INTER_AREA if size <= h and size <= w else cv2.INTER_LINEAR
    return cv2.resize(arr, (size, size), interpolation=interp)


def _check_size(size: int) -> int:
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


def read_image(path: str | Path, size: int) -> np.ndarray:
    """Read an image file as ``uint8`` RGB ``(size, size, 3)`` (see the module docstring for
    the colour conversions and resizing). Raises DatasetError for a missing/corrupt file."""
    size = _check_size(size)
    return _resize(to_rgb_array(_open(Path(path), str(path))), size)


def decode_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded bytes (PNG/JPEG/...) → ``uint8`` RGB at their own size, with the same colour
    conversions as :func:`read_image`. Raises DatasetError for bytes that are not an image."""
    return to_rgb_array(_open(bytes(data), name))


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """``uint8`` RGB to ``size x size`` exactly as :func:`read_image` resizes files."""
    return _resize(image, _check_size(size))


def decode_image(data: bytes, size: int, name: str = "<bytes>") -> np.ndarray:
    """Like :func:`read_image` for encoded bytes (PNG/JPEG/... as received from a stream), so
    that serving sees exactly the pixels training saw."""
    return resize_image(decode_rgb(data, name), size)


def read_mask(path: str | Path | None, size: int) -> np.ndarray:
    """Read a mask as ``bool`` ``(size, size)``: ``True`` where any colour channel is non-zero
    (alpha ignored; palette masks go through their palette). ``None`` gives all ``False``."""
    size = _check_size(size)
    if path is None:
        return np.zeros((size, size), dtype=bool)
    img = _open(Path(path), str(path))
    if img.mode == "P":
        img = img.convert("RGB")
    elif img.mode in ("LA", "PA", "RGBA"):
        img = img.convert("L" if img.mode == "LA" else "RGB")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    arr = np.asarray(img)
    defect = arr != 0
    if defect.ndim == 3:
        defect = defect.any(axis=2)
    return _resize(defect.astype(np.uint8), size, nearest=True).astype(bool)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``uint8`` images ``(N, H, W, 3)`` or ``(H, W, 3)`` -> ``float32`` ``(N, 3, H, W)`` in
    ``[-1, 1]`` (``x / 127.5 - 1``). A single image becomes a batch of one."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"to_tensor expects uint8 images, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"to_tensor expects (N, H, W, 3) or (H, W, 3), got {arr.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    return tensor.float().div_(127.5).sub_(1.0).contiguous()


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor`: ``(N, 3, H, W)`` -> ``(N, H, W, 3)`` and ``(3, H, W)`` ->
    ``(H, W, 3)`` ``uint8``; values are clamped to ``[-1, 1]`` and rounded. Exact round trip."""
    t = torch.as_tensor(tensor).detach().to("cpu", torch.float32)
    if t.ndim not in (3, 4) or t.shape[-3] != 3:
        raise ValueError(f"to_uint8 expects (N, 3, H, W) or (3, H, W), got {tuple(t.shape)}")
    t = t.clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    t = t.permute(1, 2, 0) if t.ndim == 3 else t.permute(0, 2, 3, 1)
    return np.ascontiguousarray(t.to(torch.uint8).numpy())


def _workers(workers: int | None, n: int) -> int:
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    return max(1, min(int(workers), n))


def _load_all(
    read: Callable[[int], np.ndarray], n: int, progress: Progress | None, workers: int | None
) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    nw = _workers(workers, n)
    if nw == 1:
        results = map(read, range(n))
        executor = None
    else:
        executor = ThreadPoolExecutor(max_workers=nw)
        results = executor.map(read, range(n))  # keeps the order
    try:
        for i, arr in enumerate(results, start=1):
            out.append(arr)
            if progress is not None:
                progress(i, n)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return out


def load_images(
    samples: Sequence[Sample],
    size: int,
    progress: Progress | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Read all sample images into one ``uint8`` array ``(N, size, size, 3)``, in order.

    ``progress(done, total)`` is called after each image; ``workers`` threads decode in
    parallel (default ``min(8, cpu_count)``; ``1`` reads sequentially).
    """
    size = _check_size(size)
    samples = list(samples)
    if not samples:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    arrays = _load_all(
        lambda i: read_image(samples[i].image_path, size), len(samples), progress, workers
    )
    return np.stack(arrays)


def load_masks(
    samples: Sequence[Sample],
    size: int,
    progress: Progress | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Read all sample masks into one ``bool`` array ``(N, size, size)`` (all ``False`` for
    samples without a mask)."""
    size = _check_size(size)
    samples = list(samples)
    if not samples:
        return np.zeros((0, size, size), dtype=bool)
    arrays = _load_all(
        lambda i: read_mask(samples[i].mask_path, size), len(samples), progress, workers
    )
    return np.stack(arrays)


class ImageFolderDataset(Dataset):
    """A torch Dataset over samples, for ``DataLoader`` use.

    Each item is ``dict(image=float32 (3, H, W) in [-1, 1], mask=float32 (1, H, W) of 0/1,
    label=int, path=str, defect_type=str)``; the default collate function batches it.

    No augmentation unless asked: ``augment=True`` jitters brightness and contrast by up to
    ``jitter`` (photometric only, geometry untouched); ``hflip=True`` flips image and mask
    horizontally with probability 0.5. Flipping stays off by default because products have an
    orientation. Randomness comes from torch's generator, which DataLoader seeds per worker.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        size: int,
        augment: bool = False,
        hflip: bool = False,
        jitter: float = 0.1,
    ) -> None:
        self.samples = tuple(samples)
        self.size = _check_size(size)
        self.augment = augment
        self.hflip = hflip
        self.jitter = float(jitter)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = to_tensor(read_image(sample.image_path, self.size))[0]
        mask = torch.from_numpy(read_mask(sample.mask_path, self.size)).float()[None]
        if self.augment and self.jitter > 0:
            brightness = (torch.rand(()) * 2 - 1) * self.jitter * 2  # in [-1, 1] units
            contrast = 1 + (torch.rand(()) * 2 - 1) * self.jitter
            mean = image.mean()
            image = ((image - mean) * contrast + mean + brightness).clamp_(-1.0, 1.0)
        if self.hflip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
            mask = mask.flip(-1)
        return {
            "image": image,
            "mask": mask,
            "label": int(sample.label),
            "path": str(sample.image_path),
            "defect_type": sample.defect_type,
        }
