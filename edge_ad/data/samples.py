"""The data model: one :class:`Sample` per image, one :class:`ProductDataset` per product.

Same idea as anomalib's sample tables, kept to plain frozen dataclasses: a sample is an image
path, a label (0 normal, 1 anomalous), its defect type (``"good"`` for normal images) and an
optional ground-truth mask path. ``ProductDataset.train`` holds normal images only;
``ProductDataset.test`` holds normal and anomalous images.

:func:`split_train_val` holds out some *training* normals as a validation set (used later to
calibrate thresholds). It never looks at test images, so thresholds are never tuned on them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_ad.errors import DatasetError

GOOD = "good"
"""Defect type of normal images (as in MVTec)."""


@dataclass(frozen=True)
class Sample:
    """One image of a product.

    Attributes:
        image_path: The image file.
        label: 0 for a normal image, 1 for an anomalous one.
        defect_type: ``"good"`` for normal images, else the defect class (the MVTec/folder
            sub-folder name; ``"anomaly"`` for VisA, whose split file has no defect classes).
        mask_path: Ground-truth mask (non-zero pixels = defect), or ``None`` when there is none:
            normal images, folder-layout datasets, and MVTec defect types without a
            ``ground_truth/<type>`` folder. A ``None`` mask reads as all-normal.
    """

    image_path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None

    @property
    def is_anomalous(self) -> bool:
        return self.label == 1


@dataclass(frozen=True)
class ProductDataset:
    """All images of one product, split into train (normal only) and test.

    Attributes:
        product: Product name (MVTec category, VisA ``object``, folder name).
        layout: The resolved layout: ``"mvtec"``, ``"visa"`` or ``"folder"``.
        root: The data root the dataset was loaded from.
        train: Normal training images, sorted by path.
        test: Test images (normal and anomalous), sorted by path.
        unmasked_defect_types: Defect types whose test images have no masks (MVTec with a
            missing ``ground_truth/<type>`` folder, every defect type of the folder layout).
            Pixel-level metrics skip those images.
    """

    product: str
    layout: str
    root: Path
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    unmasked_defect_types: tuple[str, ...] = ()

    @property
    def defect_types(self) -> tuple[str, ...]:
        """Sorted defect types present in the test split (without ``"good"``)."""
        return tuple(sorted({s.defect_type for s in self.test if s.label == 1}))

    @property
    def has_masks(self) -> bool:
        """True when at least one anomalous test image has a ground-truth mask."""
        return any(s.mask_path is not None for s in self.test if s.label == 1)

    def summary(self) -> dict:
        """JSON-friendly counts per split and defect type.

        Example: ``{"product": "bottle", "layout": "mvtec", "root": "/data/mvtec",
        "train": {"good": 209}, "test": {"broken_large": 20, "good": 20, ...},
        "n_train": 209, "n_test_normal": 20, "n_test_anomalous": 63,
        "n_test_masks": 63, "unmasked_defect_types": []}``.
        """
        train_counts = Counter(s.defect_type for s in self.train)
        test_counts = Counter(s.defect_type for s in self.test)
        return {
            "product": self.product,
            "layout": self.layout,
            "root": str(self.root),
            "train": dict(sorted(train_counts.items())),
            "test": dict(sorted(test_counts.items())),
            "n_train": len(self.train),
            "n_test_normal": sum(1 for s in self.test if s.label == 0),
            "n_test_anomalous": sum(1 for s in self.test if s.label == 1),
            "n_test_masks": sum(1 for s in self.test if s.mask_path is not None),
            "unmasked_defect_types": list(self.unmasked_defect_types),
        }


def sort_samples(samples: Iterable[Sample]) -> tuple[Sample, ...]:
    """Samples sorted by image path (the canonical, deterministic order)."""
    return tuple(sorted(samples, key=lambda s: str(s.image_path)))


def holdout_count(n: int, fraction: float, minimum: int) -> int:
    """How many of ``n`` items a ``fraction`` holds out: ``round(fraction * n)``, at least
    ``minimum`` when ``n >= 2``, and always leaving at least one item behind."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    k = round(fraction * n)
    if n >= 2:
        k = max(k, minimum)
    return max(0, min(k, n - 1))


def deterministic_holdout(
    samples: Iterable[Sample], fraction: float, seed: int, minimum: int
) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    """Sort by path, shuffle with ``numpy.random.default_rng(seed)`` and hold out
    :func:`holdout_count` samples. Returns ``(kept, held_out)``, each sorted by path."""
    ordered = sort_samples(samples)
    n = len(ordered)
    k = holdout_count(n, fraction, minimum)
    perm = np.random.default_rng(seed).permutation(n)
    held = set(perm[:k].tolist())
    kept = tuple(s for i, s in enumerate(ordered) if i not in held)
    held_out = tuple(s for i, s in enumerate(ordered) if i in held)
    return kept, held_out


def split_train_val(
    samples: Iterable[Sample], val_fraction: float = 0.1, seed: int = 0, min_val: int = 1
) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    """Split *training* normals into ``(train, val)``, deterministically.

    Sorts by path, shuffles with ``numpy.random.default_rng(seed)`` and takes
    ``round(val_fraction * n)`` images (at least ``min_val`` when ``n >= 2``, at most ``n - 1``)
    as validation. Both parts come back sorted by path and are disjoint. The validation normals
    calibrate thresholds, so pass ``dataset.train`` here, never test images.

    Raises:
        DatasetError: fewer than 2 training images.
        ValueError: ``val_fraction`` outside [0, 1), or an anomalous sample was passed.
    """
    samples = tuple(samples)
    if any(s.label != 0 for s in samples):
        raise ValueError("split_train_val takes training normals only; got an anomalous sample")
    if len(samples) < 2:
        folder = samples[0].image_path.parent if samples else "the training folder"
        raise DatasetError(
            f"need at least 2 normal training images to hold out a validation set, found "
            f"{len(samples)}; add more normal images to {folder}"
        )
    return deterministic_holdout(samples, val_fraction, seed, min_val)
