"""What a person looks at: heatmap overlays and defect boxes.

Boxes are the connected regions of the anomaly map at or above the detector's threshold. The
image score is the map's maximum, so an image is anomalous exactly when it has at least one
region: verdict and boxes can never disagree.
"""

from __future__ import annotations

import cv2
import numpy as np


def defect_regions(amap: np.ndarray, threshold: float, min_area: int = 4) -> list[dict]:
    """Connected regions of ``amap >= threshold``: ``[{x, y, w, h, area, score}]``, biggest
    score first (pixel coordinates of ``amap``). Regions under ``min_area`` pixels are dropped
    unless they hold the image's maximum (so an anomalous image always has a box)."""
    if not np.isfinite(threshold):
        return []
    binary = (amap >= threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    peak = np.unravel_index(int(np.argmax(amap)), amap.shape)
    regions = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        holds_peak = labels[peak] == label
        if area < min_area and not holds_peak:
            continue
        score = float(amap[labels == label].max())
        regions.append({"x": x, "y": y, "w": w, "h": h, "area": area, "score": score})
    return sorted(regions, key=lambda r: -r["score"])


def heatmap_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    threshold: float,
    regions: list[dict] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """RGB uint8 image with the anomaly map as a JET overlay and red boxes around regions.

    The colour scale is fixed relative to the threshold (≤ 0 → blue, threshold → yellow-red,
    ≥ 2×threshold → dark red), so colours mean the same thing on every image of a product.
    (Maps are in units of the normal images' spread, so most normal pixels sit near 0.)
    """
    hi = 2.0 * threshold if np.isfinite(threshold) and threshold > 0 else float(amap.max())
    scaled = np.clip(amap / max(hi, 1e-8), 0.0, 1.0)
    colour = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    if colour.shape[:2] != image.shape[:2]:
        colour = cv2.resize(colour, (image.shape[1], image.shape[0]))
    out = cv2.addWeighted(image, 1.0 - alpha, colour, alpha, 0.0)
    sy, sx = image.shape[0] / amap.shape[0], image.shape[1] / amap.shape[1]
    for r in regions or []:
        p0 = (int(r["x"] * sx), int(r["y"] * sy))
        p1 = (int((r["x"] + r["w"]) * sx) - 1, int((r["y"] + r["h"]) * sy) - 1)
        cv2.rectangle(out, p0, p1, (255, 0, 0), 1)
    return out


def side_by_side(*panels: np.ndarray, gap: int = 4) -> np.ndarray:
    """Panels of equal height in one row with a white gap (input | reconstruction | heatmap)."""
    h = max(p.shape[0] for p in panels)
    spacer = np.full((h, gap, 3), 255, dtype=np.uint8)
    row: list[np.ndarray] = []
    for i, p in enumerate(panels):
        if i:
            row.append(spacer)
        row.append(p)
    return np.concatenate(row, axis=1)
