"""memory_weight=auto: the synthetic anomalies calibration pastes, the choice among the
candidate shares (ties and small gains fall back to the memory alone), and a detector that
chose w = 1 skipping the diffusion while keeping its choice through a bundle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_ad.bundle import load_bundle, save_bundle
from edge_ad.config import load_settings
from edge_ad.d3ad.detector import D3AD
from edge_ad.d3ad.fusion_weight import (
    MIN_SYNTHETIC,
    WeightChoice,
    choose_memory_weight,
    synthetic_anomalies,
)
from edge_ad.d3ad.observer import HistoryObserver
from edge_ad.data.synthetic import SyntheticProduct
from edge_ad.engine import as_chw
from edge_ad.errors import ConfigError, EdgeADError

QUICK = ["autoencoder.epochs=1", "unet.epochs=1", "adapt.epochs=0"]
SIZE = 32


def _frames(indices: range, defect: str | None = None) -> torch.Tensor:
    product = SyntheticProduct("fuse-pcb", image_size=64, seed=5)
    return as_chw(np.stack([product.render(i, defect)[0] for i in indices]))


def _masks(n: int) -> torch.Tensor:
    masks = torch.zeros(n, SIZE, SIZE)
    masks[:, 8:16, 8:16] = 1
    return masks


def _maps_by_weight(signal: dict[float, float], normals: int, anomalies: int):
    """fused_maps(w) for ``normals`` flat maps and ``anomalies`` maps whose masked square is
    raised by signal[w] above noise of std 1 (so the AUROCs grow with the signal)."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(normals + anomalies, SIZE, SIZE, generator=gen)
    lift = torch.cat([torch.zeros(normals, SIZE, SIZE), _masks(anomalies)])

    def fused(w: float) -> torch.Tensor:
        return noise + signal[w] * lift

    return fused


def test_synthetic_anomalies_are_reproducible_and_change_only_the_mask() -> None:
    images = _frames(range(3))
    frames, masks = synthetic_anomalies(images, seed=7)
    again, masks_again = synthetic_anomalies(images, seed=7)
    assert frames.shape == (MIN_SYNTHETIC, 3, 64, 64) and frames.dtype == torch.uint8
    assert torch.equal(frames, again) and torch.equal(masks, masks_again)
    assert all(float(m.sum()) > 0 for m in masks)
    source = images[torch.arange(MIN_SYNTHETIC) % 3]
    changed = (frames != source).any(dim=1)
    assert not changed[masks == 0].any()  # nothing outside the pasted mask moves
    assert changed[masks == 1].float().mean() > 0.5
    other, _ = synthetic_anomalies(images, seed=8)
    assert not torch.equal(frames, other)
    assert len(synthetic_anomalies(images, seed=7, count=5)[0]) == 5


def test_a_clearly_better_share_is_chosen() -> None:
    fused = _maps_by_weight({1.0: 0.0, 0.9: 0.5, 0.8: 3.0, 0.7: 1.0}, 20, 20)
    choice = choose_memory_weight(fused, 20, _masks(20), (1.0, 0.9, 0.8, 0.7), margin=0.005)
    assert choice.weight == 0.8
    assert set(choice.objective) == {1.0, 0.9, 0.8, 0.7}
    assert choice.objective[0.8] > choice.objective[1.0] + 0.2
    assert choice.summary()["memory_weight"] == 0.8
    assert choice.summary()["memory_weight_auroc_w0.8"] == choice.objective[0.8]


def test_ties_and_small_gains_fall_back_to_the_memory_alone() -> None:
    tie = _maps_by_weight({1.0: 2.0, 0.8: 2.0}, 20, 20)
    assert choose_memory_weight(tie, 20, _masks(20), (0.8,), margin=0.0).weight == 1.0
    small = _maps_by_weight({1.0: 0.5, 0.8: 0.6}, 20, 20)
    choice = choose_memory_weight(small, 20, _masks(20), (0.8,), margin=0.2)
    assert 0 < choice.objective[0.8] - choice.objective[1.0] < 0.2
    assert choice.weight == 1.0
    # The same gain clears a smaller margin.
    assert choose_memory_weight(small, 20, _masks(20), (0.8,), margin=0.0).weight == 0.8


def test_memory_weight_setting_is_a_share_or_auto() -> None:
    assert load_settings("cpu").anomaly_map.memory_weight == "auto"
    assert (
        load_settings("cpu", overrides=["anomaly_map.memory_weight=0.9"]).anomaly_map.memory_weight
        == 0.9
    )
    for bad in ("1.5", "-0.1", ".nan", "often"):
        with pytest.raises(ConfigError, match="number in \\[0, 1\\] or 'auto'"):
            load_settings("cpu", overrides=[f"anomaly_map.memory_weight={bad}"])
    with pytest.raises(ConfigError):
        load_settings("cpu", overrides=["anomaly_map.memory_weight_choices=[0.8, 0]"])


def _fit_auto(*overrides: str) -> tuple[D3AD, HistoryObserver]:
    settings = load_settings("tiny", overrides=[*QUICK, *overrides])
    detector = D3AD.build(settings)
    history = HistoryObserver()
    detector.fit(_frames(range(20)), _frames(range(20, 26)), history)
    return detector, history


@pytest.fixture(scope="module")
def memory_only() -> D3AD:
    """auto with 1 as the only candidate: the choice is the memory alone."""
    return _fit_auto("anomaly_map.memory_weight_choices=[1.0]")[0]


def test_auto_calibration_chooses_a_candidate_and_reports_it() -> None:
    detector, history = _fit_auto("anomaly_map.memory_weight_choices=[0.9, 0.6]")
    calibration = history.stages["calibration"]
    assert detector.memory_weight in (1.0, 0.9, 0.6)
    assert calibration["memory_weight"] == detector.memory_weight
    for w in (1, 0.9, 0.6):
        assert 0.0 <= calibration[f"memory_weight_auroc_w{w:g}"] <= 1.0
    # The threshold is the quantile of scores fused with the chosen w.
    assert np.isfinite(detector.threshold)


def test_memory_alone_skips_the_diffusion_unless_a_picture_is_asked(memory_only: D3AD) -> None:
    assert memory_only.memory_weight == 1.0
    frames = _frames(range(40, 44), "scratch")
    quick: dict[str, float] = {}
    scored = memory_only.predict(frames, timings=quick)
    assert "diffusion" not in quick and "encode" not in quick and "memory" in quick
    assert set(scored.timesteps.tolist()) <= set(memory_only.timestep_choices())
    shown: dict[str, float] = {}
    pictured = memory_only.predict(frames, return_reconstruction=True, timings=shown)
    assert "diffusion" in shown and pictured.reconstructions is not None
    assert torch.equal(scored.scores, pictured.scores)


def test_the_chosen_weight_round_trips_through_a_bundle(memory_only: D3AD, tmp_path) -> None:
    save_bundle(memory_only, tmp_path / "b", "fuse-pcb")
    loaded = load_bundle(tmp_path / "b", device="cpu").detector
    assert isinstance(loaded, D3AD) and loaded.memory_weight == 1.0
    frames = _frames(range(50, 53), "stain")
    assert torch.equal(memory_only.predict(frames).scores, loaded.predict(frames).scores)
    state = loaded.state_tensors()
    state.pop("memory_norm.weight")
    with pytest.raises(EdgeADError, match="chosen memory weight"):
        loaded.load_state_tensors(state)


def test_an_uncalibrated_auto_detector_refuses_to_predict() -> None:
    detector = D3AD.build(load_settings("tiny", overrides=QUICK))
    assert detector.weight_choice is None and not detector.is_fitted
    with pytest.raises(EdgeADError, match="not trained"):
        detector.predict(_frames(range(2)))
    assert isinstance(WeightChoice(1.0, {}).summary()["memory_weight"], float)
