"""MLflow tracking and registry against a real sqlite store: runs, versions, the promotion gate,
loading ``models:/`` URIs back as bundles and as pyfunc models.

One bundle is trained per module and registered three times (better, worse, no metrics): the
gate compares the metrics recorded on the versions, not the weights.
"""

from __future__ import annotations

import base64
import io
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from edge_ad import registry
from edge_ad.bundle import load_bundle
from edge_ad.config import Settings
from edge_ad.d3ad.severity import timesteps_for_bins
from edge_ad.data.transforms import decode_image
from edge_ad.engine import TrainResult, as_chw
from edge_ad.errors import EdgeADError
from edge_ad.registry import PromotionRefused, RunTracker
from edge_ad.visualize import severity_histogram_png

pytestmark = pytest.mark.slow

PRODUCT = "synth-pcb"
NAME = "edge-ad-synth-pcb"
# The registry does not care how good the model is: the session's fast_model (no generative
# training) keeps the module well under a minute on 2 cores; scores still go through every stage.
REPORT = {
    "product": PRODUCT,
    "images": 32,
    "image_auroc": 0.9,
    "pixel_auroc": 0.8,
    "pro": 0.7,
    "pixel_ap": None,
    "f1_max": 0.75,
    "seconds_per_image": 0.25,
    "image_auroc_by_type": {"scratch": 0.95},
}


@dataclass
class Store:
    uri: str
    root: Path
    result: TrainResult
    settings: Settings
    tracker: RunTracker
    versions: list[int]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """On a shared 2-core box torch's OpenMP threads spin against the other jobs: a batch took
    12 s with 2 threads and 0.16 s with 1. Nothing here measures speed, so use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store(
    fast_model: tuple[Settings, TrainResult], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlruns.db"
    # Module fixtures run before the per-test EDGE_AD_HOME: give this one its own.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_AD_HOME", str(root / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)  # anything MLflow wrote to the CWD would show up here
        settings, result = fast_model

        tracker = registry.start_run(PRODUCT, settings.to_dict(), uri=uri, run_name="tiny")
        for step, loss in enumerate([1.0, 0.5, 0.25]):
            metrics: dict[str, Any] = {"unet_loss": loss, "bad": float("nan"), "text": "x"}
            tracker.log_metrics(metrics, step=step)

        plots = root / "plots"
        sev, s = result.detector.severity, settings.severity
        bins = np.arange(1, s.num_bins + 1)
        severity_histogram_png(
            sev.train_distances,
            sev.bin_edges,
            timesteps_for_bins(bins, s.num_bins, s.t_max, s.min_bin, s.round_to).tolist(),
            plots / "severity.png",
            {"normal": sev.train_distances * 1.1},
        )
        versions = [
            registry.log_trained_model(
                tracker, result.bundle_path, PRODUCT, REPORT, extra_artifacts={"plots": plots}
            ),
            registry.log_trained_model(
                tracker, result.bundle_path, PRODUCT, REPORT | {"image_auroc": 0.7}
            ),
            registry.log_trained_model(tracker, result.bundle_path, PRODUCT, None),
        ]
        tracker.finish()
        yield Store(uri, root, result, settings, tracker, versions)


def test_default_tracking_uri_follows_edge_home_and_env(
    edge_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = f"sqlite:///{edge_home.resolve()}/mlruns.db"
    assert registry.tracking_uri() == default
    assert registry.tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert registry.tracking_uri() == "http://elsewhere:5000"
    assert registry.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    # The default store keeps artifacts in the home, never in the CWD.
    monkeypatch.chdir(tmp_path)
    experiment_id = registry.ensure_experiment("widget")
    assert registry.ensure_experiment("widget") == experiment_id
    experiment = mlflow.MlflowClient(default).get_experiment(experiment_id)
    assert experiment.name == "edge-ad-widget"
    home = edge_home.resolve()
    assert experiment.artifact_location == (home / "mlartifacts" / "edge-ad-widget").as_uri()
    assert list(tmp_path.iterdir()) == []


def test_run_has_flat_params_metric_history_and_survives_pickling(store: Store) -> None:
    client = mlflow.MlflowClient(store.uri)
    run = client.get_run(store.tracker.run_id)
    params = run.data.params
    assert params["unet.epochs"] == str(store.settings.unet.epochs)
    assert params["data.image_size"] == "64"
    assert params["autoencoder.block_out_channels"] == str(
        list(store.settings.autoencoder.block_out_channels)
    )
    assert params["profile"] == "tiny"
    assert run.data.tags["product"] == PRODUCT
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "unet_loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert "bad" not in run.data.metrics and "text" not in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "eval", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == [
        "plots/severity.png"
    ]
    # Nothing landed in the CWD of the process that logged.
    assert not (store.root / "mlruns").exists() and not (store.root / "mlflow.db").exists()

    # What Ray ships to a worker: two strings; the copy logs to the same run.
    clone = pickle.loads(pickle.dumps(store.tracker))
    assert (clone.uri, clone.run_id) == (store.uri, store.tracker.run_id)
    resumed = registry.resume_run(store.uri, store.tracker.run_id)
    assert client.get_run(resumed.run_id).info.status == "RUNNING"
    clone.log_metrics({"late": 3.0}, step=7)
    resumed.finish("KILLED")
    run = client.get_run(store.tracker.run_id)
    assert run.info.status == "KILLED" and run.data.metrics["late"] == 3.0
    with pytest.raises(EdgeADError, match="does not exist"):
        registry.resume_run(store.uri, "0" * 32)


def test_versions_carry_metrics_and_staging_follows_the_newest(store: Store) -> None:
    assert store.versions == [1, 2, 3]
    client = mlflow.MlflowClient(store.uri)
    v1, v2, v3 = (client.get_model_version(NAME, str(v)) for v in store.versions)
    assert float(v1.tags["metric.image_auroc"]) == 0.9
    assert float(v2.tags["metric.image_auroc"]) == 0.7
    assert float(v1.tags["metric.pro"]) == 0.7
    assert "metric.pixel_ap" not in v1.tags  # None in the report: not a metric
    assert "metric.image_auroc" not in v3.tags  # logged without a report
    assert v1.tags["product"] == PRODUCT and v1.tags["run_id"] == store.tracker.run_id
    assert v1.run_id == store.tracker.run_id
    assert registry.alias_version(PRODUCT, "staging", uri=store.uri) == 3
    run = client.get_run(store.tracker.run_id)
    assert run.data.metrics["f1_max"] == 0.75 and "image_auroc_by_type" not in run.data.metrics
    report = client.download_artifacts(run.info.run_id, "eval/report.json", str(store.root))
    assert '"image_auroc_by_type"' in Path(report).read_text()


def test_promotion_gate(store: Store) -> None:
    uri, client = store.uri, mlflow.MlflowClient(store.uri)
    first = registry.promote(PRODUCT, version=1, reason="first model", uri=uri)
    assert (first.version, first.previous_version, first.forced) == (1, None, False)
    assert first.compared["image_auroc"] == (0.9, None)
    tags = client.get_model_version(NAME, "1").tags
    assert tags["promoted_from_version"] == "none" and tags["promotion_forced"] == "false"
    assert tags["promotion_reason"] == "first model"
    assert tags["promoted_by"] and tags["promoted_at"].endswith("+00:00")

    with pytest.raises(PromotionRefused) as refused:
        registry.promote(PRODUCT, version=2, uri=uri)
    message = str(refused.value)
    assert "0.7000" in message and "0.9000" in message
    assert "version 1" in message and "version 2" in message and "--force" in message
    with pytest.raises(PromotionRefused, match="not recorded"):
        registry.promote(PRODUCT, version=3, uri=uri)
    assert registry.alias_version(PRODUCT, uri=uri) == 1

    forced = registry.promote(PRODUCT, version=2, force=True, reason="hotfix", uri=uri)
    assert (forced.version, forced.previous_version, forced.forced) == (2, 1, True)
    assert forced.compared["image_auroc"] == (0.7, 0.9)
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion_forced"] == "true" and tags["promoted_from_version"] == "1"
    assert tags["promotion_reason"] == "hotfix"

    back = registry.promote(PRODUCT, version=1, uri=uri)  # 0.9 ≥ 0.7: allowed
    assert (back.version, back.previous_version, back.forced) == (1, 2, False)
    # No version given = the newest; nobody holds "canary" yet, so no gate.
    assert registry.promote(PRODUCT, alias="canary", uri=uri).version == 3

    with pytest.raises(EdgeADError, match="no version 9"):
        registry.promote(PRODUCT, version=9, uri=uri)
    with pytest.raises(EdgeADError, match="edge-ad train -p gizmo"):
        registry.promote("gizmo", uri=uri)


def _production(store: Store) -> None:
    if registry.alias_version(PRODUCT, uri=store.uri) is None:
        registry.promote(PRODUCT, version=1, uri=store.uri)


def test_list_versions_shows_aliases_and_metrics(store: Store) -> None:
    _production(store)
    versions = registry.list_versions(uri=store.uri)
    assert [v.version for v in versions] == [3, 2, 1]  # newest first
    assert {v.name for v in versions} == {NAME} and versions[0].product == PRODUCT
    by_number = {v.version: v for v in versions}
    assert "staging" in by_number[3].aliases
    production = registry.alias_version(PRODUCT, uri=store.uri)
    assert "production" in by_number[production].aliases
    assert by_number[1].metrics["image_auroc"] == 0.9 and by_number[3].metrics == {}
    assert by_number[1].run_id == store.tracker.run_id
    assert registry.list_versions(PRODUCT, uri=store.uri) == versions
    assert registry.list_versions("gizmo", uri=store.uri) == []


def _jpeg(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _inputs(synth_root: Path, size: int) -> tuple[list[bytes | str], np.ndarray]:
    """What a client sends (PNG bytes, base64 text, a JPEG of another size) and the frames
    decode_image makes of it."""
    test = synth_root / PRODUCT / "test"
    good, bad = sorted((test / "good").glob("*.png")), sorted(test.glob("[!g]*/*.png"))
    pngs = [good[0].read_bytes(), bad[0].read_bytes(), bad[-1].read_bytes()]
    jpeg = _jpeg(100)
    sent: list[bytes | str] = [pngs[0], pngs[1], base64.b64encode(pngs[2]).decode(), jpeg]
    return sent, np.stack([decode_image(b, size) for b in [*pngs, jpeg]])


def test_registry_models_score_exactly_like_the_bundle(
    store: Store, synth_root: Path, edge_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _production(store)
    original = load_bundle(store.result.bundle_path, device="cpu")
    sent, frames = _inputs(synth_root, store.settings.data.image_size)
    expected = original.detector.predict(as_chw(frames))

    path, info = registry.resolve_bundle(f"models:/{NAME}@production", uri=store.uri)
    assert info["name"] == NAME and info["alias"] == "production"
    assert info["version"] == registry.alias_version(PRODUCT, uri=store.uri)
    assert edge_home in path.parents  # downloaded into the home's cache, not the CWD
    loaded = load_bundle(path, device="cpu")
    assert torch.equal(loaded.detector.predict(as_chw(frames)).scores, expected.scores)
    model_dir = path.parents[1]  # <model>/artifacts/bundle
    assert (model_dir / "MLmodel").is_file() and not list(model_dir.rglob("*.pkl"))  # no pickle
    other, info3 = registry.resolve_bundle(f"models:/{NAME}/3", uri=store.uri)
    assert info3["version"] == 3 and info3["alias"] is None and other != path

    # Plain MLflow, as any MLflow user would load it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
    assert model.metadata.signature is None  # or MLflow would refuse the frame arrays below
    out = model.predict(pd.DataFrame({"image": sent}))
    assert list(out.columns) == [
        "score",
        "is_anomalous",
        "threshold",
        "timestep",
        "severity_distance",
    ]
    assert np.array_equal(out["score"].to_numpy(), expected.scores.numpy())
    assert np.array_equal(out["timestep"].to_numpy(), expected.timesteps.numpy())
    assert np.array_equal(out["is_anomalous"].to_numpy(), expected.is_anomalous.numpy())
    assert np.array_equal(out["severity_distance"].to_numpy(), expected.distances.numpy())
    assert (out["threshold"] == original.detector.threshold).all()
    assert np.array_equal(model.predict(frames)["score"].to_numpy(), out["score"].to_numpy())
    # One frame alone: the same score up to float noise (CPU kernels differ by batch size).
    single = model.predict(frames[0])
    assert len(single) == 1 and single["score"][0] == pytest.approx(out["score"][0], rel=1e-5)
    with pytest.raises(EdgeADError, match="'image' column"):
        model.predict(pd.DataFrame({"picture": sent}))
    with pytest.raises(EdgeADError, match="not base64"):
        model.predict(pd.DataFrame({"image": ["not an image"]}))


def test_resolve_bundle_explains_what_is_missing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = store.uri
    with pytest.raises(EdgeADError, match=r"alias 'champion'.*edge-ad promote -p synth-pcb"):
        registry.resolve_bundle(f"models:/{NAME}@champion", uri=uri)
    with pytest.raises(
        EdgeADError, match=r"no registered model edge-ad-nope.*edge-ad train -p nope"
    ):
        registry.resolve_bundle("models:/edge-ad-nope@production", uri=uri)
    with pytest.raises(EdgeADError, match="has no version 42"):
        registry.resolve_bundle(f"models:/{NAME}/42", uri=uri)
    with pytest.raises(EdgeADError, match="not a registry model URI"):
        registry.resolve_bundle("runs:/abc/model", uri=uri)
    # A tracking server that is not there: one clear line, no retries for minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(EdgeADError, match="cannot reach the MLflow tracking server"):
        registry.resolve_bundle(f"models:/{NAME}@production", uri="http://127.0.0.1:9")
