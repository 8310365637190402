"""DiffusionAD, RAN and knn end to end, as a user runs them: `edge-ad train --method M` (a Ray Train
job, tracked and registered in MLflow) → `edge-ad eval` / `infer` from the registry → serving
(the MLflow pyfunc and Serve's frame scorer for RAN; the real Kafka + Ray Serve line for
DiffusionAD)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_ad import registry
from edge_ad.methods import detector_class
from edge_ad.stream.broker import EmbeddedBroker
from edge_ad.stream.kafka_io import read_topic
from edge_ad.stream.schema import DLQ_TOPIC, VERDICTS_TOPIC, Verdict
from pipelines.compare import entry_folder, split_entry
from tests.integration.test_stream_cli import serving

pytestmark = pytest.mark.slow

RunCli = Callable[..., subprocess.CompletedProcess[str]]
# Enough training for every stage to run on real weights, in about a minute on 2 cores.
QUICK = ["autoencoder.epochs=4", "unet.epochs=20", "data.max_train_images=24"]
METRICS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap", "f1_max")


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def _train_and_eval(run_cli: RunCli, tmp_path: Path, product: str, method: str, *sets: str) -> dict:
    """Generate ``product``, train ``method`` on it, evaluate the registered version."""
    data = tmp_path / "data"
    _ok(run_cli("data", "synth", "-p", product, "--out", str(data), "--image-size", "64",
                "--train", "40", "--test-good", "8", "--per-defect", "3"))  # fmt: skip
    overrides = [arg for s in (*QUICK, *sets) for arg in ("--set", s)]
    train = _ok(run_cli("train", "-p", product, "--data-root", str(data), "--profile", "tiny",
                        "--method", method, *overrides))  # fmt: skip
    assert f"method {method}" in train.stdout
    assert f"registered edge-ad-{product} version 1" in train.stdout

    (version,) = registry.list_versions(product)
    assert version.tags["method"] == method  # the registry says which detector it holds
    assert "image_auroc" in version.metrics

    report_file = tmp_path / "report.json"
    _ok(run_cli("eval", "-p", product, "--model", f"models:/edge-ad-{product}@staging",
                "--data-root", str(data), "--report", str(report_file)))  # fmt: skip
    report = json.loads(report_file.read_text())
    assert report["method"] == method and report["images"] == 8 + 5 * 3
    for key in METRICS:
        assert 0.0 <= report[key] <= 1.0, (key, report)
    return {"data": data, "report": report}


def _infer_then_serve(
    run_cli: RunCli, tmp_path: Path, product: str, data: Path, defect: str
) -> tuple[list[dict], list]:
    """``edge-ad infer`` on a good and a ``defect`` test image from the registry, then check
    that Serve's frame scorer and the MLflow pyfunc score exactly what infer scored."""
    import mlflow
    import pandas as pd
    from PIL import Image

    from edge_ad.engine import resolve_model
    from edge_ad.stream.scoring import encode_image, score_frames

    images = [data / product / "test" / t / "000.png" for t in ("good", defect)]
    out = tmp_path / "out"
    _ok(run_cli("infer", "--model", f"models:/edge-ad-{product}@staging", *map(str, images),
                "--out", str(out)))  # fmt: skip
    verdicts = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert len(verdicts) == 2
    for v in verdicts:
        assert v["severity_distance"] is None  # valid JSON, no NaN
        assert Path(v["overlay"]).is_file()
        assert v["is_anomalous"] == (v["score"] >= v["threshold"])
    bundle = resolve_model(f"models:/edge-ad-{product}@staging", device="cpu")
    frames = [encode_image(np.asarray(Image.open(p).convert("RGB"))) for p in images]
    scored = score_frames(bundle.detector, frames)
    by_name = {Path(v["image"]).parent.name: v["score"] for v in verdicts}
    assert [s.score for s in scored] == pytest.approx([by_name["good"], by_name[defect]])
    assert all(s.severity_distance is None for s in scored)
    mlflow.set_tracking_uri(registry.tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(f"models:/edge-ad-{product}@staging")
        rows = model.predict(pd.DataFrame({"image": frames}))
    finally:
        mlflow.set_tracking_uri(None)
    assert list(rows["score"]) == pytest.approx([s.score for s in scored], rel=1e-5)
    return verdicts, scored


def test_ran_train_eval_infer_and_serving_paths(run_cli: RunCli, tmp_path: Path) -> None:
    product = "ran-board"
    run = _train_and_eval(run_cli, tmp_path, product, "ran")
    verdicts, _ = _infer_then_serve(run_cli, tmp_path, product, run["data"], "missing_part")
    for v in verdicts:
        assert v["method"] == "ran" and v["timestep"] == 100


def test_knn_train_eval_infer_and_serving_paths(run_cli: RunCli, tmp_path: Path) -> None:
    """The patch memory alone as a method: no generative stages, a two-panel overlay, and the
    same score from infer, Serve's frame scorer and the MLflow pyfunc."""
    from PIL import Image

    from edge_ad.engine import resolve_model

    product = "knn-board"
    run = _train_and_eval(run_cli, tmp_path, product, "knn")
    report = run["report"]
    # A memory of 36 generated boards separates their defects well; recall and FPR at the
    # threshold are reported beside the AUROCs.
    assert report["image_auroc"] >= 0.8, report
    assert 0.0 <= report["recall_at_threshold"] <= 1.0
    assert 0.0 <= report["false_positive_rate_at_threshold"] <= 1.0
    assert set(report["ms_per_image_by_stage"]) == {"features", "memory", "map"}
    verdicts, _ = _infer_then_serve(run_cli, tmp_path, product, run["data"], "stain")
    for v in verdicts:
        assert v["method"] == "knn" and v["timestep"] == 0
        assert Image.open(v["overlay"]).size == (64 * 2 + 4, 64)  # input | heatmap, no x̂
    bundle = resolve_model(f"models:/edge-ad-{product}@staging", device="cpu")
    assert "vae_config" not in bundle.meta and bundle.detector.memory is not None


def test_diffusionad_train_eval_and_stream(
    run_cli: RunCli, tmp_path: Path, edge_home: Path
) -> None:
    product = "dad-board"
    _train_and_eval(run_cli, tmp_path, product, "diffusionad", "diffusionad.seg_epochs=3")
    _ok(run_cli("promote", "-p", product, "--version", "1"))

    with EmbeddedBroker(port=0) as broker, serving(edge_home, product, broker.bootstrap):
        truth = tmp_path / "truth.jsonl"
        _ok(run_cli("replay", "-p", product, "--count", "8", "--fps", "0",
                    "--defect-rate", "0.5", "--truth", str(truth),
                    "--bootstrap-servers", broker.bootstrap))  # fmt: skip
        sent = {json.loads(line)["frame_id"] for line in truth.read_text().splitlines()}
        assert len(sent) == 8
        seen: dict[str, Verdict] = {}
        deadline = time.monotonic() + 180

        def done() -> bool:
            return set(seen) >= sent or time.monotonic() > deadline

        for record in read_topic(VERDICTS_TOPIC, broker.bootstrap, follow=True, stop=done):
            verdict = Verdict.from_json(record.value)
            seen[verdict.frame_id] = verdict
        assert set(seen) >= sent
        for v in seen.values():
            assert v.product == product and v.model_version == "1"
            assert v.timestep == 200  # DiffusionAD's t_s, whatever the frame
            assert v.severity_distance is None and 0.0 <= v.score <= 1.0
            assert v.is_anomalous == (v.score >= v.threshold)
        assert not list(read_topic(DLQ_TOPIC, broker.bootstrap))


def test_compare_trains_each_method_on_one_split_without_registering(
    run_cli: RunCli, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    _ok(run_cli("data", "synth", "-p", "cmp-board", "--out", str(data), "--image-size", "64",
                "--train", "24", "--test-good", "6", "--per-defect", "2"))  # fmt: skip
    fast = ["autoencoder.epochs=1", "unet.epochs=2", "adapt.epochs=0", "diffusionad.seg_epochs=1"]
    report_file = tmp_path / "cmp.json"
    result = _ok(run_cli("compare", "-p", "cmp-board", "--data-root", str(data), "--profile",
                         "tiny", "--methods", "d3ad,d3ad@latent.space=features,diffusionad,knn",
                         "--report", str(report_file),
                         "--output", str(tmp_path / "models"),
                         *[a for s in fast for a in ("--set", s)]))  # fmt: skip
    for column in ("I-AUROC", "P-AUROC", "PRO", "AP", "recall", "FPR", "s/img", "train min"):
        assert column in result.stdout
    report = json.loads(report_file.read_text())
    features = "d3ad@latent.space=features"
    assert list(report["methods"]) == ["d3ad", features, "diffusionad", "knn"]
    assert features in result.stdout  # the variant's row says what it is, in full
    assert report["split"] == {"train_images": 22, "val_images": 2, "test_images": 6 + 5 * 2}
    for entry, row in report["methods"].items():
        method = split_entry(entry)[0]
        assert row["method"] == method  # the evaluated bundle is the method's own
        bundle = tmp_path / "models" / entry_folder(entry) / "bundle.json"
        space = json.loads(bundle.read_text())["settings"]["latent"]["space"]
        assert space == ("features" if entry == features else "vae")
        for key in METRICS:
            assert 0.0 <= row[key] <= 1.0, (method, key, row)
        assert row["seconds_per_image"] > 0 and row["train_minutes"] > 0
        assert 0.0 <= row["false_positive_rate_at_threshold"] <= 1.0
        # Where the time goes, in the method's own stages.
        stages = row["ms_per_image_by_stage"]
        assert set(stages) == set(detector_class(method).STAGES), (method, stages)
        assert all(ms >= 0 for ms in stages.values()) and sum(stages.values()) > 0
    assert registry.list_versions("cmp-board") == []  # tracked, not registered
