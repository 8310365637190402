"""Latent denoiser ε_θ(z_t, t) and its DDPM noise schedule (D3AD paper, Eq. 6).

The paper trains the unconditional LDM UNet on the autoencoder latents with the plain
ε-prediction objective. ``diffusers.UNet2DModel`` is that network family; the defaults here
are a CPU-sized version (3 resolutions, one res-block each, attention only where the map is
smallest). ``UNet2DModel`` takes one timestep per sample, so a batch may mix frames whose
severity picked different T̂ (``edge_ad/d3ad/reconstruct.py`` relies on this).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from edge_ad.errors import ConfigError

DEFAULT_UNET_CHANNELS: tuple[int, ...] = (64, 128, 128)

#: D3AD/LDM schedule: β from 0.0015 to 0.0195 over T=1000 steps.
BETA_START = 0.0015
BETA_END = 0.0195
NUM_TRAIN_TIMESTEPS = 1000


def build_unet(
    sample_size: int = 32,
    in_channels: int = 4,
    block_out_channels: Sequence[int] = DEFAULT_UNET_CHANNELS,
    layers_per_block: int = 1,
    attention: bool = True,
    norm_num_groups: int = 32,
    attention_head_dim: int = 32,
) -> UNet2DModel:
    """Unconditional ε-prediction UNet for ``in_channels`` latents of ``sample_size`` pixels.

    With 3 blocks a 32x32 latent (256 px image) is processed at 32, 16 and 8 pixels;
    self-attention sits in the 8x8 block and the middle block (64 tokens: cheap on CPU yet
    global, which is what lets the model "repaint" a large missing part from its context).
    ``attention=False`` gives a purely convolutional UNet. Latent sizes must be divisible by
    ``2 ** (len(block_out_channels) - 1)``; ``sample_size`` is only recorded in the config.
    """
    channels = tuple(int(c) for c in block_out_channels)
    if len(channels) < 2:
        raise ConfigError("the UNet needs at least two resolutions")
    bad = [c for c in channels if c % norm_num_groups]
    if bad:
        raise ConfigError(f"UNet norm_num_groups={norm_num_groups} does not divide widths {bad}")
    if attention and channels[-1] % attention_head_dim:
        raise ConfigError(
            f"UNet attention_head_dim={attention_head_dim} does not divide {channels[-1]}"
        )
    down = ["DownBlock2D"] * len(channels)
    up = ["UpBlock2D"] * len(channels)
    if attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
        add_attention=attention,
    )


def make_noise_scheduler(
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_schedule: str = "linear",
) -> DDPMScheduler:
    """DDPM schedule of the paper: β linear in [beta_start, beta_end], T steps, ε-prediction.

    ``clip_sample`` is off: latents are not bounded to [-1, 1] like pixels are.
    ``beta_schedule="scaled_linear"`` gives LDM's variant (linear in √β, same end points).
    """
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ConfigError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
    )


def draw_timesteps_and_noise(
    scheduler: DDPMScheduler,
    z0: torch.Tensor,
    generator: torch.Generator | None = None,
    max_timestep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, ε) for a training batch: t uniform in [0, T) or [0, ``max_timestep``), ε ~ N(0, I)
    shaped like z0, both drawn from ``generator`` (on z0's device or the CPU), on z0's device."""
    n = z0.shape[0]
    gen_device = generator.device if generator is not None else z0.device
    steps = scheduler.config.num_train_timesteps
    if max_timestep is not None:
        steps = max(1, min(int(max_timestep), steps))
    t = torch.randint(0, steps, (n,), generator=generator, device=gen_device).to(z0.device)
    noise = torch.randn(z0.shape, generator=generator, device=gen_device, dtype=z0.dtype)
    return t, noise.to(z0.device)


def diffusion_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    z0: torch.Tensor,
    generator: torch.Generator | None = None,
    max_timestep: int | None = None,
) -> torch.Tensor:
    """Simple latent DDPM loss (paper Eq. 6): MSE between ε and ε_θ(√ᾱ_t z0 + √(1−ᾱ_t) ε, t).

    t is drawn uniformly from [0, T) per sample, or from [0, ``max_timestep``) when given:
    D3AD only ever denoises from T̂ ≤ T_max (80), so on a CPU budget the training steps are
    better spent on the timesteps inference uses. ``generator`` (on z0's device or the CPU)
    makes t and ε reproducible, e.g. for a fixed validation loss.
    """
    t, noise = draw_timesteps_and_noise(scheduler, z0, generator, max_timestep)
    z_t = scheduler.add_noise(z0, noise, t)
    pred = unet(z_t, t).sample
    return F.mse_loss(pred.float(), noise.float())


def corrupted_diffusion_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    z0: torch.Tensor,
    corrupted: torch.Tensor,
    generator: torch.Generator | None = None,
    max_timestep: int | None = None,
    snr_gamma: float = 5.0,
) -> torch.Tensor:
    """The denoiser learns to remove a corruption as if it were noise.

    The input is the *corrupted* latent noised, z_t = √ᾱ_t z̃0 + √(1−ᾱ_t) ε, and the target is
    the ε* whose removal lands on the *clean* z0:

        ε* = (z_t − √ᾱ_t z0) / √(1−ᾱ_t) = ε + √ᾱ_t (z̃0 − z0) / √(1−ᾱ_t)

    (where nothing was corrupted ε* = ε: the plain objective). At small t, ε* in a corrupted
    region is many times the unit noise, so the loss is weighted per sample by Min-SNR-γ
    (Hang et al., 2023), min(SNR_t, γ)/SNR_t with SNR_t = ᾱ_t/(1−ᾱ_t): the small t, where a
    repair of a whole region cannot be asked for, do not swamp the rest.
    """
    t, noise = draw_timesteps_and_noise(scheduler, z0, generator, max_timestep)
    abar = scheduler.alphas_cumprod.to(z0.device)[t].float().reshape(-1, 1, 1, 1)
    z_t = abar.sqrt() * corrupted + (1.0 - abar).sqrt() * noise
    target = noise + abar.sqrt() * (corrupted - z0) / (1.0 - abar).sqrt()
    pred = unet(z_t.to(z0.dtype), t).sample
    snr = abar / (1.0 - abar)
    weight = snr.clamp(max=snr_gamma) / snr
    return (weight * (pred.float() - target.float()) ** 2).mean()
