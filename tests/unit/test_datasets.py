"""Dataset layouts, the sample model, image reading and tensor conversion (tiny PIL trees)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_ad.data import (
    ImageFolderDataset,
    Sample,
    decode_image,
    detect_layout,
    list_products,
    load_dataset,
    load_images,
    load_masks,
    read_image,
    read_mask,
    split_train_val,
    to_tensor,
    to_uint8,
)
from edge_ad.errors import DatasetError

# ----------------------------------------------------------------------------- helpers


def write_image(path: Path, size: tuple[int, int] = (32, 24), mode: str = "RGB", seed: int = 0):
    """Write a random image of ``size`` (width, height) in PIL ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "RGB":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    elif mode == "RGBA":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    elif mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").quantize(8)
    else:
        raise ValueError(mode)
    img.save(path)
    return path


def write_mask(path: Path, size: tuple[int, int] = (32, 24), value: int = 255) -> Path:
    """A mask with a defect rectangle in the top-left quarter holding ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.zeros((h, w), dtype=np.uint8)
    arr[: h // 2, : w // 2] = value
    Image.fromarray(arr, "L").save(path)
    return path


def make_mvtec(root: Path, product: str = "bottle", n_train: int = 5, with_gt: bool = True) -> Path:
    pdir = root / product
    for i in range(n_train):
        write_image(pdir / "train" / "good" / f"{i:03d}.png", seed=i)
    for i in range(2):
        write_image(pdir / "test" / "good" / f"{i:03d}.png", seed=100 + i)
    for kind in ("scratch", "crack"):
        for i in range(2):
            write_image(pdir / "test" / kind / f"{i:03d}.png", seed=200 + i)
            if with_gt:
                write_mask(pdir / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root


def make_visa(root: Path, objects: tuple[str, ...] = ("candle",)) -> Path:
    rows = ["object,split,label,image,mask"]
    for obj in objects:
        base = f"{obj}/Data"
        for i in range(4):
            rel = f"{base}/Images/Normal/{i:04d}.JPG"
            img = Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8))
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / rel, format="JPEG")
            rows.append(f"{obj},{'train' if i < 3 else 'test'},normal,{rel},")
        for i in range(2):
            rel = f"{base}/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{base}/Masks/Anomaly/{i:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(root / rel, format="JPEG")
            write_mask(root / mrel, size=(30, 20), value=i + 1)  # VisA: 1..n, not 255
            rows.append(f"{obj},test,anomaly,{rel},{mrel}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def make_folder(root: Path, product: str = "widget", n_good: int = 10) -> Path:
    pdir = root / product
    for i in range(n_good):
        write_image(pdir / "good" / f"g{i:02d}.jpg", seed=i)
    for kind in ("dent", "stain"):
        for i in range(3):
            write_image(pdir / kind / f"{kind}{i}.bmp", seed=300 + i)
    (pdir / "notes.txt").write_text("not an image")
    return root


# ----------------------------------------------------------------------------- layouts


def test_mvtec_layout_reads_back_with_masks(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    (tmp_path / "bottle" / "train" / "good" / "readme.txt").write_text("ignored")
    (tmp_path / "bottle" / "train" / "good" / "._000.png").write_bytes(b"macos junk")
    ds = load_dataset(tmp_path, "bottle", layout="mvtec")

    assert ds.layout == "mvtec" and ds.product == "bottle" and ds.root == tmp_path
    assert len(ds.train) == 5
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in ds.train)
    assert [s.image_path.name for s in ds.train] == [f"{i:03d}.png" for i in range(5)]
    anomalous = [s for s in ds.test if s.label == 1]
    assert len(anomalous) == 4 and len(ds.test) == 6
    for s in anomalous:
        assert s.mask_path == (
            tmp_path / "bottle" / "ground_truth" / s.defect_type / f"{s.image_path.stem}_mask.png"
        )
    assert ds.defect_types == ("crack", "scratch") and ds.has_masks
    assert ds.unmasked_defect_types == ()
    summary = ds.summary()
    assert summary["train"] == {"good": 5}
    assert summary["test"] == {"crack": 2, "good": 2, "scratch": 2}
    assert (summary["n_test_normal"], summary["n_test_anomalous"], summary["n_test_masks"]) == (
        2,
        4,
        4,
    )


def test_mvtec_missing_mask_names_the_file(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    (tmp_path / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"001\.png.*001_mask\.png") as err:
        load_dataset(tmp_path, "bottle")
    assert "\n" not in str(err.value)


def test_mvtec_without_ground_truth_folder_has_no_masks(tmp_path: Path) -> None:
    make_mvtec(tmp_path, with_gt=False)
    ds = load_dataset(tmp_path, "bottle")
    assert all(s.mask_path is None for s in ds.test)
    assert ds.unmasked_defect_types == ("crack", "scratch")
    assert not ds.has_masks
    assert ds.summary()["unmasked_defect_types"] == ["crack", "scratch"]


def test_synthetic_is_an_alias_of_mvtec(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    assert load_dataset(tmp_path, "bottle", layout="synthetic").layout == "mvtec"
    assert load_dataset(tmp_path, "bottle", layout="MVTec").layout == "mvtec"


def test_visa_layout_from_split_csv(tmp_path: Path) -> None:
    make_visa(tmp_path, objects=("candle", "pcb1"))
    ds = load_dataset(tmp_path, "candle", layout="visa")
    assert ds.layout == "visa"
    assert len(ds.train) == 3 and all(s.label == 0 for s in ds.train)
    assert all("candle" in s.image_path.parts for s in ds.train + ds.test)
    assert sum(s.label for s in ds.test) == 2 and len(ds.test) == 3
    anomalies = [s for s in ds.test if s.label == 1]
    assert all(s.defect_type == "anomaly" and s.mask_path is not None for s in anomalies)
    # VisA masks hold small values (1, 2), which count as defect.
    for s in anomalies:
        mask = read_mask(s.mask_path, 16)
        assert mask.dtype == bool and mask[:8, :8].all() and not mask[8:, :].any()
    assert list_products(tmp_path) == ["candle", "pcb1"]


def test_visa_missing_image_and_bad_header(tmp_path: Path) -> None:
    make_visa(tmp_path)
    (tmp_path / "candle" / "Data" / "Images" / "Normal" / "0001.JPG").unlink()
    with pytest.raises(DatasetError, match=r"0001\.JPG not found"):
        load_dataset(tmp_path, "candle")
    (tmp_path / "split_csv" / "1cls.csv").write_text("object,image\ncandle,x.png\n")
    with pytest.raises(DatasetError, match="lacks column"):
        load_dataset(tmp_path, "candle", layout="visa")


def test_folder_layout_splits_good_deterministically(tmp_path: Path) -> None:
    make_folder(tmp_path)
    ds = load_dataset(tmp_path, "widget", layout="folder")
    again = load_dataset(tmp_path, "widget")
    assert ds == again and ds.layout == "folder"
    test_good = [s for s in ds.test if s.label == 0]
    assert len(test_good) == 2 and len(ds.train) == 8  # 20 % of 10 good images
    assert not {s.image_path for s in ds.train} & {s.image_path for s in ds.test}
    assert sorted(ds.defect_types) == ["dent", "stain"]
    assert all(s.mask_path is None for s in ds.test)
    assert ds.unmasked_defect_types == ("dent", "stain")
    other_seed = load_dataset(tmp_path, "widget", seed=1, test_fraction=0.5)
    assert len(other_seed.train) == 5


@pytest.mark.parametrize(
    ("maker", "product", "expected"),
    [
        (make_mvtec, "bottle", "mvtec"),
        (make_visa, "candle", "visa"),
        (make_folder, "widget", "folder"),
    ],
)
def test_auto_detection(tmp_path: Path, maker, product: str, expected: str) -> None:
    maker(tmp_path)
    assert detect_layout(tmp_path, product) == expected
    assert load_dataset(tmp_path, product).layout == expected


def test_unknown_product_lists_what_was_found(tmp_path: Path) -> None:
    make_mvtec(tmp_path, product="bottle")
    make_folder(tmp_path, product="widget")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path, "nope")
    msg = str(err.value)
    assert "'nope' not found" in msg and "found: bottle, widget" in msg and "\n" not in msg
    assert "nope/train/good (MVTec)" in msg


def test_empty_dir_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"'nope' not found in .* \(found: none\)"):
        load_dataset(tmp_path, "nope")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing", "bottle")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(tmp_path / "file.txt", "bottle")


def test_unrecognised_structure_lists_the_layouts(tmp_path: Path) -> None:
    write_image(tmp_path / "thing" / "pictures" / "a.png")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path, "thing")
    msg = str(err.value)
    assert "MVTec" in msg and "VisA" in msg and "folder" in msg and "\n" not in msg


def test_product_folder_passed_as_data_root_gets_a_hint(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    with pytest.raises(DatasetError, match=r"looks like a product folder.*--product bottle"):
        load_dataset(tmp_path / "bottle", "bottle")


def test_no_images_and_wrong_explicit_layout(tmp_path: Path) -> None:
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True)
    (tmp_path / "bottle" / "train" / "good" / "x.txt").write_text("no image")
    with pytest.raises(DatasetError, match=r"no images in .*png, jpg, jpeg, bmp, tif, tiff"):
        load_dataset(tmp_path, "bottle")
    with pytest.raises(DatasetError, match="not in folder layout"):
        load_dataset(tmp_path, "bottle", layout="folder")
    with pytest.raises(DatasetError, match="not in VisA layout"):
        load_dataset(tmp_path, "bottle", layout="visa")
    with pytest.raises(DatasetError, match="unknown dataset layout 'coco'"):
        load_dataset(tmp_path, "bottle", layout="coco")


def test_image_extensions_are_case_insensitive(tmp_path: Path) -> None:
    for i, ext in enumerate(("PNG", "jpg", "JPEG", "bmp", "TIF", "tiff")):
        write_image(tmp_path / "p" / "train" / "good" / f"{i}.{ext}", seed=i)
    ds = load_dataset(tmp_path, "p")
    assert len(ds.train) == 6


# ----------------------------------------------------------------------------- splits


def _train_samples(n: int) -> tuple[Sample, ...]:
    return tuple(Sample(Path(f"/d/train/good/{i:03d}.png"), 0, "good", None) for i in range(n))


def test_split_train_val_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    samples = _train_samples(30)
    train, val = split_train_val(samples, val_fraction=0.1, seed=3)
    train2, val2 = split_train_val(tuple(reversed(samples)), val_fraction=0.1, seed=3)
    assert (train, val) == (train2, val2)  # input order does not matter
    assert len(val) == 3 and len(train) == 27
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(samples)
    assert list(val) == sorted(val, key=lambda s: str(s.image_path))
    _, val_other = split_train_val(samples, val_fraction=0.1, seed=4)
    assert val_other != val


def test_split_train_val_minimums(tmp_path: Path) -> None:
    train, val = split_train_val(_train_samples(2), val_fraction=0.0)
    assert len(train) == 1 and len(val) == 1  # min_val applies when n >= 2
    train, val = split_train_val(_train_samples(5), val_fraction=0.0, min_val=0)
    assert len(val) == 0
    with pytest.raises(DatasetError, match="at least 2"):
        split_train_val(_train_samples(1))
    with pytest.raises(ValueError):
        split_train_val([Sample(Path("/x.png"), 1, "crack", None)] * 3)


def test_split_train_val_only_touches_training_images(tmp_path: Path) -> None:
    make_mvtec(tmp_path, n_train=10)
    ds = load_dataset(tmp_path, "bottle")
    _, val = split_train_val(ds.train, val_fraction=0.2)
    assert set(val) <= set(ds.train) and set(val).isdisjoint(ds.test)
    assert len(val) == 2


# ----------------------------------------------------------------------------- reading


def test_mixed_sizes_and_modes_become_rgb_squares(tmp_path: Path) -> None:
    paths = [
        write_image(tmp_path / "rgb.png", (40, 30), "RGB"),
        write_image(tmp_path / "small.jpg", (8, 12), "RGB"),
        write_image(tmp_path / "grey.png", (33, 33), "L"),
        write_image(tmp_path / "rgba.png", (20, 50), "RGBA"),
        write_image(tmp_path / "pal.png", (16, 16), "P"),
        write_image(tmp_path / "deep.png", (16, 16), "I;16"),
        write_image(tmp_path / "grey.tif", (24, 24), "L"),
    ]
    for path in paths:
        arr = read_image(path, 16)
        assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8, path.name
    grey = read_image(tmp_path / "grey.png", 33)  # same size: no resampling
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert np.array_equal(grey[..., 0], np.asarray(Image.open(tmp_path / "grey.png")))
    deep = np.asarray(Image.open(tmp_path / "deep.png")).astype(np.float64)
    assert np.abs(read_image(tmp_path / "deep.png", 16)[..., 0] - deep / 257).max() <= 0.5 + 1e-6
    samples = [Sample(p, 0, "good", None) for p in paths]
    calls: list[tuple[int, int]] = []
    batch = load_images(samples, 12, progress=lambda i, n: calls.append((i, n)), workers=2)
    assert batch.shape == (len(paths), 12, 12, 3) and batch.dtype == np.uint8
    assert calls[-1] == (len(paths), len(paths)) and len(calls) == len(paths)
    assert np.array_equal(batch[0], read_image(paths[0], 12))
    assert np.array_equal(decode_image((tmp_path / "rgb.png").read_bytes(), 12), batch[0])


def test_corrupt_and_missing_images_raise_dataset_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DatasetError, match=r"bad\.png") as err:
        read_image(bad, 8)
    assert "\n" not in str(err.value)
    good = write_image(tmp_path / "trunc.jpg", (64, 64))
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"trunc\.jpg"):
        read_image(tmp_path / "trunc.jpg", 8)
    with pytest.raises(DatasetError, match=r"gone\.png"):
        read_image(tmp_path / "gone.png", 8)
    with pytest.raises(DatasetError, match=r"bad\.png"):
        read_mask(bad, 8)


def test_read_mask(tmp_path: Path) -> None:
    assert not read_mask(None, 10).any() and read_mask(None, 10).shape == (10, 10)
    m255 = read_mask(write_mask(tmp_path / "a.png", (20, 20), 255), 10)
    m1 = read_mask(write_mask(tmp_path / "b.png", (20, 20), 1), 10)
    assert m255.dtype == bool and np.array_equal(m255, m1)
    assert m1[:5, :5].all() and not m1[5:, :].any() and not m1[:, 5:].any()
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[0, 0, 2] = 3  # only one channel set
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    assert read_mask(tmp_path / "rgb.png", 8).sum() == 1
    samples = [
        Sample(tmp_path / "x.png", 1, "d", tmp_path / "a.png"),
        Sample(tmp_path / "y.png", 0, "good", None),
    ]
    masks = load_masks(samples, 10)
    assert masks.shape == (2, 10, 10) and masks[0].sum() == 25 and not masks[1].any()


# ----------------------------------------------------------------------------- tensors


def test_to_tensor_range_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    images[0, 0, 0] = (0, 255, 128)
    t = to_tensor(images)
    assert t.shape == (3, 3, 5, 7) and t.dtype == torch.float32
    assert t.min() >= -1.0 and t.max() <= 1.0
    assert t[0, 0, 0, 0] == -1.0 and t[0, 1, 0, 0] == 1.0
    assert np.array_equal(to_uint8(t), images)
    every_value = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    single = to_tensor(every_value)
    assert single.shape == (1, 3, 16, 16)
    assert np.array_equal(to_uint8(single[0]), every_value)
    assert to_uint8(torch.full((1, 3, 2, 2), 5.0)).max() == 255  # clamped
    with pytest.raises(ValueError):
        to_tensor(images.astype(np.float32))


def test_image_folder_dataset_items_collate(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    ds = load_dataset(tmp_path, "bottle")
    data = ImageFolderDataset(ds.test, size=16)
    assert len(data) == len(ds.test)
    item = data[[s.label for s in ds.test].index(1)]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert item["label"] == 1 and item["mask"].sum() > 0 and item["defect_type"] != "good"
    assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16) and len(batch["path"]) == 4
    plain = ImageFolderDataset(ds.train, size=16)
    assert torch.equal(plain[0]["image"], plain[0]["image"])  # no augmentation by default
    torch.manual_seed(0)
    augmented = ImageFolderDataset(ds.train, size=16, augment=True, hflip=True)
    assert augmented[0]["image"].shape == (3, 16, 16)
