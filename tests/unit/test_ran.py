"""RAN's defining pieces: the KL score on known Gaussians, the PaDiM Gaussian model and the
gradient denoising reconstruction ("Removing Anomalies as Noises")."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from edge_ad.d3ad.reconstruct import alphas_cumprod
from edge_ad.ran.gradient_denoise import energy_gradient, gradient_denoise, matching_timestep
from edge_ad.ran.kl_score import gaussian_kl, kl_map, posterior
from edge_ad.ran.padim import PaDiM, grid_features

ABAR = alphas_cumprod(0.0015, 0.0195, 1000).double()


def test_gaussian_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, 50, generator=g, dtype=torch.float64)
    v1, v2 = torch.rand(2, 50, generator=g, dtype=torch.float64) + 0.1
    expected = kl_divergence(Normal(m1, v1.sqrt()), Normal(m2, v2.sqrt()))
    torch.testing.assert_close(gaussian_kl(m1, v1, m2, v2), expected)
    assert float(gaussian_kl(m1, v1, m1, v1).abs().max()) < 1e-12  # KL(p‖p) = 0


def test_posterior_is_the_ddpm_reverse_step() -> None:
    """For t ≥ 1, q(x_{t−1}|x_t, x_0) as in DDPM Eq. 7, checked against diffusers' scheduler."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.0015, beta_end=0.0195, num_train_timesteps=1000)
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(2, 1, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in (5, 50, 100):
        mean, var = posterior(x0, x_t, t, ABAR)
        assert var == pytest.approx(float(scheduler._get_variance(t)), rel=1e-4)
        abar_t, abar_prev = float(ABAR[t]), float(ABAR[t - 1])
        beta_t = 1 - abar_t / abar_prev
        expected_mean = (math.sqrt(abar_prev) * beta_t / (1 - abar_t)) * x0 + (
            math.sqrt(1 - beta_t) * (1 - abar_prev) / (1 - abar_t)
        ) * x_t
        torch.testing.assert_close(mean, expected_mean)
    mean0, _ = posterior(x0, x_t, 0, ABAR)
    torch.testing.assert_close(mean0, x0)  # at t = 0 the reverse step lands on x_0


def test_kl_map_on_known_noise_errors() -> None:
    """With ε_θ = ε + δ the two means differ by β_t/(√α_t·√(1−ᾱ_t))·δ, so the KL per element
    is that squared over 2β̃_t; a perfect ε_θ scores 0 everywhere."""
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    delta = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    delta[..., 2:4, 5:7] = 0.5  # the "anomaly": ε_θ is wrong here only
    for t in (5, 50, 100):
        abar = float(ABAR[t])
        z_t = math.sqrt(abar) * z0 + math.sqrt(1 - abar) * noise

        def eps_fn(
            z: torch.Tensor, tt: torch.Tensor, t: int = t, z_t: torch.Tensor = z_t
        ) -> torch.Tensor:
            assert torch.equal(tt, torch.full((3,), t))
            torch.testing.assert_close(z, z_t)
            return noise + delta

        got = kl_map(eps_fn, z0, t, ABAR, noise)
        assert got.shape == (3, 1, 8, 8)
        abar_prev = float(ABAR[t - 1])
        alpha, beta = abar / abar_prev, 1 - abar / abar_prev
        var = (1 - abar_prev) / (1 - abar) * beta
        coef = beta / (math.sqrt(alpha) * math.sqrt(1 - abar))
        expected = (coef * delta) ** 2 / (2 * var)
        torch.testing.assert_close(got, expected.mean(dim=1, keepdim=True).expand(3, -1, -1, -1))
        assert float(got[..., 0, 0].abs().max()) < 1e-12
    with pytest.raises(ValueError, match="KL timestep"):
        kl_map(lambda z, tt: z, z0, 0, ABAR, noise)


# ----------------------------------------------------------------------------- PaDiM


def test_padim_recovers_the_gaussian_and_its_mahalanobis_distance() -> None:
    g = torch.Generator().manual_seed(3)
    n, c, s = 4000, 3, 2
    mean = torch.tensor([1.0, -2.0, 0.5])
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, -0.3, 0.7]])
    v = torch.randn(n, c, generator=g) @ mix.T + mean  # cov = mix·mixᵀ
    grids = (v.view(n, c, 1, 1).expand(n, c, s, s).contiguous(),)
    model = PaDiM().fit(grids, torch.arange(c), eps=1e-6)
    assert model.mean is not None and model.cov_inv is not None
    assert model.mean.shape == (s * s, c)
    torch.testing.assert_close(model.mean[0], mean, atol=0.1, rtol=0)
    cov = torch.linalg.inv(model.cov_inv[0].double())
    torch.testing.assert_close(cov, (mix @ mix.T).double(), atol=0.15, rtol=0)

    x = torch.randn(2, c, s, s, generator=g)
    d = model.distance(x)
    diff = x[0, :, 0, 0] - model.mean[0]
    assert d.shape == (2, s * s)
    assert float(d[0, 0]) == pytest.approx(float(diff @ model.cov_inv[0] @ diff), rel=1e-5)
    # The training mean is the most normal point: distance 0.
    assert float(model.distance(model.mean[0].view(1, c, 1, 1).expand(1, c, s, s))[0, 0]) < 1e-6


def test_padim_state_round_trips_and_keeps_its_random_dims() -> None:
    index = PaDiM.choose_dims(10, 4, seed=0)
    assert torch.equal(index, PaDiM.choose_dims(10, 4, seed=0)) and len(index) == 4
    assert torch.equal(PaDiM.choose_dims(3, 8, seed=0), torch.arange(3))
    grids = [torch.randn(8, 10, 2, 2, generator=torch.Generator().manual_seed(4))]
    model = PaDiM().fit(grids, index, eps=0.01)
    again = PaDiM.from_tensors(model.to_tensors())
    x = torch.randn(1, 10, 2, 2)
    torch.testing.assert_close(again.distance(x), model.distance(x))


def test_grid_features_resize_every_scale_to_one_grid() -> None:
    feats = [torch.randn(2, 3, 16, 16), torch.randn(2, 5, 4, 4)]
    assert grid_features(feats, 8).shape == (2, 8, 8, 8)


# ----------------------------------------------------------------------------- gradient denoising


def test_matching_timestep_finds_the_nearest_signal_level() -> None:
    assert matching_timestep(ABAR, float(ABAR[37])) == 37
    assert matching_timestep(ABAR, 1.0) == 0


def test_energy_gradient_has_unit_rms_and_points_uphill() -> None:
    c = torch.full((1, 4, 4, 4), 2.0)
    z = torch.zeros(2, 4, 4, 4)
    z[1] = 1.0 + torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(5))
    grad = energy_gradient(lambda v: ((v - c) ** 2).flatten(1).sum(1), z)
    assert grad.shape == z.shape
    torch.testing.assert_close(grad.flatten(1).pow(2).mean(dim=1).sqrt(), torch.ones(2))
    # z[0]'s gradient is the same everywhere (std 0): unit RMS keeps it finite.
    torch.testing.assert_close(grad[0], -torch.ones(4, 4, 4))
    assert float((grad * (z - c)).sum()) > 0  # ∇‖z − c‖² ∝ (z − c)


def test_gradient_denoising_moves_the_frame_towards_normal() -> None:
    """With an ε_θ that knows nothing (0) the denoising steps only undo the shrink; the
    gradient steps carry the frame towards the energy's minimum (the 'normal' point)."""
    normal = torch.zeros(1, 4, 8, 8)
    frame = torch.zeros(1, 4, 8, 8)
    frame[..., 2:5, 2:5] = 3.0  # an anomaly

    def energy(v: torch.Tensor) -> torch.Tensor:
        return ((v - normal) ** 2).flatten(1).sum(1)

    def eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z)

    before = float(energy(frame))
    out = gradient_denoise(eps, energy, frame, ABAR.float(), iterations=10, every=5, lr=0.02)
    after = float(energy(out))
    assert after < before
    # Only 10 small steps: the frame is changed, not replaced.
    assert float((out - frame).abs().max()) < 1.0
    unchanged = gradient_denoise(eps, energy, frame, ABAR.float(), iterations=0)
    torch.testing.assert_close(unchanged, frame)
