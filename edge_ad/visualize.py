"""What a person looks at: heatmap overlays and defect boxes.

Boxes are the connected regions of the anomaly map at or above the detector's threshold. The
image score is the map's maximum, so an image is anomalous exactly when it has at least one
region: verdict and boxes can never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


def scaled_map(amap: np.ndarray, threshold: float) -> np.ndarray:
    """The map on the fixed colour scale of every edge-ad heatmap: 0 → 0, 2×threshold and
    above → 1 (the map's own maximum when there is no usable threshold)."""
    hi = 2.0 * threshold if np.isfinite(threshold) and threshold > 0 else float(amap.max())
    return np.clip(amap / max(hi, 1e-8), 0.0, 1.0)


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
    scaled = scaled_map(amap, threshold)
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


def severity_histogram_png(
    train_distances: np.ndarray,
    bin_edges: np.ndarray,
    timesteps: Sequence[int],
    out: Path,
    test_distances: dict[str, np.ndarray] | None = None,
) -> Path:
    """PNG of the DIC severity bins: the histogram of the train mean-KNN distances over the
    fitted bin edges, each bin labelled with the T̂ it sends frames to, optionally with test
    distances (e.g. ``{"normal": ..., "defect": ...}``) overlaid. Logged to MLflow so a run shows
    whether defects actually land in deeper bins than normal frames.

    Densities, not counts, so a few dozen test frames compare with hundreds of train frames.
    Test frames beyond the last edge still take the last bin's T̂ (drawn to the right of it).
    """
    # The Agg canvas directly, not pyplot: no global backend switch, safe in worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = np.asarray(train_distances, dtype=np.float64).ravel()
    edges = np.asarray(bin_edges, dtype=np.float64).ravel()
    steps = [int(t) for t in timesteps]
    if len(steps) != len(edges) - 1:
        raise ValueError(f"{len(edges) - 1} bins but {len(steps)} timesteps")
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(train, bins=edges, density=True, color="0.75", edgecolor="0.4", label="train")
    width = float(edges[-1] - edges[0]) / max(len(steps), 1) or 1.0
    for name, values in (test_distances or {}).items():
        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if not values.size:
            continue
        # The train bins, extended at the same width to cover the test range.
        lo = min(float(edges[0]), float(values.min()))
        hi = max(float(edges[-1]), float(values.max()))
        n = max(1, int(np.ceil((hi - lo) / width)))
        ax.hist(
            values,
            bins=np.linspace(lo, lo + n * width, n + 1),
            density=True,
            histtype="step",
            linewidth=2,
            label=f"test {name} ({values.size})",
        )
    for edge in edges:
        ax.axvline(edge, color="0.3", linewidth=0.6, linestyle=":")
    top = ax.get_ylim()[1]
    ax.set_ylim(0, top * 1.3)  # headroom for the T̂ labels, vertical so narrow bins stay legible
    for left, right, t in zip(edges[:-1], edges[1:], steps, strict=True):
        ax.text(
            (left + right) / 2,
            top * 1.27,
            f"$\\hat{{T}}$={t}",
            ha="center",
            va="top",
            rotation=90,
            fontsize=7,
        )
    ax.set_xlabel("mean L1 distance to the K nearest train features (severity)")
    ax.set_ylabel("density")
    ax.set_title("DIC severity bins and the timestep each selects")
    ax.legend(loc="center right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
