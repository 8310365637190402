"""The detector interface across methods: settings per method, fit → predict → bundle → load for
DiffusionAD and RAN (D3AD's own round trip is in test_bundle.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ad.bundle import load_bundle, read_meta, save_bundle
from edge_ad.config import load_settings
from edge_ad.d3ad.observer import HistoryObserver
from edge_ad.detector import LatentDiffusionDetector
from edge_ad.errors import ConfigError, EdgeADError
from edge_ad.methods import build_detector, detector_class
from tests.unit.test_bundle import _frames

QUICK = ["autoencoder.epochs=2", "unet.epochs=2"]


def test_each_method_has_its_class_and_profile_changes() -> None:
    for method in ("d3ad", "diffusionad", "ran"):
        settings = load_settings("tiny", method=method)
        assert settings.method == method
        assert detector_class(method).method == method
        assert settings.flat()["method"] == method
    # The cpu/tiny UNet learns t < 100 for D3AD; the others ask deeper and learn deeper.
    assert load_settings("cpu").unet.max_train_timestep == 100
    assert load_settings("cpu", method="diffusionad").unet.max_train_timestep > 400
    assert load_settings("cpu", method="ran").unet.max_train_timestep > 100
    assert load_settings("paper", method="diffusionad").unet.max_train_timestep is None


def test_method_settings_are_checked_up_front() -> None:
    with pytest.raises(ConfigError, match="unknown method 'patchcore'"):
        load_settings("tiny", method="patchcore")
    with pytest.raises(ConfigError, match=r"t_small .* must be below t_big"):
        load_settings("tiny", method="diffusionad", overrides=["diffusionad.t_small=450"])
    with pytest.raises(ConfigError, match=r"max_train_timestep \(100\) must be at least"):
        load_settings("tiny", method="diffusionad", overrides=["unet.max_train_timestep=100"])
    with pytest.raises(ConfigError, match="seg_crop_size"):
        load_settings("cpu", method="diffusionad", overrides=["diffusionad.seg_crop_size=100"])
    with pytest.raises(EdgeADError, match="settings are for method 'd3ad'"):
        detector_class("ran")(load_settings("tiny"), None, None, None)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["diffusionad", "ran"])
def fitted(request: pytest.FixtureRequest) -> tuple[LatentDiffusionDetector, HistoryObserver]:
    settings = load_settings("tiny", method=request.param, overrides=QUICK)
    detector = build_detector(settings)
    history = HistoryObserver()
    detector.fit(_frames(24, 1), _frames(6, 2), history)
    return detector, history


def test_fit_runs_the_methods_stages_and_calibrates(
    fitted: tuple[LatentDiffusionDetector, HistoryObserver],
) -> None:
    detector, history = fitted
    own = {"diffusionad": {"segmentation"}, "ran": {"padim"}}[detector.method]
    assert set(history.stages) == {"autoencoder", "unet", "calibration"} | own
    assert detector.is_fitted and np.isfinite(detector.threshold)
    assert detector.threshold <= history.stages["calibration"]["val_score_max"] + 1e-6


def test_predict_is_deterministic_and_batch_independent(
    fitted: tuple[LatentDiffusionDetector, HistoryObserver],
) -> None:
    detector, _ = fitted
    frames = _frames(3, 7)
    pred = detector.predict(frames, return_reconstruction=True)
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, 64, 64)
    assert pred.reconstructions is not None and pred.reconstructions.shape == (3, 3, 64, 64)
    assert torch.isnan(pred.distances).all()  # no DIC distance outside D3AD
    assert torch.equal(pred.is_anomalous, pred.scores >= detector.threshold)
    # The noise is a fixed draw per model: the same batch scores exactly the same again, and
    # a frame alone scores as in a batch up to float rounding (conv kernels differ by batch
    # size; RAN's z-scored maps magnify ~1e-6 to ~1e-3 relative, measured 7e-4).
    assert torch.equal(detector.predict(frames).scores, pred.scores)
    alone = detector.predict(frames[1:2])
    torch.testing.assert_close(alone.scores, pred.scores[1:2], rtol=3e-3, atol=1e-5)
    if detector.method == "diffusionad":
        assert set(pred.timesteps.tolist()) == {detector.settings.diffusionad.t_small}
        assert float(pred.maps.min()) >= 0 and float(pred.maps.max()) <= 1  # probabilities


@pytest.mark.parametrize("fitted", ["ran"], indirect=True)
def test_a_synthetic_defect_raises_rans_map_where_it_is(
    fitted: tuple[LatentDiffusionDetector, HistoryObserver],
) -> None:
    """Even barely trained, a large bright square must raise RAN's map where it is (its KL and
    feature scores need no learned head). DiffusionAD's map is its segmentation network's, which
    after this fixture's 4 tiny epochs is still flat (measured: +/-5e-4 either way), so the
    check would only test luck there; its synthesis and loss are tested on their own."""
    detector, _ = fitted
    clean = _frames(4, 9)
    broken = clean.clone()
    broken[:, :, 20:44, 20:44] = 255
    pc, pb = detector.predict(clean), detector.predict(broken)
    inside = pb.maps[:, 20:44, 20:44].mean() - pc.maps[:, 20:44, 20:44].mean()
    assert float(inside) > 0


def test_bundle_round_trip_keeps_method_and_scores(
    fitted: tuple[LatentDiffusionDetector, HistoryObserver], tmp_path: Path
) -> None:
    detector, _ = fitted
    path = save_bundle(detector, tmp_path / "b", "synth", metrics={"image_auroc": 0.5})
    meta = read_meta(path)
    assert meta["method"] == detector.method
    assert (meta["backbone"] is None) == (detector.method == "diffusionad")
    bundle = load_bundle(path, device="cpu")
    assert bundle.method == detector.method and type(bundle.detector) is type(detector)
    frames = _frames(2, 11)
    torch.testing.assert_close(bundle.detector.predict(frames).maps, detector.predict(frames).maps)
    assert bundle.detector.threshold == detector.threshold

    # A bundle whose method and settings disagree is refused with one clear line.
    meta["method"] = "d3ad"
    (path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(EdgeADError, match="corrupt or incompatible"):
        load_bundle(path, device="cpu")
