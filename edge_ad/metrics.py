"""Evaluation metrics for visual anomaly detection.

Image level: AUROC and the best F1 over thresholds. Pixel level: AUROC, average precision and
AUPRO, the MVTec AD per-region-overlap score, which weighs every defect region equally so that
one large scratch cannot hide a missed small dent.

Every function takes numpy arrays (or anything ``np.asarray`` accepts) and returns a python
float in [0, 1]. Bad input raises :class:`~edge_ad.errors.DatasetError` with a one-line message:
an all-normal test split, masks that do not match the maps or a model that produced NaN is
something the user fixes, and the CLI shows it without a traceback. A bad parameter
(``fpr_limit``, ``quantile``) raises :class:`~edge_ad.errors.ConfigError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from edge_ad.errors import ConfigError, DatasetError

__all__ = [
    "aupro",
    "evaluate",
    "f1_max",
    "f1_optimal_threshold",
    "image_auroc",
    "pixel_ap",
    "pixel_auroc",
    "quantile_threshold",
]

# 8-connectivity inside each image and none across images: a (3, 3, 3) structure whose middle
# plane is all ones, so one ``ndimage.label`` call labels a whole (N, H, W) stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# ----------------------------------------------------------------------------- validation


def _as_float_array(values: Any, fn: str, what: str) -> np.ndarray:
    """Numeric array of floats; keeps float32 maps as they are (half the memory of float64)."""
    try:
        arr = np.asarray(values)
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{fn}: {what} must be numeric, got {type(values).__name__}") from exc
    if arr.size == 0:
        raise DatasetError(f"{fn}: {what} is empty")
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise DatasetError(
            f"{fn}: {what} contain {bad} NaN or infinite value(s); the model output is invalid"
        )
    return arr


def _image_inputs(labels: Any, scores: Any, fn: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (labels as int8 in {0, 1}, scores as float) of equal length N >= 1."""
    y = np.asarray(labels)
    if y.size == 0:
        raise DatasetError(f"{fn}: labels is empty")
    if y.ndim != 1:
        raise DatasetError(f"{fn}: labels must be 1-D (N,), got shape {y.shape}")
    try:
        ok = bool(np.isin(y, (0, 1)).all())
    except TypeError:
        ok = False
    if not ok:
        raise DatasetError(f"{fn}: labels must be 0 (normal) or 1 (anomalous)")
    s = _as_float_array(scores, fn, "scores")
    if s.ndim != 1 or s.shape[0] != y.shape[0]:
        raise DatasetError(
            f"{fn}: labels and scores must have the same length, "
            f"got labels {y.shape} and scores {s.shape}"
        )
    y = y.astype(np.int8)
    n_pos = int(y.sum())
    if n_pos in (0, y.size):
        only = "anomalous" if n_pos else "normal"
        raise DatasetError(
            f"{fn} needs both normal and anomalous images; got only {only} (N={y.size})"
        )
    return y, s


def _pixel_inputs(masks: Any, maps: Any, fn: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (bool masks, float maps) of the same shape, with defect and normal pixels."""
    m = np.asarray(masks)
    if m.size == 0:
        raise DatasetError(f"{fn}: masks is empty")
    a = _as_float_array(maps, fn, "anomaly maps")
    if m.shape != a.shape:
        raise DatasetError(
            f"{fn}: masks and anomaly maps must have the same shape, "
            f"got masks {m.shape} and maps {a.shape}"
        )
    try:
        m = m != 0  # nonzero = defect: accepts bool, 0/1 and 0/255 masks
    except TypeError as exc:
        raise DatasetError(f"{fn}: masks must be numeric or boolean") from exc
    n_defect = int(np.count_nonzero(m))
    n_images = m.shape[0] if m.ndim >= 3 else 1
    if n_defect == 0:
        raise DatasetError(
            f"{fn} needs at least one defect pixel in the masks; got none "
            f"({n_images} mask(s), {m.size} pixels)"
        )
    if n_defect == m.size:
        raise DatasetError(
            f"{fn} needs at least one normal pixel; every mask pixel is a defect ({m.size} pixels)"
        )
    return m, a


def _as_image_stack(arr: np.ndarray, fn: str) -> np.ndarray:
    """(N, H, W) view of (H, W), (N, H, W) or (N, 1, H, W) maps, for per-image regions."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        return arr
    if arr.ndim == 4 and arr.shape[1] == 1:
        return arr[:, 0]
    raise DatasetError(f"{fn}: masks and maps must be (N, H, W), got shape {arr.shape}")


# ----------------------------------------------------------------------------- image level


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of image scores: threshold-free, 0.5 = chance, 1 = perfect."""
    y, s = _image_inputs(labels, scores, "image_auroc")
    return float(roc_auc_score(y, s))


def _f1_curve(labels: Any, scores: Any, fn: str) -> tuple[np.ndarray, np.ndarray]:
    """F1 at each distinct score threshold (increasing), with those thresholds."""
    y, s = _image_inputs(labels, scores, fn)
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold; drop it. Where both are 0,
    # F1 is 0, not NaN.
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return f1, thresholds


def f1_max(labels: Any, scores: Any) -> float:
    """Best F1 over all thresholds: what a well-tuned threshold could reach on this data."""
    f1, _ = _f1_curve(labels, scores, "f1_max")
    return float(f1.max())


def f1_optimal_threshold(labels: Any, scores: Any) -> float:
    """Score threshold reaching :func:`f1_max` with the rule ``anomalous iff score >= threshold``.

    The threshold is one of the given scores. When several thresholds tie on F1, the lowest is
    returned, which favours recall: a missed defect usually costs more than a false alarm.
    """
    f1, thresholds = _f1_curve(labels, scores, "f1_optimal_threshold")
    return float(thresholds[int(np.argmax(f1))])


def quantile_threshold(normal_scores: Any, quantile: float = 0.99) -> float:
    """Threshold from scores of normal-only validation images (no defect samples needed).

    ``quantile=0.99`` flags about 1 % of normal parts as anomalous; it is the usual way to set
    a line's threshold before any defect has been collected.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ConfigError(f"quantile_threshold: quantile must be in [0, 1], got {quantile}")
    s = _as_float_array(normal_scores, "quantile_threshold", "normal scores")
    return float(np.quantile(s.ravel(), quantile))


# ----------------------------------------------------------------------------- pixel level


def pixel_auroc(masks: Any, maps: Any) -> float:
    """ROC AUC over all pixels of all images (nonzero mask pixel = defect)."""
    m, a = _pixel_inputs(masks, maps, "pixel_auroc")
    return float(roc_auc_score(m.ravel(), a.ravel()))


def pixel_ap(masks: Any, maps: Any) -> float:
    """Average precision over all pixels; unlike AUROC it is not flattered by the huge number of
    easy normal pixels, so it shows how clean the predicted defect area is."""
    m, a = _pixel_inputs(masks, maps, "pixel_ap")
    return float(average_precision_score(m.ravel(), a.ravel()))


def _normal_fpr(
    normal: np.ndarray, thresholds: np.ndarray, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    """FPR(>= d) and FPR(> d) of the normal pixels for each threshold ``d``.

    Exact wherever FPR(>= d) <= ``fpr_limit``, which is all the area needs: only the top
    ``floor(fpr_limit * n) + 1`` normal scores are sorted (``np.partition`` finds them in linear
    time), about 3x faster than sorting every normal pixel. Thresholds below that cut get the
    sentinel FPR 1.0; the curve already lies beyond ``fpr_limit`` there, and the segment that
    crosses the limit towards the first sentinel vertex is horizontal in the exact curve too,
    so the interpolated value at ``fpr_limit`` is unchanged. ``normal`` is reordered in place.
    """
    n = normal.size
    keep = int(np.floor(fpr_limit * n)) + 1  # this many top normal pixels exceed the limit
    cut, ties_below = -np.inf, 0
    top = normal
    if keep < n:
        kth = n - keep
        normal.partition(kth)  # normal[:kth] <= normal[kth] <= normal[kth:]
        cut = normal[kth]
        ties_below = int(np.count_nonzero(normal[:kth] == cut))
        top = normal[kth:]
    top.sort()
    ge = top.size - np.searchsorted(top, thresholds, side="left")
    gt = top.size - np.searchsorted(top, thresholds, side="right")
    ge = ge + np.where(thresholds == cut, ties_below, 0)  # pixels equal to the cut, left part
    fpr_ge, fpr_gt = ge / float(n), gt / float(n)
    beyond = thresholds < cut
    fpr_ge[beyond] = 1.0
    fpr_gt[beyond] = 1.0
    return fpr_ge, fpr_gt


def _pro_curve(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    """PRO-over-FPR curve as a polyline (fpr, pro) from (0, 0) to (1, 1), exact up to fpr_limit.

    Same curve as the MVTec AD reference ``compute_pro`` (every distinct score is a threshold,
    a pixel is positive iff score >= threshold, equal scores are one threshold), but only the
    vertices are kept: between two distinct defect-pixel scores the PRO is constant, so the
    thresholds that only move normal pixels lie on a horizontal line and add nothing to the
    area. Each distinct defect score ``d`` gives two vertices, ``(FPR(> d), PRO before d)``
    and ``(FPR(>= d), PRO(>= d))``; the segment between them is vertical unless normal pixels
    tie with ``d``, in which case it is the reference's diagonal. Beyond ``fpr_limit`` the FPR
    values are not exact (see :func:`_normal_fpr`).
    """
    regions, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    region_of = regions[masks]  # region id of every defect pixel (row-major, as maps[masks])
    del regions
    sizes = np.bincount(region_of, minlength=n_regions + 1)
    weights = 1.0 / (sizes[region_of] * float(n_regions))  # sums to 1 / n_regions per region
    defect = maps[masks]

    order = np.argsort(defect, kind="stable")[::-1]  # descending score
    defect = defect[order]
    pro = np.cumsum(weights[order])
    last = np.flatnonzero(np.append(defect[1:] != defect[:-1], True))  # end of each tie group
    thresholds = defect[last]
    pro = np.clip(pro[last], 0.0, 1.0)

    fpr_ge, fpr_gt = _normal_fpr(maps[~masks], thresholds, fpr_limit)

    k = thresholds.size
    fpr = np.empty(2 * k + 2)
    pros = np.empty(2 * k + 2)
    fpr[0], pros[0], fpr[-1], pros[-1] = 0.0, 0.0, 1.0, 1.0
    fpr[1:-1:2], fpr[2:-1:2] = fpr_gt, fpr_ge
    pros[1:-1:2] = np.concatenate(([0.0], pro[:-1]))
    pros[2:-1:2] = pro
    return fpr, pros


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x nondecreasing, from 0 to 1) for x in [0, x_max];
    y at x_max is interpolated linearly, as in the MVTec reference ``trapezoid_area``."""
    i = int(np.searchsorted(x, x_max, side="right"))  # x[:i] <= x_max < x[i]
    xs, ys = x[:i], y[:i]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if i < x.size and xs[-1] < x_max:
        y_at = ys[-1] + (y[i] - ys[-1]) * (x_max - xs[-1]) / (x[i] - xs[-1])
        area += 0.5 * (ys[-1] + y_at) * (x_max - xs[-1])
    return area


def aupro(
    masks: Any, maps: Any, fpr_limit: float = 0.3, num_thresholds: int | None = None
) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD AUPRO).

    Regions are the 8-connected components of each image's mask. At a threshold, PRO is the
    mean over all regions of the fraction of the region's pixels scored >= threshold, and FPR
    is the fraction of normal pixels (outside every mask, all images) scored >= threshold.
    The area under PRO(FPR) on [0, fpr_limit] (the curve interpolated at exactly fpr_limit) is
    divided by fpr_limit, so a perfect map scores 1 and a constant map ``fpr_limit / 2``.

    The curve is exact (every distinct score is a threshold, no grid) and computed by sorting,
    so 700 maps of 256x256 take a few seconds. ``num_thresholds`` is accepted for callers that
    pass a grid size and ignored: the exact curve needs none.
    """
    del num_thresholds  # exact computation: kept only for signature compatibility
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")
    m, a = _pixel_inputs(masks, maps, "aupro")
    m, a = _as_image_stack(m, "aupro"), _as_image_stack(a, "aupro")
    fpr, pro = _pro_curve(m, a, fpr_limit)
    return float(np.clip(_area_up_to(fpr, pro, fpr_limit) / fpr_limit, 0.0, 1.0))


# ----------------------------------------------------------------------------- summary


def evaluate(
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Standard metrics of one test set.

    Always ``image_auroc`` and ``f1_max``; with masks and maps also ``pixel_auroc``, ``pro``
    (AUPRO up to ``fpr_limit``) and ``pixel_ap``. Masks of normal images are all zero; only the
    set as a whole needs a defect pixel.
    """
    result = {"image_auroc": image_auroc(labels, scores), "f1_max": f1_max(labels, scores)}
    if masks is None and maps is None:
        return result
    if masks is None or maps is None:
        given, missing = ("masks", "maps") if maps is None else ("maps", "masks")
        raise DatasetError(f"evaluate: {given} given without {missing}; pass both or neither")
    m, a = np.asarray(masks), np.asarray(maps)
    n_labels = np.asarray(labels).shape[0]
    n_images = m.shape[0] if m.ndim >= 3 else 1
    if n_images != n_labels:
        raise DatasetError(
            f"evaluate: {n_labels} labels but {n_images} masks (shape {m.shape}); "
            "need one mask per image"
        )
    result["pixel_auroc"] = pixel_auroc(m, a)
    result["pro"] = aupro(m, a, fpr_limit=fpr_limit)
    result["pixel_ap"] = pixel_ap(m, a)
    return result
