"""DiffusionAD's defining pieces: the norm-guided one-step estimate (Eqs. 6–8), the Perlin mask
generator and anomaly synthesis (Eq. 12), the focal + smooth-L1 mask loss (Eq. 10)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_ad.d3ad.reconstruct import alphas_cumprod
from edge_ad.data.anomaly_synthesis import (
    generated_texture,
    perlin_mask,
    perlin_noise,
    synthesize_anomaly,
)
from edge_ad.diffusionad.one_step import norm_guided_x0, one_step_x0
from edge_ad.diffusionad.segmentation import SegmentationNet, focal_loss, mask_loss

ABAR = alphas_cumprod(0.0015, 0.0195, 1000).double()
T_S, T_B = 200, 400


def _biased_eps(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fake ε_θ that depends on both z_t and the per-sample t (so mixing them up shows)."""
    return 0.3 * z_t + (t.double() / 1000.0).view(-1, 1, 1, 1)


def test_norm_guided_estimate_follows_the_papers_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    e_s = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    e_b = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    w = 1.0
    got = norm_guided_x0(_biased_eps, z0, T_S, T_B, ABAR, w, e_s, e_b)

    # The paper's steps written out one by one, with scalar ᾱ's.
    a_s, a_b = float(ABAR[T_S]), float(ABAR[T_B])
    x_ts = math.sqrt(a_s) * z0 + math.sqrt(1 - a_s) * e_s
    x_tb = math.sqrt(a_b) * z0 + math.sqrt(1 - a_b) * e_b
    eps_s = 0.3 * x_ts + T_S / 1000.0
    eps_b = 0.3 * x_tb + T_B / 1000.0
    guide = (x_tb - math.sqrt(1 - a_b) * eps_b) / math.sqrt(a_b)  # Eq. 6 at t_b
    n_ts = math.sqrt(a_s) * guide + math.sqrt(1 - a_s) * eps_s
    eps_g = eps_s - math.sqrt(1 - a_s) * w * (n_ts - x_ts)  # Eq. 7
    expected = (x_ts - math.sqrt(1 - a_s) * eps_g) / math.sqrt(a_s)  # Eq. 8
    torch.testing.assert_close(got, expected)


def test_without_guidance_it_is_the_plain_one_step_estimate() -> None:
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    e_s, e_b = torch.randn(2, 1, 4, 8, 8, generator=g, dtype=torch.float64)
    got = norm_guided_x0(_biased_eps, z0, T_S, T_B, ABAR, 0.0, e_s, e_b)
    a_s = float(ABAR[T_S])
    x_ts = math.sqrt(a_s) * z0 + math.sqrt(1 - a_s) * e_s
    t = torch.full((2,), T_S)
    torch.testing.assert_close(got, one_step_x0(x_ts, _biased_eps(x_ts, t), a_s))


def test_a_perfect_noise_predictor_recovers_the_frame_at_any_guidance() -> None:
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    e_s, e_b = torch.randn(2, 1, 4, 8, 8, generator=g, dtype=torch.float64)

    def oracle(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Knows the noise that was added at each scale.
        return torch.where((t == T_S).view(-1, 1, 1, 1), e_s.expand(4, -1, -1, -1)[:1], e_b[0])

    for w in (0.0, 1.0, 5.0):
        torch.testing.assert_close(norm_guided_x0(oracle, z0, T_S, T_B, ABAR, w, e_s, e_b), z0)


def test_guidance_pulls_the_small_scale_estimate_towards_the_guide() -> None:
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    e_s, e_b = torch.randn(2, 1, 4, 8, 8, generator=g, dtype=torch.float64)
    a_b = float(ABAR[T_B])
    x_tb = math.sqrt(a_b) * z0 + math.sqrt(1 - a_b) * e_b
    guide = one_step_x0(x_tb, _biased_eps(x_tb, torch.full((2,), T_B)), a_b)
    gaps = [
        float((norm_guided_x0(_biased_eps, z0, T_S, T_B, ABAR, w, e_s, e_b) - guide).norm())
        for w in (0.0, 0.5, 1.0)
    ]
    assert gaps[0] > gaps[1] > gaps[2]


def test_bad_scales_are_rejected() -> None:
    z0 = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="t_s < t_b"):
        norm_guided_x0(_biased_eps, z0, 400, 200, ABAR)


# ----------------------------------------------------------------------------- synthesis


def test_perlin_noise_is_smooth_and_in_range() -> None:
    rng = np.random.default_rng(0)
    noise = perlin_noise((64, 64), (4, 4), rng)
    assert noise.shape == (64, 64)
    assert noise.min() >= -1.0 and noise.max() <= 1.0 and noise.std() > 0.1
    # Gradient noise is 0 on the lattice points (every 16 px here).
    assert np.abs(noise[::16, ::16]).max() < 1e-9
    # Neighbouring pixels differ far less than the field's spread: it is smooth, not white.
    assert np.abs(np.diff(noise, axis=1)).mean() < 0.2 * noise.std()


def test_perlin_masks_are_binary_never_empty_and_cover_a_varied_share() -> None:
    rng = np.random.default_rng(0)
    masks = [perlin_mask(64, rng) for _ in range(200)]
    coverage = np.array([m.mean() for m in masks])
    assert all(set(np.unique(m)) <= {0.0, 1.0} for m in masks)
    assert coverage.min() > 0  # an empty mask is drawn again
    # Thresholding noise in [-1, 1] at 0.5 keeps a minority of the frame, with a wide spread
    # of sizes (coarse scales give blobs, fine ones speckles).
    assert 0.02 < coverage.mean() < 0.3, coverage.mean()
    assert coverage.max() > 2 * np.median(coverage) and coverage.min() < 0.5 * np.median(coverage)
    # Rotation and random scales: no two masks alike.
    assert len({m.tobytes() for m in masks}) == len(masks)


@pytest.mark.parametrize("surface", ["plain", "textured"])
def test_synthesized_anomaly_changes_only_the_masked_pixels(surface: str) -> None:
    rng = np.random.default_rng(1)
    image = np.full((64, 64, 3), 120, dtype=np.uint8)
    if surface == "textured":
        image = generated_texture(64, np.random.default_rng(9))
    for _ in range(20):
        out, mask = synthesize_anomaly(image, rng)
        assert out.shape == image.shape and out.dtype == np.uint8
        outside = mask == 0
        assert np.array_equal(out[outside], image[outside])
        changed = (out != image).any(axis=-1)
        # β ≤ 0.8 keeps ≥ 20 % of the texture inside the mask: most masked pixels change.
        assert changed[mask == 1].mean() > 0.5


def test_generated_textures_vary() -> None:
    rng = np.random.default_rng(2)
    textures = [generated_texture(32, rng) for _ in range(12)]
    assert all(t.shape == (32, 32, 3) and t.dtype == np.uint8 for t in textures)
    assert len({t.tobytes() for t in textures}) == 12
    assert np.mean([t.std() for t in textures]) > 5


# ----------------------------------------------------------------------------- segmentation


def test_focal_loss_matches_its_definition() -> None:
    logits = torch.tensor([[-2.0, 0.0, 3.0]])
    target = torch.tensor([[0.0, 1.0, 1.0]])
    p = torch.sigmoid(logits)
    p_t = torch.where(target == 1, p, 1 - p)
    expected = (0.5 * (1 - p_t) ** 4 * -torch.log(p_t)).mean()
    torch.testing.assert_close(focal_loss(logits, target, 0.5, 4.0), expected)
    loss, parts = mask_loss(logits, target, focal_weight=5.0)
    smooth = torch.nn.functional.smooth_l1_loss(p, target)
    torch.testing.assert_close(loss, smooth + 5.0 * expected)
    assert parts["seg_focal"] == pytest.approx(float(expected))


def test_segmentation_net_maps_frame_pairs_to_full_size_masks() -> None:
    net = SegmentationNet(channels=8, levels=3)
    out = net(torch.randn(2, 6, 32, 32))
    assert out.shape == (2, 1, 32, 32)
    assert net.widths == [8, 16, 32]
