"""Algorithm 1: schedule, timestep indexing, guided DDIM step, the reconstruction loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from edge_ad.d3ad.reconstruct import (
    abar_at,
    alphas_cumprod,
    guided_step,
    reconstruct_latents,
    start_latent,
    timestep_sequence,
    timestep_table,
)
from edge_ad.errors import EdgeADError

AC = alphas_cumprod()


def test_alphas_cumprod_matches_diffusers():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="linear"
    )
    assert AC.dtype == torch.float32 and AC.shape == (1000,)
    torch.testing.assert_close(AC, sched.alphas_cumprod, rtol=1e-5, atol=1e-6)
    assert AC[0].item() == pytest.approx(1 - 0.0015)


@pytest.mark.parametrize(
    ("t_hat", "expected"),
    [
        (20, [18, 16, 14, 12, 10, 8, 6, 4, 2, 0, -1]),
        (40, [36, 32, 28, 24, 20, 16, 12, 8, 4, 0, -1]),
        (80, [72, 64, 56, 48, 40, 32, 24, 16, 8, 0, -1]),
    ],
)
def test_timestep_sequence(t_hat, expected):
    # reference: arange(0, T̂, T̂/10) walked backwards, then next = -1
    assert timestep_sequence(t_hat, steps=10) == expected


def test_timestep_sequence_rejects_non_multiples():
    with pytest.raises(EdgeADError):
        timestep_sequence(25)
    with pytest.raises(EdgeADError):
        timestep_sequence(0)


def test_timestep_table_matches_sequence_per_sample():
    table = timestep_table(torch.tensor([20, 80, 40]), steps=10)
    assert table.shape == (11, 3) and table.dtype == torch.long
    for j, t_hat in enumerate((20, 80, 40)):
        assert table[:, j].tolist() == timestep_sequence(t_hat)
    with pytest.raises(EdgeADError):
        timestep_table([20, 35])


def test_abar_at_and_terminal():
    got = abar_at(AC, torch.tensor([0, 79, -1]))
    assert got.shape == (3, 1, 1, 1)
    assert got[0].item() == AC[0].item() and got[1].item() == AC[79].item()
    assert got[2].item() == 1.0


def test_start_latent_is_scaled_not_noised():
    z0 = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    abar = torch.tensor([0.9, 0.5], dtype=torch.float64).view(2, 1, 1, 1)
    torch.testing.assert_close(start_latent(z0, abar), abar.sqrt() * z0)


def _hand_step(z_t, z0, eps, a_t, a_next, eta):
    """Algorithm 1 lines 6-8 written out element by element in float64."""
    out = torch.empty_like(z_t)
    x0s = torch.empty_like(z_t)
    ehs = torch.empty_like(z_t)
    for idx in range(z_t.numel()):
        n = idx // (z_t.numel() // z_t.shape[0])
        zt, zz, e = z_t.reshape(-1)[idx].item(), z0.reshape(-1)[idx].item(), eps.reshape(-1)[idx]
        e = e.item()
        at, an = float(a_t[n]), float(a_next[n])
        y = math.sqrt(at) * zz + math.sqrt(1 - at) * e
        eh = e - eta * math.sqrt(1 - at) * (y - zt)
        x0 = (zt - math.sqrt(1 - at) * eh) / math.sqrt(at)
        out.view(-1)[idx] = math.sqrt(an) * x0 + math.sqrt(1 - an) * eh
        x0s.view(-1)[idx] = x0
        ehs.view(-1)[idx] = eh
    return out, x0s, ehs


@pytest.mark.parametrize("eta", [0.0, 1.0, 8.0])
def test_guided_step_matches_hand_formula(eta):
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64)
    z0 = torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64)
    a_t, a_next = [0.83, 0.95], [0.9, 1.0]
    got = guided_step(
        z_t,
        z0,
        eps,
        torch.tensor(a_t, dtype=torch.float64).view(2, 1, 1, 1),
        torch.tensor(a_next, dtype=torch.float64).view(2, 1, 1, 1),
        eta,
    )
    want = _hand_step(z_t, z0, eps, a_t, a_next, eta)
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-12)


def test_guided_step_eta0_is_plain_ddim():
    g = torch.Generator().manual_seed(1)
    z_t, z0, eps = (torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a_t, a_n = 0.8, 0.9
    z_next, x0, eps_hat = guided_step(z_t, z0, eps, a_t, a_n, 0.0)
    x0_ddim = (z_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(x0, x0_ddim)
    torch.testing.assert_close(z_next, math.sqrt(a_n) * x0_ddim + math.sqrt(1 - a_n) * eps)
    # ᾱ_next = 1: the step lands on the clean estimate
    z_last, x0_last, _ = guided_step(z_t, z0, eps, a_t, 1.0, 3.0)
    torch.testing.assert_close(z_last, x0_last)


def _oracle(z0: torch.Tensor, ac: torch.Tensor, calls: list | None = None):
    """ε = (z_t − √ᾱ_t·z0)/√(1−ᾱ_t): the exact noise for a known clean z0."""

    def eps_model(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(t.clone())
        a = abar_at(ac.to(z_t.dtype), t)
        return (z_t - a.sqrt() * z0) / (1 - a).sqrt()

    return eps_model


@pytest.mark.parametrize("eta", [0.0, 8.0])
def test_oracle_model_reconstructs_z0_exactly(eta):
    z0 = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    calls: list = []
    out = reconstruct_latents(_oracle(z0, AC, calls), z0, [20, 80, 40], AC, steps=10, eta=eta)
    torch.testing.assert_close(out, z0, rtol=1e-10, atol=1e-10)
    assert len(calls) == 10
    assert calls[0].tolist() == [18, 72, 36] and calls[-1].tolist() == [0, 0, 0]
    assert calls[0].dtype == torch.long


def _fake_unet(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Deterministic per-sample ε depending on z_t and t (a stand-in for UNet2DModel)."""
    return torch.sin(z_t) * (0.5 + t.to(z_t.dtype).view(-1, 1, 1, 1) / 100.0) - 0.1 * z_t


@pytest.mark.parametrize("eta", [0.0, 7.0])
def test_mixed_t_hat_batch_equals_each_sample_alone(eta):
    z0 = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    t_hats = [20, 80, 40, 20]
    batch = reconstruct_latents(_fake_unet, z0, torch.tensor(t_hats), AC, eta=eta)
    for i, t_hat in enumerate(t_hats):
        alone = reconstruct_latents(_fake_unet, z0[i : i + 1], [t_hat], AC, eta=eta)
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-5, atol=1e-6)
    assert batch.dtype == z0.dtype and batch.shape == z0.shape


def test_loop_follows_algorithm_by_hand():
    """The loop equals: start at √ᾱ[T̂]·z0, then guided steps over timestep_sequence(T̂)."""
    z0 = torch.randn(1, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ac = AC.to(torch.float64)
    seq = timestep_sequence(40)
    z = ac[40].sqrt() * z0
    for t, t_next in itertools.pairwise(seq):
        eps = _fake_unet(z, torch.tensor([t]))
        a_next = 1.0 if t_next < 0 else ac[t_next]
        z, _, _ = guided_step(z, z0, eps, ac[t], a_next, 9.0)
    got = reconstruct_latents(_fake_unet, z0, [40], AC, eta=9.0)
    torch.testing.assert_close(got, z, rtol=1e-12, atol=1e-12)


def test_reconstruct_accepts_diffusers_style_output_and_validates():
    class Out:
        def __init__(self, sample):
            self.sample = sample

    z0 = torch.randn(2, 4, 3, 3)
    out = reconstruct_latents(lambda z, t: Out(_fake_unet(z, t)), z0, [20, 40], AC)
    torch.testing.assert_close(out, reconstruct_latents(_fake_unet, z0, [20, 40], AC))
    with pytest.raises(EdgeADError):
        reconstruct_latents(_fake_unet, z0, [20, 45], AC)
    with pytest.raises(EdgeADError):
        reconstruct_latents(_fake_unet, z0, [20, 1000], AC)
    with pytest.raises(ValueError):
        reconstruct_latents(_fake_unet, z0, [20], AC)


def test_reconstruct_with_real_unet2dmodel_per_sample_timesteps():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
    z0 = torch.randn(2, 4, 8, 8)
    out = reconstruct_latents(lambda z, t: unet(z, t).sample, z0, [20, 80], AC, eta=8.0)
    assert out.shape == z0.shape and torch.isfinite(out).all()
    alone = reconstruct_latents(lambda z, t: unet(z, t).sample, z0[1:], [80], AC, eta=8.0)
    torch.testing.assert_close(out[1:], alone, rtol=1e-4, atol=1e-4)
