from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_ad.paths import edge_home
from edge_ad.visualize import defect_regions, heatmap_overlay, side_by_side


def test_regions_are_the_connected_parts_above_threshold() -> None:
    amap = np.zeros((32, 32), dtype=np.float32)
    amap[2:6, 3:9] = 5.0  # 4x6 region
    amap[20:30, 20:22] = 3.0  # 10x2 region
    amap[15, 15] = 2.5  # a single pixel: dropped (too small) unless it holds the peak
    regions = defect_regions(amap, threshold=2.0, min_area=4)
    assert [(r["x"], r["y"], r["w"], r["h"], r["area"]) for r in regions] == [
        (3, 2, 6, 4, 24),
        (20, 20, 2, 10, 20),
    ]
    assert regions[0]["score"] == 5.0  # sorted by score
    assert defect_regions(amap, threshold=6.0) == []
    assert defect_regions(amap, threshold=float("nan")) == []


def test_the_peak_always_gets_a_box() -> None:
    amap = np.zeros((16, 16), dtype=np.float32)
    amap[7, 7] = 9.0
    regions = defect_regions(amap, threshold=1.0, min_area=4)
    assert len(regions) == 1 and regions[0]["area"] == 1


def test_overlay_and_panels_shapes() -> None:
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    amap = np.zeros((32, 32), dtype=np.float32)
    amap[4:8, 4:8] = 3.0
    overlay = heatmap_overlay(image, amap, 1.0, defect_regions(amap, 1.0))
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    assert not np.array_equal(overlay, image)
    assert side_by_side(image, overlay, gap=4).shape == (64, 132, 3)


def test_edge_home_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AD_HOME", str(tmp_path / "h"))
    assert edge_home() == tmp_path / "h" and (tmp_path / "h").is_dir()
