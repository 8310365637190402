"""Load one product's dataset: ``load_dataset(data_root, product, layout="auto")``.

The layouts and their rules (masks, splits, image extensions) are described in
:mod:`edge_ad.data.layout`; the data model (:class:`Sample`, :class:`ProductDataset`,
:func:`split_train_val`) lives in :mod:`edge_ad.data.samples` and is re-exported here.

Example::

    ds = load_dataset("datasets/mvtec", "bottle")          # layout detected
    train, val = split_train_val(ds.train, val_fraction=0.1, seed=0)
    print(ds.summary())
"""

from __future__ import annotations

from pathlib import Path

from edge_ad.data.layout import (
    FOLDER_SPLIT_SEED,
    FOLDER_TEST_FRACTION,
    detect_layout,
    normalize_layout,
    scan_layout,
)
from edge_ad.data.samples import ProductDataset, Sample, split_train_val

__all__ = ["ProductDataset", "Sample", "load_dataset", "split_train_val"]


def load_dataset(
    data_root: str | Path,
    product: str,
    layout: str = "auto",
    *,
    test_fraction: float = FOLDER_TEST_FRACTION,
    seed: int = FOLDER_SPLIT_SEED,
) -> ProductDataset:
    """List the train and test images of ``product`` under ``data_root``.

    Args:
        data_root: The dataset folder (``--data-root``).
        product: The product (MVTec category, VisA object, folder name).
        layout: ``"auto"``, ``"mvtec"``, ``"visa"``, ``"folder"`` or ``"synthetic"`` (an alias
            of ``"mvtec"``). ``ProductDataset.layout`` holds the resolved name.
        test_fraction, seed: The folder layout's split of good images into train/test
            (ignored by the other layouts, which have an explicit split).

    Raises:
        DatasetError: missing data root, unknown layout or product, unrecognised structure,
            no training images, missing mask or unreadable split file. The message is one line
            and says how to fix it.
    """
    root = Path(data_root).expanduser()
    resolved = normalize_layout(layout)
    if resolved == "auto":
        resolved = detect_layout(root, product)
    train, test, unmasked = scan_layout(
        root, product, resolved, test_fraction=test_fraction, seed=seed
    )
    return ProductDataset(
        product=product,
        layout=resolved,
        root=root,
        train=train,
        test=test,
        unmasked_defect_types=unmasked,
    )
