"""Datasets: layouts (MVTec, VisA, folder), the sample model, image reading and VisA download.

The names below are imported lazily, so ``import edge_ad.data`` stays cheap (torch and
requests load only when a name that needs them is used)::

    from edge_ad.data import load_dataset, split_train_val, load_images, to_tensor

    ds = load_dataset("datasets/mvtec", "bottle")             # layout="auto"
    train, val = split_train_val(ds.train, val_fraction=0.1, seed=0)
    x = to_tensor(load_images(train, size=256))               # (N, 3, 256, 256) in [-1, 1]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "samples": ("GOOD", "ProductDataset", "Sample", "split_train_val"),
    "datasets": ("load_dataset",),
    "layout": (
        "IMAGE_EXTENSIONS",
        "LAYOUTS",
        "LAYOUT_CHOICES",
        "detect_layout",
        "list_images",
        "list_products",
        "normalize_layout",
    ),
    "transforms": (
        "ImageFolderDataset",
        "decode_image",
        "load_images",
        "load_masks",
        "read_image",
        "read_mask",
        "to_tensor",
        "to_uint8",
    ),
    "download": ("VISA_SHA256", "VISA_URL", "download_visa", "find_visa_root"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "GOOD",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "LAYOUT_CHOICES",
    "VISA_SHA256",
    "VISA_URL",
    "ImageFolderDataset",
    "ProductDataset",
    "Sample",
    "decode_image",
    "detect_layout",
    "download_visa",
    "find_visa_root",
    "list_images",
    "list_products",
    "load_dataset",
    "load_images",
    "load_masks",
    "normalize_layout",
    "read_image",
    "read_mask",
    "split_train_val",
    "to_tensor",
    "to_uint8",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs
    from edge_ad.data.datasets import load_dataset
    from edge_ad.data.download import VISA_SHA256, VISA_URL, download_visa, find_visa_root
    from edge_ad.data.layout import (
        IMAGE_EXTENSIONS,
        LAYOUT_CHOICES,
        LAYOUTS,
        detect_layout,
        list_images,
        list_products,
        normalize_layout,
    )
    from edge_ad.data.samples import GOOD, ProductDataset, Sample, split_train_val
    from edge_ad.data.transforms import (
        ImageFolderDataset,
        decode_image,
        load_images,
        load_masks,
        read_image,
        read_mask,
        to_tensor,
        to_uint8,
    )
