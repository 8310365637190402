"""D3AD with the patch memory: patch-mode severity, the fused map's weights, and the paper's
pooled mode still reachable (and round-tripping through a bundle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_ad.bundle import load_bundle, save_bundle
from edge_ad.config import load_settings
from edge_ad.d3ad.detector import D3AD
from edge_ad.d3ad.observer import HistoryObserver
from edge_ad.d3ad.severity import SeverityBins, SeverityIndex
from edge_ad.data.synthetic import SyntheticProduct
from edge_ad.engine import as_chw
from edge_ad.knn.detector import PatchKNN

# Generative stages as short as they go: these tests are about the memory, severity and map.
QUICK = ["autoencoder.epochs=1", "unet.epochs=1", "adapt.epochs=0"]


def _frames(indices: range, defect: str | None = None) -> torch.Tensor:
    product = SyntheticProduct("mem-pcb", image_size=64, seed=3)
    return as_chw(np.stack([product.render(i, defect)[0] for i in indices]))


TRAIN, VAL = _frames(range(24)), _frames(range(24, 30))


def _fit(detector_cls, *overrides: str, method: str = "d3ad"):
    settings = load_settings("tiny", method=method, overrides=[*QUICK, *overrides])
    detector = detector_cls.build(settings)
    history = HistoryObserver()
    detector.fit(TRAIN, VAL, history)
    return detector, history


@pytest.fixture(scope="module")
def patch_mode() -> D3AD:
    # A fixed share: these tests are about the fused map, whatever auto would choose here.
    return _fit(D3AD, "anomaly_map.memory_weight=0.8")[0]


def test_patch_severity_sends_defective_frames_deeper(patch_mode: D3AD) -> None:
    assert isinstance(patch_mode.severity, SeverityBins)
    normal = patch_mode.predict(_frames(range(40, 48)))
    defect = patch_mode.predict(_frames(range(40, 48), "contamination"))
    assert float(defect.distances.mean()) > float(normal.distances.max())
    assert float(defect.timesteps.float().mean()) > float(normal.timesteps.float().mean())
    assert set(defect.timesteps.tolist()) <= set(patch_mode.timestep_choices())


def test_memory_weight_one_is_the_normalised_memory_map() -> None:
    """w = 1: D3AD's map is the knn map, standardised by the validation statistics (blur and
    max commute with that affine map), whatever the reconstruction does."""
    d3ad, _ = _fit(D3AD, "anomaly_map.memory_weight=1.0")
    knn, _ = _fit(PatchKNN, method="knn")
    frames = _frames(range(50, 54), "scratch")
    mean, std = d3ad.memory_stats
    want = (knn.predict(frames).scores - mean) / std
    assert torch.allclose(d3ad.predict(frames).scores, want, rtol=1e-4, atol=1e-4)


def test_fused_map_moves_with_the_memory_weight(patch_mode: D3AD) -> None:
    frames = _frames(range(60, 63), "stain")
    l_map, f_map, m_map, *_ = patch_mode.raw_maps(patch_mode._checked_input(frames))
    fused = patch_mode.combine(l_map, f_map, m_map)
    recon_only = patch_mode.normalizer.combine(l_map, f_map, patch_mode.settings.anomaly_map.lam)
    assert not torch.allclose(fused, recon_only[:, 0])
    assert torch.equal(patch_mode.predict(frames).maps, fused.cpu())


def test_pooled_mode_without_memory_is_the_papers_and_round_trips(tmp_path) -> None:
    detector, history = _fit(D3AD, "severity.mode=pooled", "anomaly_map.memory_weight=0")
    assert not detector.uses_memory and detector.memory is None
    assert isinstance(detector.severity, SeverityIndex)
    assert "knn" in history.stages and "memory" not in history.stages
    # Only validation images calibrate without a memory (nothing to leave out).
    assert history.stages["calibration"]["calibration_images"] == len(VAL)
    frames = _frames(range(70, 73), "crack")
    save_bundle(detector, tmp_path / "b", "mem-pcb")
    loaded = load_bundle(tmp_path / "b", device="cpu").detector
    assert torch.equal(detector.predict(frames).scores, loaded.predict(frames).scores)
    assert load_settings("paper").severity.mode == "pooled"
    assert load_settings("paper").anomaly_map.memory_weight == 0.0


def test_patch_mode_round_trips_through_a_bundle(patch_mode: D3AD, tmp_path) -> None:
    frames = _frames(range(80, 83), "missing_part")
    save_bundle(patch_mode, tmp_path / "b", "mem-pcb")
    loaded = load_bundle(tmp_path / "b", device="cpu").detector
    before, after = patch_mode.predict(frames), loaded.predict(frames)
    assert torch.equal(before.scores, after.scores)
    assert torch.equal(before.timesteps, after.timesteps)
    assert loaded.memory_stats == patch_mode.memory_stats


def test_without_a_feature_term_frames_are_decoded_only_when_asked() -> None:
    """λ = 1 (or w = 1): the score needs neither x̂ nor φ(x̂), so scoring skips the decoder;
    asking for the reconstruction decodes it and leaves the score unchanged."""
    detector, _ = _fit(D3AD, "anomaly_map.lam=1.0")
    assert detector.feature_weight == 0.0
    frames = _frames(range(90, 94), "scratch")
    quick: dict[str, float] = {}
    scored = detector.predict(frames, timings=quick)
    shown: dict[str, float] = {}
    with_image = detector.predict(frames, return_reconstruction=True, timings=shown)
    assert "decode" not in quick and "decode" in shown
    assert scored.reconstructions is None
    assert with_image.reconstructions is not None
    assert with_image.reconstructions.shape == (4, 3, 64, 64)
    assert torch.equal(scored.scores, with_image.scores)
    assert torch.equal(scored.maps, with_image.maps)


def test_a_weighted_feature_term_is_computed() -> None:
    detector, _ = _fit(D3AD, "anomaly_map.lam=0.85", "anomaly_map.memory_weight=0.8")
    assert detector.feature_weight > 0
    frames = _frames(range(95, 97), "stain")
    timings: dict[str, float] = {}
    _, f_map, *_ = detector.raw_maps(detector._checked_input(frames), timings)
    assert "decode" in timings
    assert float(f_map.abs().max()) > 0
