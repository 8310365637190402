"""On-disk dataset layouts: recognise them and list their images.

Three layouts are understood (``--data-root DIR --product P``):

``mvtec`` (alias ``synthetic``: the synthetic generator writes this layout)
    ``DIR/P/train/good/*`` normal training images; ``DIR/P/test/<type>/*`` test images
    (``good`` = normal, any other folder = a defect type); ``DIR/P/ground_truth/<type>/
    <stem>_mask.png`` masks (``<stem>.<ext>`` is accepted too). Masks are required for every
    defect image of a type whose ``ground_truth/<type>`` folder exists: a missing one is a
    :class:`DatasetError` naming the file. If the whole ``ground_truth/<type>`` folder is
    absent, that type's images get ``mask_path=None`` and the type is recorded in
    ``ProductDataset.unmasked_defect_types`` (image-level metrics still work, pixel-level
    metrics skip them). A missing ``test`` folder gives an empty test split.

``visa``
    ``DIR/split_csv/1cls.csv`` with columns ``object,split,label,image,mask`` (paths relative
    to ``DIR``, ``label`` is ``normal``/``anomaly``, ``split`` is ``train``/``test``); the
    product is the ``object`` column. VisA masks use values 0/1..n (not 255): any non-zero
    pixel is a defect. The split file names no defect classes, so anomalous images get defect
    type ``"anomaly"``. A ``train`` row labelled ``anomaly`` (absent from the official split)
    is moved to test: anomalies are never trained on.

``folder``
    ``DIR/P/good/*`` normal images and one sub-folder per defect type ``DIR/P/<type>/*``
    (no masks; folders named ``ground_truth``/``masks``/``mask`` are ignored). There is no
    explicit split, so a seeded, deterministic 20 % of the good images goes to test (at least
    one when there are two or more). Use the ``mvtec`` layout to fix the split yourself.

Images are files with extension png, jpg, jpeg, bmp, tif or tiff (any case); names starting
with ``.`` (macOS ``._*`` files) are skipped. ``auto`` picks ``visa`` when the split file lists
the product, else ``mvtec`` when ``P/train/good`` exists, else ``folder`` when ``P/good``
exists.
"""

from __future__ import annotations

import csv
from pathlib import Path

from edge_ad.data.samples import GOOD, Sample, deterministic_holdout, sort_samples
from edge_ad.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUTS = ("mvtec", "visa", "folder")
LAYOUT_ALIASES = {"synthetic": "mvtec"}
LAYOUT_CHOICES = ("auto", *LAYOUTS, *LAYOUT_ALIASES)
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_DEFECT_TYPE = "anomaly"
MASK_DIR_NAMES = frozenset({"ground_truth", "masks", "mask"})
FOLDER_TEST_FRACTION = 0.2
FOLDER_SPLIT_SEED = 0

_NORMAL_LABELS = {"normal", "good", "0"}
_ANOMALY_LABELS = {"anomaly", "anomalous", "bad", "defect", "1"}
_EXTS = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)

Scan = tuple[tuple[Sample, ...], tuple[Sample, ...], tuple[str, ...]]
"""What a layout scanner returns: ``(train, test, unmasked_defect_types)``."""


def is_image(path: Path) -> bool:
    """True for a visible file whose extension is an image extension (any case)."""
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted; empty if the folder does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image(p))


def normalize_layout(layout: str) -> str:
    """Lower-case ``layout`` and resolve aliases (``synthetic`` -> ``mvtec``); keeps ``auto``."""
    name = str(layout).strip().lower()
    name = LAYOUT_ALIASES.get(name, name)
    if name != "auto" and name not in LAYOUTS:
        raise DatasetError(
            f"unknown dataset layout '{layout}'; use one of {', '.join(LAYOUT_CHOICES)}"
        )
    return name


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_mvtec(product_dir: Path) -> bool:
    return (product_dir / "train" / GOOD).is_dir()


def _is_folder(product_dir: Path) -> bool:
    return (product_dir / GOOD).is_dir()


def visa_objects(data_root: Path) -> list[str]:
    """Sorted ``object`` values of ``DATA_ROOT/split_csv/1cls.csv`` (empty if there is none)."""
    rows = _read_visa_rows(Path(data_root)) if (Path(data_root) / VISA_SPLIT_CSV).is_file() else []
    return sorted({row["object"] for _, row in rows})


def list_products(data_root: Path) -> list[str]:
    """Products found in ``data_root`` in any layout, sorted."""
    root = Path(data_root)
    if not root.is_dir():
        return []
    found = {d.name for d in _subdirs(root) if _is_mvtec(d) or _is_folder(d)}
    found.update(visa_objects(root))
    return sorted(found)


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DatasetError(
            f"data root {root} does not exist; pass --data-root pointing at the folder that "
            "holds one folder per product (or split_csv/1cls.csv for VisA)"
        )
    if not root.is_dir():
        raise DatasetError(f"data root {root} is not a directory; pass the dataset folder instead")


def _unknown_product(root: Path, product: str) -> DatasetError:
    found = list_products(root)
    shown = ", ".join(found[:20]) + (f", ... ({len(found)} in all)" if len(found) > 20 else "")
    msg = (
        f"product '{product}' not found in {root} (found: {shown or 'none'}); expected "
        f"{root / product / 'train' / GOOD} (MVTec), {root / product / GOOD} (folder) or rows "
        f"with object={product} in {root / VISA_SPLIT_CSV} (VisA)"
    )
    if _is_mvtec(root) or _is_folder(root):
        msg += (
            f"; {root} itself looks like a product folder: pass --data-root {root.parent} "
            f"--product {root.name}"
        )
    return DatasetError(msg)


def _unrecognised(root: Path, product: str) -> DatasetError:
    pdir = root / product
    return DatasetError(
        f"cannot recognise the dataset layout of {pdir}; expected MVTec ({pdir}/train/good, "
        f"{pdir}/test/<type>), VisA ({root / VISA_SPLIT_CSV}) or folder ({pdir}/good plus one "
        "folder per defect type)"
    )


def detect_layout(data_root: str | Path, product: str) -> str:
    """Return ``"mvtec"``, ``"visa"`` or ``"folder"`` for ``product`` under ``data_root``.

    Raises:
        DatasetError: missing data root, unknown product (the message lists the products
            found) or a product folder in none of the three layouts.
    """
    root = Path(data_root).expanduser()
    _check_root(root)
    if not product:
        raise DatasetError("no product given; pass --product NAME (a folder in the data root)")
    if product in visa_objects(root):
        return "visa"
    pdir = root / product
    if _is_mvtec(pdir):
        return "mvtec"
    if _is_folder(pdir):
        return "folder"
    if pdir.is_dir():
        raise _unrecognised(root, product)
    raise _unknown_product(root, product)


def scan_layout(data_root: str | Path, product: str, layout: str, **folder_options) -> Scan:
    """List the images of ``product`` in ``layout`` (not ``auto``): ``(train, test,
    unmasked_defect_types)``. ``folder_options`` (``test_fraction``, ``seed``) go to the
    folder layout."""
    root = Path(data_root).expanduser()
    _check_root(root)
    layout = normalize_layout(layout)
    if layout == "mvtec":
        return scan_mvtec(root, product)
    if layout == "visa":
        return scan_visa(root, product)
    if layout == "folder":
        return scan_folder(root, product, **folder_options)
    raise ValueError(f"scan_layout needs a concrete layout, got {layout!r}")


def _require_layout_dir(folder: Path, root: Path, product: str, layout: str) -> None:
    """``folder`` must exist: else the product is unknown, or in another layout."""
    if folder.is_dir():
        return
    pdir = root / product
    if not pdir.is_dir():
        raise _unknown_product(root, product)
    raise DatasetError(
        f"{folder} not found, so {pdir} is not in {layout}; fix the folders or use --layout auto"
    )


def _require_training_images(images: list[Path], folder: Path) -> None:
    if not images:
        raise DatasetError(
            f"no images in {folder} (extensions: {_EXTS}); put the product's normal images there"
        )


def _mask_index(gt_dir: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in gt_dir.iterdir() if is_image(p)}


def _find_mask(index: dict[str, Path], stem: str) -> Path | None:
    """``<stem>_mask.png`` (MVTec), then ``<stem>_mask.<ext>``, then ``<stem>.<ext>``."""
    candidates = [f"{stem}_mask{ext}" for ext in IMAGE_EXTENSIONS]
    candidates += [f"{stem}{ext}" for ext in IMAGE_EXTENSIONS]
    for candidate in candidates:
        hit = index.get(candidate.lower())
        if hit is not None:
            return hit
    return None


def scan_mvtec(root: Path, product: str) -> Scan:
    """MVTec layout (see the module docstring for the mask policy)."""
    pdir = root / product
    train_dir = pdir / "train" / GOOD
    _require_layout_dir(
        train_dir,
        root,
        product,
        "MVTec layout (P/train/good, P/test/<type>, P/ground_truth/<type>)",
    )
    train_images = list_images(train_dir)
    _require_training_images(train_images, train_dir)
    train = tuple(Sample(p, 0, GOOD, None) for p in train_images)

    test: list[Sample] = []
    unmasked: list[str] = []
    test_dir = pdir / "test"
    if test_dir.is_dir():
        for type_dir in _subdirs(test_dir):
            images = list_images(type_dir)
            kind = type_dir.name
            if kind == GOOD:
                test.extend(Sample(p, 0, GOOD, None) for p in images)
                continue
            if not images:
                continue
            gt_dir = pdir / "ground_truth" / kind
            if not gt_dir.is_dir():
                unmasked.append(kind)
                test.extend(Sample(p, 1, kind, None) for p in images)
                continue
            index = _mask_index(gt_dir)
            for image in images:
                mask = _find_mask(index, image.stem)
                if mask is None:
                    raise DatasetError(
                        f"mask for defect image {image} not found (expected "
                        f"{gt_dir / (image.stem + '_mask.png')}); add it, or delete {gt_dir} "
                        f"to evaluate '{kind}' without pixel metrics"
                    )
                test.append(Sample(image, 1, kind, mask))
    return train, sort_samples(test), tuple(unmasked)


def _read_visa_rows(root: Path) -> list[tuple[int, dict[str, str]]]:
    csv_path = root / VISA_SPLIT_CSV
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            missing = [c for c in VISA_COLUMNS if c not in header]
            if missing:
                raise DatasetError(
                    f"{csv_path} lacks column(s) {', '.join(missing)}; a VisA split file has "
                    f"the header {','.join(VISA_COLUMNS)}"
                )
            reader.fieldnames = header
            return [
                (line, {k: (v or "").strip() for k, v in row.items() if k in VISA_COLUMNS})
                for line, row in enumerate(reader, start=2)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(
            f"cannot read {csv_path}: {exc}; re-extract the VisA archive into {root}"
        ) from exc


def scan_visa(root: Path, product: str) -> Scan:
    """VisA layout: rows of ``split_csv/1cls.csv`` whose ``object`` is ``product``."""
    csv_path = root / VISA_SPLIT_CSV
    if not csv_path.is_file():
        if not (root / product).is_dir():
            raise _unknown_product(root, product)
        raise DatasetError(
            f"{csv_path} not found, so {root} is not in VisA layout; extract the VisA archive "
            "there (split_csv/1cls.csv included) or use --layout auto"
        )
    rows = [(line, row) for line, row in _read_visa_rows(root) if row["object"] == product]
    if not rows:
        raise _unknown_product(root, product)

    train: list[Sample] = []
    test: list[Sample] = []
    for line, row in rows:
        where = f"{csv_path} line {line}"
        split, label = row["split"].lower(), row["label"].lower()
        if split not in ("train", "test"):
            raise DatasetError(f"{where}: unknown split '{row['split']}' (expected train or test)")
        if label not in _NORMAL_LABELS | _ANOMALY_LABELS:
            raise DatasetError(
                f"{where}: unknown label '{row['label']}' (expected normal or anomaly)"
            )
        if not row["image"]:
            raise DatasetError(f"{where}: empty image path; fix or re-extract {csv_path}")
        image = root / row["image"]
        if not image.is_file():
            raise DatasetError(
                f"{where}: image {image} not found; re-extract the VisA archive into {root}"
            )
        if label in _NORMAL_LABELS:
            sample = Sample(image, 0, GOOD, None)
            (train if split == "train" else test).append(sample)
            continue
        mask = root / row["mask"] if row["mask"] else None
        if mask is not None and not mask.is_file():
            raise DatasetError(
                f"{where}: mask {mask} not found; re-extract the VisA archive into {root}"
            )
        test.append(Sample(image, 1, VISA_DEFECT_TYPE, mask))

    if not train:
        raise DatasetError(
            f"no training images for object '{product}' in {csv_path}; the split file must list "
            "rows with split=train, label=normal"
        )
    unmasked = (
        (VISA_DEFECT_TYPE,) if any(s.label == 1 and s.mask_path is None for s in test) else ()
    )
    return sort_samples(train), sort_samples(test), unmasked


def scan_folder(
    root: Path,
    product: str,
    test_fraction: float = FOLDER_TEST_FRACTION,
    seed: int = FOLDER_SPLIT_SEED,
) -> Scan:
    """Folder layout: ``P/good`` plus one folder per defect type; a seeded ``test_fraction``
    of the good images (at least one when there are two or more) goes to test."""
    pdir = root / product
    good_dir = pdir / GOOD
    _require_layout_dir(
        good_dir, root, product, "folder layout (P/good plus one folder per defect type)"
    )
    good_images = list_images(good_dir)
    _require_training_images(good_images, good_dir)
    normals = [Sample(p, 0, GOOD, None) for p in good_images]
    train, test_normals = deterministic_holdout(normals, test_fraction, seed, minimum=1)

    defects: list[Sample] = []
    unmasked: list[str] = []
    for type_dir in _subdirs(pdir):
        kind = type_dir.name
        if kind == GOOD or kind.lower() in MASK_DIR_NAMES:
            continue
        images = list_images(type_dir)
        if images:
            unmasked.append(kind)
            defects.extend(Sample(p, 1, kind, None) for p in images)
    return train, sort_samples([*test_normals, *defects]), tuple(unmasked)
