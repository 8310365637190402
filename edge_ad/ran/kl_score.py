"""The pixel-level KL score of RAN (§3.2): how surprised the diffusion model is by
each pixel of a frame, at a few noise levels.

For a timestep t ≥ 1 the true reverse step q(x_{t−1} | x_t, x_0) and the model's
p_θ(x_{t−1} | x_t) are diagonal Gaussians (DDPM, Ho et al. Eqs. 6–7, 11):

    μ_q = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x_0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t,   σ_q² = β̃_t
        = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t
    μ_θ = same with x_0 replaced by x̂_0 = (x_t − √(1−ᾱ_t)·ε_θ(x_t, t)) / √ᾱ_t,  σ_p² = β̃_t

and per element  KL(q‖p) = ½·(log σ_p²/σ_q² + (σ_q² + (μ_q − μ_p)²)/σ_p² − 1)  (improved
diffusion's ``normal_kl``). The variance is fixed (the UNet predicts ε only), so the KL reduces to
(μ_q − μ_p)²/(2β̃_t): large where ε_θ cannot explain the frame. Here the frame is the latent
z0 = E(x); the map is the channel mean, upsampled to the image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gaussian_kl(
    mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor
) -> torch.Tensor:
    """Element-wise KL(N(mean1, var1) ‖ N(mean2, var2)) of diagonal Gaussians."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def _abar_prev(alphas_cumprod: torch.Tensor, t: int) -> float:
    return 1.0 if t == 0 else float(alphas_cumprod[t - 1])


def posterior(
    x0: torch.Tensor, x_t: torch.Tensor, t: int, alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """(μ_q, β̃_t) of q(x_{t−1} | x_t, x_0) for one timestep t (for t = 0, μ_q = x_0)."""
    abar_t, abar_prev = float(alphas_cumprod[t]), _abar_prev(alphas_cumprod, t)
    alpha_t = abar_t / abar_prev
    beta_t = 1.0 - alpha_t
    mean = (abar_prev**0.5 * beta_t / (1.0 - abar_t)) * x0 + (
        alpha_t**0.5 * (1.0 - abar_prev) / (1.0 - abar_t)
    ) * x_t
    return mean, (1.0 - abar_prev) / (1.0 - abar_t) * beta_t


def kl_map(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    t: int,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Channel-mean KL(q(z_{t−1}|z_t, z0) ‖ p_θ(z_{t−1}|z_t)) per latent pixel: (N, 1, h, w).

    ``noise`` (broadcastable to z0) is the ε that makes z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε.
    """
    if not 1 <= t < len(alphas_cumprod):
        raise ValueError(f"KL timestep must be in [1, {len(alphas_cumprod)}), got {t}")
    abar = float(alphas_cumprod[t])
    z_t = abar**0.5 * z0 + (1.0 - abar) ** 0.5 * noise.expand_as(z0)
    eps = eps_fn(z_t, torch.full((len(z0),), t, device=z0.device, dtype=torch.long))
    z0_hat = (z_t - (1.0 - abar) ** 0.5 * eps) / abar**0.5
    mean_q, var = posterior(z0, z_t, t, alphas_cumprod)
    mean_p, _ = posterior(z0_hat, z_t, t, alphas_cumprod)
    v = torch.full_like(mean_q, var)
    return gaussian_kl(mean_q, v, mean_p, v).mean(dim=1, keepdim=True)
