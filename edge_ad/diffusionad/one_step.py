"""Norm-guided one-step denoising (DiffusionAD §3.2, Eqs. 6–8), as pure tensor math.

The paper works on pixels; here the same formulas run on the latents z0 = E(x) of the shared
autoencoder (so the UNet, its schedule and its Ray Train stage are the ones D3AD uses):

    z_t    = √ᾱ_t·z0 + √(1−ᾱ_t)·ε                                   (Eq. 1, two noise scales)
    ẑ0     = (z_t − √(1−ᾱ_t)·ε_θ(z_t, t)) / √ᾱ_t                     (Eq. 6, one step)
    n      = ẑ0 from the big scale t_b: the guide, "a normal version" of the frame
    n_ts   = √ᾱ_ts·n + √(1−ᾱ_ts)·ε_θ(z_ts, t_s)                      (the guide at t_s)
    ε_g    = ε_θ(z_ts, t_s) − √(1−ᾱ_ts)·w·(n_ts − z_ts)              (Eq. 7)
    ẑ0_g   = (z_ts − √(1−ᾱ_ts)·ε_g) / √ᾱ_ts                          (Eq. 8)

The big scale repairs large anomalies but blurs detail, the small one keeps detail but repairs
little; the guide pulls the small-scale estimate towards the repaired one. Latents are not
bounded, so the paper's clamp of x̂0 to [−1, 1] is left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def noised(z0: torch.Tensor, noise: torch.Tensor, abar: float) -> torch.Tensor:
    """z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε (Eq. 1)."""
    return abar**0.5 * z0 + (1.0 - abar) ** 0.5 * noise


def one_step_x0(z_t: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t)·ε_θ) / √ᾱ_t (Eq. 6)."""
    return (z_t - (1.0 - abar) ** 0.5 * eps) / abar**0.5


def guided_eps(
    z_ts: torch.Tensor, eps_s: torch.Tensor, guide: torch.Tensor, abar_s: float, w: float
) -> torch.Tensor:
    """ε_θ(x_ts, n_ts) = ε_θ(x_ts) − √(1−ᾱ_ts)·w·(n_ts − x_ts), with the guide re-noised to t_s
    by the PREDICTED noise: n_ts = √ᾱ_ts·n + √(1−ᾱ_ts)·ε_θ(x_ts) (Eq. 7)."""
    n_ts = noised(guide, eps_s, abar_s)
    return eps_s - (1.0 - abar_s) ** 0.5 * w * (n_ts - z_ts)


def norm_guided_x0(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    t_small: int,
    t_big: int,
    alphas_cumprod: torch.Tensor,
    w: float = 1.0,
    noise_small: torch.Tensor | None = None,
    noise_big: torch.Tensor | None = None,
) -> torch.Tensor:
    """ẑ0_g of Eq. 8 for a batch z0: both scales in ONE ε_θ call of 2N samples.

    ``noise_small`` / ``noise_big`` (broadcastable to z0) are the ε of the two scales; random
    when omitted.
    """
    if not 0 <= t_small < t_big < len(alphas_cumprod):
        raise ValueError(f"need 0 ≤ t_s < t_b < {len(alphas_cumprod)}, got {t_small}, {t_big}")
    n = z0.shape[0]
    eps_s_in = torch.randn_like(z0) if noise_small is None else noise_small.expand_as(z0)
    eps_b_in = torch.randn_like(z0) if noise_big is None else noise_big.expand_as(z0)
    abar_s, abar_b = float(alphas_cumprod[t_small]), float(alphas_cumprod[t_big])
    z_ts, z_tb = noised(z0, eps_s_in, abar_s), noised(z0, eps_b_in, abar_b)
    t = torch.tensor([t_small] * n + [t_big] * n, device=z0.device)
    eps = eps_fn(torch.cat([z_ts, z_tb]), t)
    eps_s, eps_b = eps[:n], eps[n:]
    guide = one_step_x0(z_tb, eps_b, abar_b)
    return one_step_x0(z_ts, guided_eps(z_ts, eps_s, guide, abar_s, w), abar_s)
