"""Tests of edge_ad.metrics: hand-computed values, a brute-force AUPRO reference, bad input."""

from __future__ import annotations

from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score

from edge_ad.errors import ConfigError, DatasetError, EdgeADError
from edge_ad.metrics import (
    aupro,
    evaluate,
    f1_max,
    f1_optimal_threshold,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    quantile_threshold,
)

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


# ----------------------------------------------------------------------------- helpers


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Brute force after the MVTec AD evaluation code (``compute_pro`` + ``trapezoid_area``):
    one curve point per distinct score, positive iff score >= threshold, then (0,0)/(1,1)."""
    regions = [ndimage.label(m, structure=np.ones((3, 3), dtype=int))[0] for m in masks]
    n_normal = sum(int((r == 0).sum()) for r in regions)
    fprs, pros = [0.0], [0.0]
    for th in np.unique(maps)[::-1]:
        overlaps, fp = [], 0
        for reg, amap in zip(regions, maps, strict=True):
            pos = amap >= th
            fp += int((pos & (reg == 0)).sum())
            overlaps += [pos[reg == k].mean() for k in range(1, reg.max() + 1)]
        fprs.append(fp / n_normal)
        pros.append(float(np.mean(overlaps)))
    fprs.append(1.0)
    pros.append(1.0)
    x, y = np.array(fprs), np.array(pros)
    correction = 0.0
    if fpr_limit not in x:
        i = bisect(x, fpr_limit)
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (fpr_limit - x[i - 1]) / (x[i] - x[i - 1])
        correction = 0.5 * (y_at + y[i - 1]) * (fpr_limit - x[i - 1])
    keep = x <= fpr_limit
    x, y = x[keep], y[keep]
    return float((np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction) / fpr_limit)


def _square_masks() -> np.ndarray:
    """Two 8x8 images; image 0 has a 3x3 defect, image 1 is normal."""
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:5, 2:5] = True
    return masks


def _blob_masks() -> tuple[np.ndarray, np.ndarray]:
    """Ten separate 3x3 blobs, five in each of two 20x20 images; and which blobs are 'found'
    (three in image 0, two in image 1). 800 - 90 = 710 normal pixels."""
    masks = np.zeros((2, 20, 20), dtype=bool)
    found = np.zeros_like(masks)
    for img in range(2):
        for b, col in enumerate(range(1, 20, 4)):
            masks[img, 8:11, col : col + 3] = True
            if b < 3 - img:
                found[img, 8:11, col : col + 3] = True
    return masks, found


# ----------------------------------------------------------------------------- image level


def test_image_auroc_perfect_inverted_constant() -> None:
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_image_auroc_hand_case() -> None:
    # Pairs (anomalous > normal): 0.35 > 0.1, 0.8 > 0.1, 0.8 > 0.4; 0.35 < 0.4 -> 3/4.
    result = image_auroc(LABELS, SCORES)
    assert result == pytest.approx(0.75)
    assert isinstance(result, float)


def test_image_auroc_accepts_arrays_and_bools() -> None:
    assert image_auroc(np.array(LABELS, dtype=bool), np.array(SCORES)) == pytest.approx(0.75)


def test_f1_max_hand_case() -> None:
    # th=0.8: P=1, R=1/2, F1=2/3; th=0.4: 1/2; th=0.35: P=2/3, R=1 -> 0.8; th=0.1: 2/3.
    assert f1_max(LABELS, SCORES) == pytest.approx(0.8)


def test_f1_optimal_threshold_hand_case_and_rule() -> None:
    th = f1_optimal_threshold(LABELS, SCORES)
    assert th == pytest.approx(0.35)
    predicted = np.array(SCORES) >= th
    assert f1_score(LABELS, predicted) == pytest.approx(0.8)


def test_f1_optimal_threshold_reproduces_f1_max_with_ties() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 50)
    scores = np.round(rng.normal(size=100) + labels, 1)  # rounding creates tied scores
    th = f1_optimal_threshold(labels, scores)
    assert f1_score(labels, scores >= th) == pytest.approx(f1_max(labels, scores))
    assert f1_max(labels, scores) < 1.0  # overlapping classes: the check is not trivial


def test_quantile_threshold() -> None:
    assert quantile_threshold(list(range(101))) == pytest.approx(99.0)
    assert quantile_threshold(np.arange(101), quantile=0.5) == pytest.approx(50.0)
    assert quantile_threshold([3.0], quantile=0.9) == 3.0
    with pytest.raises(DatasetError, match="empty"):
        quantile_threshold([])
    with pytest.raises(DatasetError, match="NaN"):
        quantile_threshold([0.1, float("nan")])
    with pytest.raises(ConfigError, match="quantile"):
        quantile_threshold([0.1, 0.2], quantile=1.5)


# ----------------------------------------------------------------------------- pixel level


def test_pixel_auroc_perfect_and_inverted() -> None:
    masks = _square_masks()
    assert pixel_auroc(masks, masks.astype(float)) == 1.0
    assert pixel_auroc(masks, 1.0 - masks) == 0.0


def test_pixel_auroc_mask_values_nonzero_is_defect() -> None:
    masks = _square_masks().astype(np.uint8) * 255
    assert pixel_auroc(masks, masks / 255.0) == 1.0


def test_pixel_ap_hand_case() -> None:
    # Ranked: 0.8 (defect, P=1, R=1/2), 0.4 (normal), 0.35 (defect, P=2/3, R=1)
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    masks = np.array([[[0, 0], [1, 1]]])
    maps = np.array([[[0.1, 0.4], [0.35, 0.8]]])
    assert pixel_ap(masks, maps) == pytest.approx(5 / 6)
    assert pixel_ap(_square_masks(), _square_masks().astype(float)) == 1.0


def test_aupro_perfect_map() -> None:
    masks = _square_masks()
    assert aupro(masks, masks.astype(np.float32)) == 1.0


def test_aupro_inverted_map() -> None:
    masks = _square_masks()
    result = aupro(masks, 1.0 - masks)
    assert result < 0.05
    assert result == 0.0  # every normal pixel outscores the defect: PRO is 0 until FPR 1


def test_aupro_constant_map() -> None:
    # One threshold: the curve jumps from (0,0) straight to (1,1), so PRO = FPR and the
    # normalised area on [0, L] is (L^2 / 2) / L = L / 2.
    masks = _square_masks()
    assert aupro(masks, np.full(masks.shape, 0.7)) == pytest.approx(0.15)
    assert aupro(masks, np.full(masks.shape, 0.7), fpr_limit=0.1) == pytest.approx(0.05)


def test_aupro_single_region_half_covered_with_tie() -> None:
    # 10x10 image, one 4x5 region (20 px), 80 normal px.
    # Region: 10 px at 0.9, 10 px at 0.4. Normal: 8 px at 0.6, 16 px at 0.4, 56 px at 0.1.
    # Curve: (0,0) -> th 0.9: (0, 1/2) -> th 0.6: (0.1, 1/2) -> th 0.4: (0.3, 1) (a diagonal,
    # since normal pixels tie with the region's 0.4) -> th 0.1: (1, 1).
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 0:4, 0:5] = True
    maps = np.full((1, 10, 10), 0.1)
    region = np.full(20, 0.4)
    region[:10] = 0.9
    maps[masks] = region
    normal = np.full(80, 0.1)
    normal[:8] = 0.6
    normal[8:24] = 0.4
    maps[~masks] = normal
    # [0, 0.1]: 0.5 * 0.1 = 0.05; [0.1, 0.3]: (0.5 + 1) / 2 * 0.2 = 0.15 -> 0.2 / 0.3.
    assert aupro(masks, maps) == pytest.approx(2 / 3)
    # Limit inside the diagonal: PRO(0.2) = 0.75 -> (0.05 + (0.5 + 0.75) / 2 * 0.1) / 0.2.
    assert aupro(masks, maps, fpr_limit=0.2) == pytest.approx(0.5625)
    assert aupro(masks, maps) == pytest.approx(_reference_aupro(masks, maps, 0.3))
    assert aupro(masks, maps, fpr_limit=0.2) == pytest.approx(_reference_aupro(masks, maps, 0.2))


def test_aupro_many_small_regions_half_detected() -> None:
    masks, found = _blob_masks()
    # Found blobs 1.0, missed blobs 0.0, normal 0.5: PRO is 5/10 from FPR 0 to 1.
    maps = np.where(found, 1.0, np.where(masks, 0.0, 0.5))
    assert aupro(masks, maps) == pytest.approx(0.5)
    # Now 71 of the 710 normal pixels (FPR 0.1) score 0.8 and the missed blobs 0.5, above the
    # other normal pixels (0.2): PRO 0.5 on [0, 0.1], then 1.0 on [0.1, 0.3].
    normal = np.full(710, 0.2)
    normal[:71] = 0.8
    maps = np.where(found, 1.0, np.where(masks, 0.5, 0.0))
    maps[~masks] = normal
    assert aupro(masks, maps) == pytest.approx((0.5 * 0.1 + 1.0 * 0.2) / 0.3)


def test_aupro_fpr_limit_normalisation() -> None:
    # Two regions: one scored above every normal pixel, one below. PRO = 1/2 for every FPR
    # in [0, 1), so the normalised area is 1/2 whatever the limit.
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[0, 6:9, 6:9] = True
    maps = np.linspace(0.2, 0.8, 100).reshape(1, 10, 10)
    maps[0, 1:3, 1:3] = 1.0
    maps[0, 6:9, 6:9] = 0.0
    for limit in (0.05, 0.1, 0.3, 0.5, 1.0):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(0.5)


def test_aupro_uses_8_connectivity() -> None:
    # One pixel touching a 3-pixel bar diagonally: one region of 4 px with 8-connectivity
    # (PRO 1/4 if only the single pixel is found); 4-connectivity would give (1 + 0) / 2.
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 2, 2] = True
    masks[0, 3, 3:6] = True
    maps = np.where(masks, 0.0, 0.5)
    maps[0, 2, 2] = 1.0
    assert aupro(masks, maps) == pytest.approx(0.25)


def test_aupro_regions_do_not_join_across_images() -> None:
    # The same 2x2 spot in two images is two regions, each weighing 1/2.
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[:, 2:4, 2:4] = True
    maps = np.where(masks, 0.0, 0.5)
    maps[0][masks[0]] = 1.0
    assert aupro(masks, maps) == pytest.approx(0.5)


@pytest.mark.parametrize("fpr_limit", [0.02, 0.1, 0.3, 1.0])
def test_aupro_matches_brute_force_reference(fpr_limit: float) -> None:
    rng = np.random.default_rng(7)
    masks = np.zeros((4, 24, 24), dtype=bool)
    for img in range(3):  # image 3 stays normal
        for _ in range(3):
            y, x = rng.integers(0, 20, size=2)
            h, w = rng.integers(1, 6, size=2)
            masks[img, y : y + h, x : x + w] = True
    # Few distinct levels: many ties between normal and defect pixels and at the cut.
    maps = np.round(rng.random(masks.shape) * 0.6 + 0.4 * masks, 1).astype(np.float32)
    expected = _reference_aupro(masks, maps, fpr_limit)
    assert 0.05 < expected < 0.95  # neither trivial end
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("fpr_limit", [0.013, 0.137, 0.3])
def test_aupro_matches_brute_force_reference_distinct_scores(fpr_limit: float) -> None:
    # Continuous scores (no ties) and limits that fall between FPR steps: checks the cut
    # that decides which normal pixels are sorted exactly.
    rng = np.random.default_rng(11)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 10:12, 1:3] = True
    masks[1, 4:9, 8:15] = True
    maps = rng.random(masks.shape) + 0.3 * masks
    expected = _reference_aupro(masks, maps, fpr_limit)
    assert 0.05 < expected < 0.95
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_accepts_single_image_and_channel_axis() -> None:
    masks, found = _blob_masks()
    maps = np.where(found, 1.0, np.where(masks, 0.0, 0.5))
    expected = aupro(masks, maps)
    assert aupro(masks[:, None], maps[:, None]) == pytest.approx(expected)
    assert aupro(masks[0], maps[0]) == pytest.approx(aupro(masks[:1], maps[:1]))


def test_aupro_rejects_bad_fpr_limit() -> None:
    masks = _square_masks()
    with pytest.raises(ConfigError, match="fpr_limit"):
        aupro(masks, masks.astype(float), fpr_limit=0.0)
    with pytest.raises(ConfigError, match="fpr_limit"):
        aupro(masks, masks.astype(float), fpr_limit=1.5)


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_image_only_and_with_masks() -> None:
    result = evaluate(LABELS, SCORES)
    assert result == pytest.approx({"image_auroc": 0.75, "f1_max": 0.8})

    masks = np.zeros((4, 8, 8), dtype=bool)  # images 0 and 1 normal: all-zero masks
    masks[2, 1:4, 1:4] = True
    masks[3, 4:7, 4:7] = True
    maps = masks.astype(np.float32)
    full = evaluate(LABELS, SCORES, masks=masks, maps=maps)
    assert set(full) == {"image_auroc", "f1_max", "pixel_auroc", "pro", "pixel_ap"}
    assert full["pixel_auroc"] == 1.0
    assert full["pro"] == 1.0
    assert full["pixel_ap"] == 1.0
    assert all(isinstance(v, float) for v in full.values())


def test_evaluate_needs_masks_and_maps_together_and_one_mask_per_image() -> None:
    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[2, 1:4, 1:4] = True
    with pytest.raises(DatasetError, match="without maps"):
        evaluate(LABELS, SCORES, masks=masks)
    with pytest.raises(DatasetError, match="4 labels but 3 masks"):
        evaluate(LABELS, SCORES, masks=masks[:3], maps=masks[:3].astype(float))


# ----------------------------------------------------------------------------- bad input


def test_all_normal_images_is_a_clear_dataset_error() -> None:
    with pytest.raises(DatasetError) as info:
        image_auroc([0, 0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert str(info.value) == (
        "image_auroc needs both normal and anomalous images; got only normal (N=5)"
    )
    assert isinstance(info.value, EdgeADError)
    with pytest.raises(DatasetError, match="got only anomalous"):
        f1_max([1, 1], [0.1, 0.2])
    with pytest.raises(DatasetError, match="got only normal"):
        evaluate([0, 0], [0.1, 0.2])


@pytest.mark.parametrize("fn", [pixel_auroc, pixel_ap, aupro])
def test_pixel_metrics_need_a_defect_pixel(fn) -> None:
    masks = np.zeros((3, 8, 8), dtype=bool)
    with pytest.raises(DatasetError, match="at least one defect pixel"):
        fn(masks, np.random.default_rng(0).random(masks.shape))
    with pytest.raises(DatasetError, match="at least one normal pixel"):
        fn(~masks, np.random.default_rng(0).random(masks.shape))


def test_shape_mismatch_is_a_dataset_error() -> None:
    with pytest.raises(DatasetError, match="same length"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    masks = _square_masks()
    for fn in (pixel_auroc, pixel_ap, aupro):
        with pytest.raises(DatasetError, match="same shape"):
            fn(masks, np.zeros((2, 8, 7)))


def test_nan_is_a_dataset_error() -> None:
    with pytest.raises(DatasetError, match="1 NaN"):
        image_auroc([0, 1], [0.1, float("nan")])
    masks = _square_masks()
    maps = masks.astype(float)
    maps[1, 0, 0] = np.nan
    for fn in (pixel_auroc, pixel_ap, aupro):
        with pytest.raises(DatasetError, match="NaN"):
            fn(masks, maps)


def test_empty_and_invalid_labels_are_dataset_errors() -> None:
    with pytest.raises(DatasetError, match="empty"):
        image_auroc([], [])
    with pytest.raises(DatasetError, match="empty"):
        pixel_auroc(np.zeros((0, 8, 8)), np.zeros((0, 8, 8)))
    with pytest.raises(DatasetError, match="0 \\(normal\\) or 1"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(DatasetError, match="numeric"):
        image_auroc([0, 1], ["a", "b"])
