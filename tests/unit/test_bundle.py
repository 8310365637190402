"""Detector + bundle: a tiny D3AD fitted on generated frames, saved, reloaded, compared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ad.bundle import load_bundle, read_meta, save_bundle
from edge_ad.config import load_settings
from edge_ad.d3ad.detector import D3AD
from edge_ad.d3ad.observer import HistoryObserver
from edge_ad.errors import EdgeADError


def _frames(n: int, seed: int) -> torch.Tensor:
    """A fixed 'product' (smooth pattern) with small per-frame noise, uint8 (N, 3, 64, 64)."""
    g = torch.Generator().manual_seed(0)
    base = (
        torch.nn.functional.interpolate(
            torch.rand(1, 3, 8, 8, generator=g), size=64, mode="bilinear"
        )
        * 255
    )
    noise = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 4
    return (base + noise).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def fitted() -> tuple[D3AD, HistoryObserver]:
    settings = load_settings(
        "tiny", overrides=["autoencoder.epochs=2", "unet.epochs=2", "adapt.epochs=1"]
    )
    detector = D3AD.build(settings)
    history = HistoryObserver()
    detector.fit(_frames(24, 1), _frames(6, 2), history)
    return detector, history


def test_fit_runs_every_stage_and_calibrates(fitted: tuple[D3AD, HistoryObserver]) -> None:
    detector, history = fitted
    # Patch-mode severity (the default): the memory replaces the pooled KNN index.
    assert set(history.stages) == {"autoencoder", "unet", "adaptation", "memory", "calibration"}
    assert len(history.epochs["autoencoder"]) == 2 and len(history.epochs["unet"]) == 2
    assert detector.is_fitted and np.isfinite(detector.threshold)
    # The threshold is the calibration quantile of normal scores (validation + leave-one-out
    # training images): at most their max.
    assert detector.threshold <= history.stages["calibration"]["val_score_max"] + 1e-6


def test_predict_shapes_and_timesteps(fitted: tuple[D3AD, HistoryObserver]) -> None:
    detector, _ = fitted
    pred = detector.predict(_frames(3, 7), return_reconstruction=True)
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, 64, 64)
    assert pred.reconstructions is not None and pred.reconstructions.shape == (3, 3, 64, 64)
    assert set(pred.timesteps.tolist()) <= set(detector.timestep_choices())
    assert torch.equal(pred.scores, pred.maps.flatten(1).amax(1))
    assert torch.equal(pred.is_anomalous, pred.scores >= detector.threshold)


def test_blacked_out_region_gets_a_deeper_timestep(fitted: tuple[D3AD, HistoryObserver]) -> None:
    detector, _ = fitted
    normal = _frames(4, 9)
    broken = normal.clone()
    broken[:, :, 8:56, 8:56] = 0  # a large 'missing component'
    t_normal = detector.predict(normal).timesteps.float().mean()
    t_broken = detector.predict(broken).timesteps
    assert (t_broken == detector.settings.severity.t_max).all()
    assert t_broken.float().mean() > t_normal


def test_wrong_frame_size_is_a_clear_error(fitted: tuple[D3AD, HistoryObserver]) -> None:
    detector, _ = fitted
    with pytest.raises(EdgeADError, match="expected frames of shape"):
        detector.predict(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_bundle_round_trip_gives_identical_scores(
    fitted: tuple[D3AD, HistoryObserver], tmp_path: Path
) -> None:
    detector, _ = fitted
    path = save_bundle(detector, tmp_path / "b", "widget", metrics={"image_auroc": 0.9})
    meta = read_meta(path)
    assert meta["product"] == "widget" and meta["method"] == "d3ad"
    assert meta["settings"]["profile"] == "tiny"
    loaded = load_bundle(path, device="cpu")
    frames = _frames(4, 11)
    a, b = detector.predict(frames), loaded.detector.predict(frames)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert torch.equal(a.timesteps, b.timesteps)
    assert loaded.detector.threshold == detector.threshold
    assert loaded.metrics == {"image_auroc": 0.9}
    # Only JSON and safetensors: nothing in a bundle is unpickled.
    assert sorted(p.name for p in path.iterdir()) == [
        "bundle.json",
        "state.safetensors",
        "weights.safetensors",
    ]


def test_corrupt_bundle_is_a_clear_error(
    fitted: tuple[D3AD, HistoryObserver], tmp_path: Path
) -> None:
    path = save_bundle(fitted[0], tmp_path / "b", "widget")
    (path / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(EdgeADError, match="corrupt or incompatible"):
        load_bundle(path)


def test_float_frames_outside_model_range_are_refused(
    fitted: tuple[D3AD, HistoryObserver],
) -> None:
    with pytest.raises(EdgeADError, match=r"\[-1, 1\]"):
        fitted[0].predict(_frames(1, 0).float())  # 0..255 floats


def test_not_a_bundle_and_newer_format_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EdgeADError, match="not a model bundle"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text(
        json.dumps({"format": "edge-ad-bundle", "format_version": 99})
    )
    with pytest.raises(EdgeADError, match="newer edge-ad"):
        load_bundle(tmp_path)


def test_untrained_detector_refuses_to_predict_or_save(tmp_path: Path) -> None:
    detector = D3AD.build(load_settings("tiny"))
    with pytest.raises(EdgeADError, match="not trained"):
        detector.predict(_frames(1, 0))
    with pytest.raises(EdgeADError, match="untrained"):
        save_bundle(detector, tmp_path / "x", "p")


@pytest.mark.parametrize(
    ("edit", "word"),
    [
        (lambda meta, state: meta.update(scaling_factor=0.0), "scaling_factor is 0.0"),
        (lambda meta, state: meta.update(scaling_factor=float("nan")), "scaling_factor is nan"),
        (lambda meta, state: meta.update(threshold=float("inf")), "threshold is inf"),
        (
            lambda meta, state: state["normalizer.latent_mean"].fill_(float("nan")),
            "normalizer.latent_mean",
        ),
    ],
    ids=["scaling-zero", "scaling-nan", "threshold-inf", "nan-normaliser"],
)
def test_bundles_that_would_score_nan_are_refused_at_load(
    fitted: tuple[D3AD, HistoryObserver], tmp_path: Path, edit, word: str
) -> None:
    """Before: scaling_factor 0/NaN or a NaN normaliser loaded, scored every frame NaN, and
    NaN < threshold reported each one as normal."""
    from safetensors.torch import load_file, save_file

    path = save_bundle(fitted[0], tmp_path / "b", "widget")
    meta = json.loads((path / "bundle.json").read_text())
    state = load_file(str(path / "state.safetensors"))
    edit(meta, state)
    (path / "bundle.json").write_text(json.dumps(meta))
    save_file(state, str(path / "state.safetensors"))
    with pytest.raises(EdgeADError, match=word):
        load_bundle(path)


def test_a_nan_score_is_a_bad_frame_never_a_normal_verdict(
    fitted: tuple[D3AD, HistoryObserver],
) -> None:
    """Before: a NaN score became ``is_anomalous=false`` and a bare ``NaN`` in the JSON."""
    from edge_ad.stream.schema import BadFrame, Verdict
    from edge_ad.stream.scoring import encode_image, score_frames

    detector = fitted[0]
    saved = detector.normalizer.latent_std
    frame = encode_image(_frames(1, 5)[0].permute(1, 2, 0).numpy())
    detector.normalizer.latent_std = float("nan")  # what a broken bundle did at runtime
    try:
        (result,) = score_frames(detector, [frame])
    finally:
        detector.normalizer.latent_std = saved
    assert isinstance(result, BadFrame) and "non-finite score" in str(result)
    verdict = Verdict("f", "p", "c", "l", "1", float("nan"), 1.0, False, 20)
    with pytest.raises(ValueError, match="JSON compliant"):
        verdict.to_json()


@pytest.mark.parametrize(
    ("edit", "word"),
    [
        (
            lambda meta: meta["backbone"].update(name="hf-hub:timm/resnet34"),
            "not a timm architecture built offline",
        ),
        (
            lambda meta: meta["unet_config"].update(
                block_out_channels=[8192] * len(meta["unet_config"]["block_out_channels"])
            ),
            "parameters but the weights hold",
        ),
        (lambda meta: meta.update(unet_config="abc"), "corrupt or incompatible"),
        (lambda meta: meta["backbone"].update(layers="two"), "corrupt or incompatible"),
    ],
    ids=["hub-backbone", "huge-unet", "config-not-a-dict", "layers-not-a-list"],
)
def test_hostile_bundle_json_is_refused_before_building(
    fitted: tuple[D3AD, HistoryObserver], tmp_path: Path, edit, word: str
) -> None:
    """Before: a hub backbone name made an HTTP request, a 6 kB edit of block_out_channels
    allocated 6.5 GB before failing, and wrong types gave tracebacks."""
    import resource

    path = save_bundle(fitted[0], tmp_path / "b", "widget")
    meta = json.loads((path / "bundle.json").read_text())
    edit(meta)
    (path / "bundle.json").write_text(json.dumps(meta))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EdgeADError, match=word):
        load_bundle(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mb < 500, f"refusing the bundle grew the peak RSS by {grown_mb:.0f} MB"


def test_an_mlmodel_pointing_outside_its_folder_is_refused(tmp_path: Path) -> None:
    """Before: an MLmodel whose bundle artifact path was absolute was followed."""
    from edge_ad.registry import _bundle_dir

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for target in ("/etc", "../elsewhere"):
        (model_dir / "MLmodel").write_text(
            "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n"
            f"    artifacts:\n      bundle:\n        path: {target}\n        uri: x\n"
        )
        with pytest.raises(EdgeADError, match="outside the model"):
            _bundle_dir(model_dir)
    (model_dir / "MLmodel").write_text(
        "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n"
        "    artifacts:\n      bundle:\n        path: artifacts/b\n        uri: x\n"
    )
    assert _bundle_dir(model_dir) == (model_dir / "artifacts" / "b").resolve()
