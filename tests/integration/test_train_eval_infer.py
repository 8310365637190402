"""End to end through the real CLI: generated product → train (tiny) → eval → infer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# The tiny profile works on 64 px frames, where a scratch or crack is 1-2 px wide and cannot
# be resolved; large defects can. Measured on this product (tiny, 2-core CPU): image AUROC
# contamination 1.00, missing_part 0.84, all types 0.62-0.64. Bounds leave margin for CPU
# nondeterminism; chance is 0.5.
MIN_LARGE_DEFECT_AUROC = 0.8
MIN_IMAGE_AUROC = 0.55


@pytest.mark.slow
def test_tiny_model_train_eval_infer(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    def edge_ad(*args: str) -> Any:
        result = run_cli(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    data, model, out = tmp_path / "data", tmp_path / "model", tmp_path / "out"
    edge_ad(
        "data",
        "synth",
        "-p",
        "board",
        "--out",
        str(data),
        "--image-size",
        "64",
        "--train",
        "60",
        "--test-good",
        "20",
        "--per-defect",
        "8",
    )
    train = edge_ad(
        "train",
        "-p",
        "board",
        "--data-root",
        str(data),
        "--profile",
        "tiny",
        "--output",
        str(model),
    )
    assert "bundle:" in train.stdout
    assert (model / "bundle.json").is_file()

    report_file = tmp_path / "report.json"
    edge_ad(
        "eval",
        "-p",
        "board",
        "--model",
        str(model),
        "--data-root",
        str(data),
        "--report",
        str(report_file),
    )
    report = json.loads(report_file.read_text())
    for key in (
        "product",
        "images",
        "image_auroc",
        "pixel_auroc",
        "pro",
        "pixel_ap",
        "f1_max",
        "seconds_per_image",
    ):
        assert key in report, key
    assert report["images"] == 20 + 5 * 8
    for key in ("image_auroc", "pixel_auroc", "pro", "pixel_ap", "f1_max"):
        assert 0.0 <= report[key] <= 1.0
    assert report["image_auroc"] > MIN_IMAGE_AUROC, report
    by_type = report["image_auroc_by_type"]
    large = (by_type["contamination"] + by_type["missing_part"]) / 2
    assert large > MIN_LARGE_DEFECT_AUROC, by_type

    # DIC sends large defects deeper than normal frames on average.
    def mean_t(hist: dict[str, int]) -> float:
        return sum(int(t) * c for t, c in hist.items()) / sum(hist.values())

    assert mean_t(report["timesteps"]["defect"]) > mean_t(report["timesteps"]["normal"])

    images = [
        data / "board" / "test" / "good" / "000.png",
        data / "board" / "test" / "missing_part" / "000.png",
    ]
    edge_ad("infer", "--model", str(model), *map(str, images), "--out", str(out))
    verdicts = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(verdicts) == {"good_000.json", "missing_part_000.json"}
    for v in verdicts.values():
        assert {"score", "threshold", "is_anomalous", "timestep", "boxes"} <= set(v)
        assert Path(v["overlay"]).is_file()
        assert v["is_anomalous"] == (v["score"] >= v["threshold"])
        assert v["is_anomalous"] == bool(v["boxes"])
