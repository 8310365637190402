"""The procedural PCB generator: determinism, exact masks, defect sizes, dataset writer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_ad.data.synthetic import (
    DEFECT_TYPES,
    MIN_DEFECT_PIXELS,
    TEST_INDEX_OFFSET,
    SyntheticProduct,
    SynthSpec,
    generate_dataset,
    read_synth_json,
)
from edge_ad.errors import DatasetError

SMALL = ("scratch", "crack")
LARGE = ("missing_part", "contamination")


@pytest.fixture(scope="module")
def synth() -> SyntheticProduct:
    return SyntheticProduct("synth-pcb", 256, seed=0)


def _absdiff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1)


# ----------------------------------------------------------------------------- frames


def test_api_constants() -> None:
    assert DEFECT_TYPES == ("scratch", "missing_part", "stain", "crack", "contamination")
    assert SynthSpec() == SynthSpec(256, 200, 40, 12, DEFECT_TYPES, 0)


def test_normal_frame_shape_and_empty_mask(synth: SyntheticProduct) -> None:
    image, mask = synth.render(0)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert mask.shape == (256, 256) and mask.dtype == np.uint8
    assert not mask.any()
    assert 20 < image.mean() < 200 and image.std() > 10  # neither blank nor saturated


def test_render_is_deterministic(synth: SyntheticProduct) -> None:
    other = SyntheticProduct("synth-pcb", 256, seed=0)  # a fresh instance, same arguments
    for defect in (None, *DEFECT_TYPES):
        a_img, a_mask = synth.render(7, defect)
        b_img, b_mask = other.render(7, defect)
        assert np.array_equal(a_img, b_img), defect
        assert np.array_equal(a_mask, b_mask), defect


def test_frames_vary_with_index_seed_and_product(synth: SyntheticProduct) -> None:
    base = synth.render(3)[0]
    assert not np.array_equal(base, synth.render(4)[0])
    assert not np.array_equal(base, SyntheticProduct("synth-pcb", 256, seed=1).render(3)[0])
    assert not np.array_equal(base, SyntheticProduct("other-board", 256).render(3)[0])
    assert not np.array_equal(synth.render(3, "stain")[1], synth.render(4, "stain")[1])


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_mask_is_exactly_the_changed_region(synth: SyntheticProduct, defect: str) -> None:
    for index in (TEST_INDEX_OFFSET, TEST_INDEX_OFFSET + 1, 5):
        clean, none_mask = synth.render(index)
        image, mask = synth.render(index, defect)
        assert set(np.unique(mask).tolist()) == {0, 255}
        inside = mask > 0
        assert inside.sum() >= MIN_DEFECT_PIXELS
        diff = _absdiff(image, clean)
        # Same pose, lighting and noise: nothing changes outside the mask...
        assert not diff[~inside].any(), f"{defect}: pixels changed outside the mask"
        # ...and (nearly) every mask pixel visibly changed.
        assert (diff[inside] >= 3).mean() > 0.85, defect
        assert diff[inside].mean() > 10, defect
        assert not none_mask.any()


def test_defect_sizes(synth: SyntheticProduct) -> None:
    coverage = {
        d: [float((synth.render(TEST_INDEX_OFFSET + i, d)[1] > 0).mean()) for i in range(6)]
        for d in DEFECT_TYPES
    }
    mean = {d: float(np.mean(v)) for d, v in coverage.items()}
    for small in SMALL:
        assert 0.0005 < mean[small] < 0.012, (small, mean[small])
        for large in LARGE:
            assert mean[large] > 4 * mean[small], (large, small, mean)
    for large in LARGE:
        assert 0.04 < mean[large] < 0.3, (large, mean[large])
        assert min(coverage[large]) > 0.03, (large, coverage[large])
    assert mean["scratch"] < mean["stain"] < mean["contamination"]


def test_normal_frames_look_alike(synth: SyntheticProduct) -> None:
    """Two normal frames differ only by pose/lighting/noise jitter: much less than a large
    defect differs from the same frame without it, and hardly at all at coarse scale."""
    normals = [synth.render(i)[0].astype(np.float32) for i in range(5)]
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    normal_mad = float(np.mean([np.abs(normals[i] - normals[j]).mean() for i, j in pairs]))
    for defect in LARGE:
        in_defect = []
        for k in range(6):
            clean = synth.render(TEST_INDEX_OFFSET + k)[0].astype(np.float32)
            image, mask = synth.render(TEST_INDEX_OFFSET + k, defect)
            in_defect.append(float(np.abs(image - clean)[mask > 0].mean()))
        assert np.mean(in_defect) > 1.5 * normal_mad, (defect, in_defect, normal_mad)
    # Averaged over 32x32 blocks (pose jitter mostly cancels) normal frames are the same board.
    coarse = [img.reshape(8, 32, 8, 32, 3).mean(axis=(1, 3)) for img in normals]
    assert max(float(np.abs(coarse[i] - coarse[j]).mean()) for i, j in pairs) < 25


def test_render_speed(synth: SyntheticProduct) -> None:
    synth.render(0, "contamination")
    start = time.perf_counter()
    for i in range(10):
        synth.render(i)
        synth.render(i, DEFECT_TYPES[i % len(DEFECT_TYPES)])
    per_frame = (time.perf_counter() - start) / 20
    assert per_frame < 0.1  # ~5-12 ms on one core; generous for loaded CI machines


def test_small_image_size_works() -> None:
    small = SyntheticProduct("synth-pcb", 64)
    for defect in DEFECT_TYPES:
        image, mask = small.render(TEST_INDEX_OFFSET, defect)
        assert image.shape == (64, 64, 3) and (mask > 0).sum() >= MIN_DEFECT_PIXELS


# ----------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize("size", [32, 48, 100, 250, 0, -64, 64.0])
def test_invalid_image_size(size: object) -> None:
    with pytest.raises(DatasetError, match="multiple of 32"):
        SyntheticProduct("synth-pcb", size)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "-pcb", ".pcb", "a b", "a/b", "pcb!", "../x", "é"])
def test_invalid_product_name(name: str) -> None:
    with pytest.raises(DatasetError, match="product name"):
        SyntheticProduct(name)
    with pytest.raises(DatasetError, match="product name"):
        generate_dataset(name, "/nonexistent-never-written", SynthSpec(image_size=64))


def test_invalid_render_arguments(synth: SyntheticProduct) -> None:
    with pytest.raises(DatasetError) as info:
        synth.render(0, "dent")
    for name in DEFECT_TYPES:
        assert name in str(info.value)
    with pytest.raises(DatasetError):
        synth.render(-1)
    with pytest.raises(DatasetError):
        SyntheticProduct("synth-pcb", 64, seed=-1)


def test_product_names_allowed() -> None:
    for name in ("a", "A.b_c-9", "0pcb"):
        SyntheticProduct(name, 64)


# ----------------------------------------------------------------------------- datasets

TINY = SynthSpec(image_size=64, n_train=3, n_test_good=2, n_test_per_defect=2, seed=0)


def test_generate_dataset_tree(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    out = generate_dataset("tiny-pcb", tmp_path, TINY, progress=lambda d, t: calls.append((d, t)))
    assert out == tmp_path / "tiny-pcb"
    total = 3 + 2 + 2 * len(DEFECT_TYPES)
    assert calls == [(i, total) for i in range(1, total + 1)]

    def names(folder: str) -> list[str]:
        return sorted(p.name for p in (out / folder).iterdir())

    assert names("train/good") == ["000.png", "001.png", "002.png"]
    assert names("test/good") == ["000.png", "001.png"]
    assert sorted(names("test")) == sorted(["good", *DEFECT_TYPES])
    assert sorted(names("ground_truth")) == sorted(DEFECT_TYPES)
    for d in DEFECT_TYPES:
        assert names(f"test/{d}") == ["000.png", "001.png"]
        assert names(f"ground_truth/{d}") == ["000_mask.png", "001_mask.png"]
        for n in ("000", "001"):
            mask_img = Image.open(out / "ground_truth" / d / f"{n}_mask.png")
            assert mask_img.mode == "L" and mask_img.size == (64, 64)
            mask = np.asarray(mask_img)
            assert set(np.unique(mask).tolist()) == {0, 255}
            image = Image.open(out / "test" / d / f"{n}.png")
            assert image.mode == "RGB" and image.size == (64, 64)
    assert not [p for p in tmp_path.iterdir() if p.name != "tiny-pcb"]  # no temp folder left

    info = json.loads((out / "synth.json").read_text())
    assert info["product"] == "tiny-pcb"
    assert info["spec"]["image_size"] == 64 and info["spec"]["n_train"] == 3
    assert read_synth_json(out) == ("tiny-pcb", TINY)

    # Files are exactly the frames render() gives for the recorded indices.
    synth = SyntheticProduct("tiny-pcb", 64, 0)
    first_good = info["frame_indices"]["test/good"][0]
    assert first_good >= TEST_INDEX_OFFSET
    assert np.array_equal(np.asarray(Image.open(out / "train/good/001.png")), synth.render(1)[0])
    assert np.array_equal(
        np.asarray(Image.open(out / "test/good/000.png")), synth.render(first_good)[0]
    )

    # No test image equals a training image.
    train = [np.asarray(Image.open(p)) for p in sorted((out / "train/good").iterdir())]
    for p in (out / "test").rglob("*.png"):
        test_img = np.asarray(Image.open(p))
        assert not any(np.array_equal(test_img, t) for t in train), p


def test_generate_dataset_refuses_to_overwrite(tmp_path: Path) -> None:
    spec = SynthSpec(
        image_size=64,
        n_train=2,
        n_test_good=1,
        n_test_per_defect=1,
        seed=3,
        defect_types=("stain", "missing_part"),
    )
    out = generate_dataset("pcb", tmp_path, spec)
    before = (out / "train/good/000.png").read_bytes()
    with pytest.raises(DatasetError, match="overwrite"):
        generate_dataset("pcb", tmp_path, spec)
    (out / "stray.txt").write_text("x")
    again = generate_dataset("pcb", tmp_path, spec, overwrite=True)
    assert again == out and not (out / "stray.txt").exists()
    assert (out / "train/good/000.png").read_bytes() == before  # same spec, same files
    assert sorted(p.name for p in (out / "test").iterdir()) == ["good", "missing_part", "stain"]


def test_generate_dataset_into_existing_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "pcb").mkdir()
    spec = SynthSpec(image_size=64, n_train=1, n_test_good=0, n_test_per_defect=0)
    out = generate_dataset("pcb", tmp_path, spec)
    assert sorted(p.name for p in out.iterdir()) == ["synth.json", "train"]


@pytest.mark.parametrize(
    "spec",
    [
        SynthSpec(image_size=64, defect_types=("scratch", "dent")),
        SynthSpec(image_size=96 + 1),
        SynthSpec(image_size=32),
        SynthSpec(image_size=64, n_train=0),
        SynthSpec(image_size=64, n_test_good=-1),
        SynthSpec(image_size=64, seed=-2),
    ],
)
def test_generate_dataset_invalid_spec(tmp_path: Path, spec: SynthSpec) -> None:
    with pytest.raises(DatasetError):
        generate_dataset("pcb", tmp_path, spec)
    assert not (tmp_path / "pcb").exists()


def test_unknown_defect_lists_valid_types(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        generate_dataset("pcb", tmp_path, SynthSpec(image_size=64, defect_types=("dent",)))
    assert all(d in str(info.value) for d in DEFECT_TYPES)
