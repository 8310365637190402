"""RAN's reconstruction: gradient denoising guided by PaDiM (RAN §3.3, Eq. 13, Alg. 1).

Instead of noising the frame and sampling it back (which also "repairs" normal detail), RAN
moves the frame down the gradient of the PaDiM energy L — anomalies are what L sees — and treats
each gradient step as a step of forward diffusion, so the diffusion model can denoise it:

    x_k = √(1 − s²)·x_{k−1} − s·ĝ,     ĝ = ∇L(x_{k−1}) / rms(∇L(x_{k−1}))       (Eq. 13)
    every N_d steps: one reverse diffusion step from the t whose ᾱ_t matches the signal left,
                     ᾱ ≈ Π(1 − s²), to t − 1 (posterior mean at x̂_0 = one-step estimate)

The paper assumes ∇L ~ N(0, β I) to read the step as diffusion noise; normalising the gradient
to unit root-mean-square (the standard deviation of zero-mean noise, but finite for a constant
gradient) makes that scale hold by construction (s = 0.02 is then exactly the noise level of a
step). The frame here is the latent z0 = E(x): L is evaluated on φ(D(z)), and
the UNet denoises in the space it was trained in. Alg. 1's sign (+) and weight (√(1 − β̂_t))
disagree with Eq. 13; Eq. 13 is used (descent). The reverse step is its mean (no sampled noise),
so a frame's reconstruction and score are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edge_ad.diffusionad.one_step import one_step_x0
from edge_ad.ran.kl_score import posterior

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EnergyFn = Callable[[torch.Tensor], torch.Tensor]  # latent (N, C, h, w) → per-frame energy (N,)


def matching_timestep(alphas_cumprod: torch.Tensor, abar: float) -> int:
    """The t whose ᾱ_t is closest to ``abar`` (the signal fraction left after the steps)."""
    return int(torch.argmin((alphas_cumprod.double() - abar).abs()))


def energy_gradient(energy: EnergyFn, z: torch.Tensor) -> torch.Tensor:
    """∇_z L, normalised to unit root-mean-square per frame (0 stays 0)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(z).sum(), z)
    rms = grad.flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-12)
    return grad / rms.view(-1, *([1] * (grad.ndim - 1)))


def denoise_step(
    eps_fn: EpsFn, z: torch.Tensor, t: int, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """One deterministic reverse step z_t → E[z_{t−1}] (posterior mean at the one-step x̂_0)."""
    abar = float(alphas_cumprod[t])
    eps = eps_fn(z, torch.full((len(z),), t, device=z.device, dtype=torch.long))
    mean, _ = posterior(one_step_x0(z, eps, abar), z, t, alphas_cumprod)
    return mean


def gradient_denoise(
    eps_fn: EpsFn,
    energy: EnergyFn,
    z0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    iterations: int = 20,
    every: int = 5,
    lr: float = 0.02,
) -> torch.Tensor:
    """Alg. 1 on latents z0 → the reconstruction ẑ0 (a final one-step x̂_0 at the remaining ᾱ)."""
    z, abar = z0.detach(), 1.0
    shrink = (1.0 - lr * lr) ** 0.5
    for k in range(1, iterations + 1):
        z = shrink * z - lr * energy_gradient(energy, z)
        abar *= shrink * shrink
        if k % every == 0:
            t = matching_timestep(alphas_cumprod, abar)
            z = denoise_step(eps_fn, z, t, alphas_cumprod)
            abar = 1.0 if t == 0 else float(alphas_cumprod[t - 1])
    if abar < 1.0:  # what is left since the last denoising step: one step to x̂_0
        t = matching_timestep(alphas_cumprod, abar)
        eps = eps_fn(z, torch.full((len(z),), t, device=z.device, dtype=torch.long))
        z = one_step_x0(z, eps, float(alphas_cumprod[t]))
    return z
