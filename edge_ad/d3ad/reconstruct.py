"""Dynamic reconstruction: noiseless start at T̂, then guided DDIM back to ẑ0 (Algorithm 1).

D3AD paper §4 and Algorithm 1, with the DDAD error correction (Eq. 8) and DDIM (Eq. 7,
σ = 0)::

    4: z_T̂ = √ᾱ_T̂ · z0                              no noise, only scaled ("downscaling", A.2.1)
    5: for t in the 10 timesteps of T̂ (step T̂/10):
    6:     ỹ_t = √ᾱ_t · z0 + √(1−ᾱ_t) · ε            ε = ε_θ(z_t, t), the model's prediction
    7:     ε̂  = ε − η · √(1−ᾱ_t) · (ỹ_t − z_t)       guidance towards z0 (η = 0: plain DDIM)
           x0_t = (z_t − √(1−ᾱ_t) · ε̂) / √ᾱ_t        f_θ: the clean estimate at step t
    8:     z_next = √ᾱ_next · x0_t + √(1−ᾱ_next) · ε̂  DDIM, σ = 0
   10: return ẑ0 = z after the last step (ᾱ_next = 1 there, so ẑ0 = x0 of the last step)

Indexing (checked against github.com/JustinTebbe/Dynamic-noise-AD, utilities.compute_alpha2,
sample.my_generalized_steps and test.py):

* Timestep t ↔ ``alphas_cumprod[t]``, 0-based, as in diffusers and as in the reference's
  training loss (``(1-b).cumprod().index_select(0, t)``); t = −1 means ᾱ = 1 (the reference
  pads the betas with a leading 0 and indexes t+1).
* The start latent is scaled with ``alphas_cumprod[T̂]`` (reference: ``compute_alpha2(betas,
  T̂)``), but the model is first called at t = T̂ − T̂/10: the reference's sequence is
  ``arange(0, T̂, T̂/10)`` walked backwards, i.e. T̂−s, T̂−2s, …, s, 0, and after 0 comes −1.
  We follow the reference exactly (the start is one stride "deeper" than the first step; with
  a noiseless start this only changes the scale by √(ᾱ_T̂/ᾱ_{T̂−s}) ≈ 0.99 at T̂ = 80).

Every frame takes exactly ``steps`` steps whatever its T̂, so ᾱ_t and ᾱ_next are per-sample
(N, 1, 1, 1) tensors and one batch can mix frames of different T̂ (the UNet takes a per-sample
timestep tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from edge_ad.errors import EdgeADError

__all__ = [
    "abar_at",
    "alphas_cumprod",
    "guided_step",
    "reconstruct_latents",
    "start_latent",
    "timestep_sequence",
    "timestep_table",
]

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def alphas_cumprod(
    beta_start: float = 0.0015, beta_end: float = 0.0195, T: int = 1000
) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s) for linear β from ``beta_start`` to ``beta_end`` over T steps.

    Computed in float64 and returned as float32 (T,): equal (to float32 rounding) to
    ``diffusers.DDPMScheduler(beta_schedule="linear", ...).alphas_cumprod`` and to the
    reference's ``constants_dict['alphas_cumprod']``, so the UNet is trained and sampled on the
    same schedule.
    """
    if T < 1:
        raise ValueError("T must be positive")
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def _check_t_hat(t_hat: int, steps: int, num_train_timesteps: int | None = None) -> None:
    if steps < 1:
        raise ValueError("steps must be positive")
    if t_hat < steps or t_hat % steps != 0:
        raise EdgeADError(
            f"T̂={t_hat} must be a positive multiple of the number of DDIM steps ({steps}) "
            "so that every step lands on an integer timestep"
        )
    if num_train_timesteps is not None and t_hat >= num_train_timesteps:
        raise EdgeADError(f"T̂={t_hat} is beyond the diffusion schedule (T={num_train_timesteps})")


def timestep_sequence(t_hat: int, steps: int = 10) -> list[int]:
    """The model timesteps for one T̂, followed by the terminal "next" timestep −1.

    Returns ``steps + 1`` ints [T̂−s, T̂−2s, …, s, 0, −1] with stride s = T̂/steps, so that
    ``zip(seq[:-1], seq[1:])`` gives the (t, t_next) pairs of the loop; t_next = −1 means
    ᾱ_next = 1 (the last step lands on the clean estimate). The start latent itself is scaled
    with ᾱ at index T̂ (see the module docstring). E.g. T̂=20 → [18, 16, …, 2, 0, −1].
    """
    t_hat, steps = int(t_hat), int(steps)
    _check_t_hat(t_hat, steps)
    stride = t_hat // steps
    return [t_hat - i * stride for i in range(1, steps + 1)] + [-1]


def timestep_table(t_hat: torch.Tensor | Sequence[int], steps: int = 10) -> torch.Tensor:
    """Per-sample :func:`timestep_sequence` for a batch: int64 (steps + 1, N); row i = step i."""
    t = torch.as_tensor(t_hat, dtype=torch.long).reshape(-1)
    if t.numel() and (bool((t < steps).any()) or bool((t % steps != 0).any())):
        bad = t[(t < steps) | (t % steps != 0)][0].item()
        _check_t_hat(int(bad), steps)
    stride = t // steps
    i = torch.arange(1, steps + 1, dtype=torch.long, device=t.device)[:, None]
    table = t[None, :] - i * stride[None, :]
    terminal = torch.full((1, t.numel()), -1, dtype=torch.long, device=t.device)
    return torch.cat([table, terminal], dim=0)


def abar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t per sample as (N, 1, 1, 1); t = −1 gives ᾱ = 1 (the step after timestep 0)."""
    t = t.to(device=alphas_cumprod.device, dtype=torch.long)
    abar = alphas_cumprod[t.clamp(min=0)]
    abar = torch.where(t < 0, torch.ones_like(abar), abar)
    return abar.reshape(-1, 1, 1, 1)


def start_latent(z0: torch.Tensor, abar_t: torch.Tensor | float) -> torch.Tensor:
    """Algorithm 1 line 4: z_T̂ = √ᾱ_T̂ · z0, scaled and *not* noised (paper A.2.1, ω = 0)."""
    abar = torch.as_tensor(abar_t, dtype=z0.dtype, device=z0.device)
    return abar.sqrt() * z0


def guided_step(
    z_t: torch.Tensor,
    z0: torch.Tensor,
    eps: torch.Tensor,
    abar_t: torch.Tensor | float,
    abar_next: torch.Tensor | float,
    eta: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One guided DDIM step (Algorithm 1 lines 6–8). Returns (z_next, x0_t, ε̂).

    ``eps`` is the model prediction ε_θ(z_t, t); ``abar_t``/``abar_next`` are ᾱ_t, ᾱ_next as
    scalars or per-sample tensors broadcastable to z_t (e.g. (N, 1, 1, 1)); ``eta`` is the
    guidance temperature η (paper: 0 or 7–10).
    """
    kw = {"dtype": z_t.dtype, "device": z_t.device}
    abar_t = torch.as_tensor(abar_t, **kw)
    abar_next = torch.as_tensor(abar_next, **kw)
    eta = torch.as_tensor(eta, **kw)
    sqrt_abar_t = abar_t.sqrt()  # √ᾱ_t
    sqrt_one_minus_abar_t = (1.0 - abar_t).sqrt()  # √(1−ᾱ_t)

    # 6: ỹ_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε  — where z_t would be if z0 were the clean latent
    y_t = sqrt_abar_t * z0 + sqrt_one_minus_abar_t * eps
    # 7: ε̂ = ε − η·√(1−ᾱ_t)·(ỹ_t − z_t)  — DDAD error correction (Eq. 8)
    eps_hat = eps - eta * sqrt_one_minus_abar_t * (y_t - z_t)
    # f_θ: x0_t = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t
    x0_t = (z_t - sqrt_one_minus_abar_t * eps_hat) / sqrt_abar_t
    # 8: z_next = √ᾱ_next·x0_t + √(1−ᾱ_next)·ε̂  — DDIM (Eq. 7) with σ = 0
    z_next = abar_next.sqrt() * x0_t + (1.0 - abar_next).sqrt() * eps_hat
    return z_next, x0_t, eps_hat


def reconstruct_latents(
    eps_model: EpsModel,
    z0: torch.Tensor,
    t_hat: torch.Tensor | Sequence[int],
    alphas_cumprod: torch.Tensor,
    steps: int = 10,
    eta: float = 0.0,
) -> torch.Tensor:
    """Algorithm 1 lines 4–9 for a batch: z0 (N, C, h, w) and per-sample T̂ (N,) → ẑ0.

    ``eps_model(z_t, t)`` returns ε_θ (N, C, h, w) for per-sample int64 timesteps t (N,) on
    z0's device (an object with ``.sample``, as diffusers' UNet2DModel returns, is accepted).
    Every sample takes exactly ``steps`` steps of stride T̂/steps; T̂ must be a multiple of
    ``steps`` with T̂ < len(alphas_cumprod). The update runs in at least float32 even when
    z0/the model are float16 (1 − ᾱ_t is ~1e-3 at small t). ``eta = 0`` disables guidance.
    """
    if z0.ndim != 4:
        raise ValueError(f"z0 must be (N, C, h, w), got shape {tuple(z0.shape)}")
    n = z0.shape[0]
    t_hat_t = torch.as_tensor(t_hat, dtype=torch.long).reshape(-1).cpu()
    if t_hat_t.numel() != n:
        raise ValueError(f"t_hat has {t_hat_t.numel()} entries for a batch of {n}")
    if n == 0:
        return z0.clone()
    table = timestep_table(t_hat_t, steps).to(z0.device)  # (steps+1, N); checks T̂ % steps
    if int(t_hat_t.max()) >= alphas_cumprod.numel():
        _check_t_hat(int(t_hat_t.max()), steps, alphas_cumprod.numel())

    work = torch.promote_types(z0.dtype, torch.float32)
    ac = alphas_cumprod.to(device=z0.device, dtype=work)
    z0_w = z0.to(work)

    with torch.no_grad():
        # 4: z_T̂ = √ᾱ_T̂·z0 (ᾱ at index T̂, as the reference)
        z = start_latent(z0_w, abar_at(ac, t_hat_t.to(z0.device)))
        # 5: the `steps` timesteps T̂−s … 0; the last step's "next" is −1 (ᾱ_next = 1)
        for i in range(steps):
            t, t_next = table[i], table[i + 1]
            out = eps_model(z.to(z0.dtype), t)
            eps = getattr(out, "sample", out).to(work)  # ε_θ(z_t, t)
            z, _, _ = guided_step(z, z0_w, eps, abar_at(ac, t), abar_at(ac, t_next), eta)
    # 10: ẑ0 (= x0 of the last step, since ᾱ_next = 1 there)
    return z.to(z0.dtype)
