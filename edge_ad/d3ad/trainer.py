"""Training loops of the two generative parts: the KL autoencoder and the latent UNet.

Both loops take already-loaded uint8 image tensors (one product is a few hundred images: they
fit in memory, and indexing a tensor beats a DataLoader on a 2-core box) and a model that may
be wrapped for data-parallel training; they only call ``forward``/``backward``/``step``.
"""

from __future__ import annotations

import time

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from edge_ad.config import AutoencoderConfig, UNetConfig
from edge_ad.d3ad.observer import FitObserver
from edge_ad.models.autoencoder import PerceptualLoss, autoencoder_loss
from edge_ad.models.unet import diffusion_loss


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) in [0, 255] → float in [-1, 1], the autoencoder's input range."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.float() / 127.5 - 1.0


def random_crop(x: torch.Tensor, size: int | None, generator: torch.Generator) -> torch.Tensor:
    """One random ``size``² crop per batch (the autoencoder is fully convolutional, so training
    on crops costs a fraction of full frames and still sees every region over an epoch)."""
    if size is None or size >= min(x.shape[-2:]):
        return x
    top = int(torch.randint(0, x.shape[-2] - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, x.shape[-1] - size + 1, (1,), generator=generator))
    return x[..., top : top + size, left : left + size]


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


def steps_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def train_autoencoder(
    vae: AutoencoderKL | torch.nn.Module,
    images: torch.Tensor,
    cfg: AutoencoderConfig,
    device: torch.device,
    observer: FitObserver | None = None,
    seed: int = 0,
    perceptual: PerceptualLoss | None = None,
) -> dict[str, float]:
    """Fit the autoencoder on normal images (uint8 (N, 3, H, W)) with L1 + small KL, plus
    ``cfg.perceptual_weight`` · ``perceptual(recon, x)`` when a perceptual loss is given."""
    observer = observer or FitObserver()
    generator = torch.Generator().manual_seed(seed)
    module = getattr(vae, "module", vae)  # DDP-wrapped or not
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    total_steps = cfg.epochs * steps_per_epoch(len(images), cfg.batch_size)
    # A constant rate leaves the last weights wherever the last noisy steps put them (the same
    # settings gave validation L1 0.073 and 0.099 in two runs); decaying it settles them.
    schedule = (
        get_cosine_schedule_with_warmup(optimizer, max(1, total_steps // 20), total_steps)
        if cfg.lr_schedule == "cosine"
        else None
    )
    observer.stage_start("autoencoder", total_steps)
    start, last = time.perf_counter(), {}
    vae.train()
    for epoch in range(cfg.epochs):
        sums: dict[str, float] = {}
        batches = _batches(len(images), cfg.batch_size, generator)
        for idx in batches:
            x = random_crop(to_model_range(images[idx]), cfg.crop_size, generator).to(device)
            loss, parts = autoencoder_loss(
                module, x, cfg.kl_weight, None, perceptual, cfg.perceptual_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            observer.advance("autoencoder", 1, loss=parts["loss"])
        last = {f"ae_{k}": v / len(batches) for k, v in sums.items()}
        last["ae_lr"] = float(optimizer.param_groups[0]["lr"])
        observer.epoch_end("autoencoder", epoch, last)
    vae.eval()
    summary = {**last, "ae_seconds": time.perf_counter() - start}
    observer.stage_end("autoencoder", summary)
    return summary


def train_unet(
    unet: UNet2DModel | torch.nn.Module,
    latents: torch.Tensor,
    scheduler: DDPMScheduler,
    cfg: UNetConfig,
    device: torch.device,
    observer: FitObserver | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Fit the ε-prediction UNet on the training latents z0 = E(x) (paper Eq. 6).

    With ``cfg.ema_decay`` the weights left in ``unet`` at the end are the exponential moving
    average (diffusers' ``EMAModel`` with warm-up), which LDM and DDPM sample from. It is off in
    every profile: with latent crops and 3× the steps it lowered magnetictile I-AUROC (issue 4),
    because a better denoiser from a noiseless start also rebuilds the defects.
    """
    observer = observer or FitObserver()
    generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator(device=device).manual_seed(seed + 1)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = (
        EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
        if cfg.ema_decay is not None
        else None
    )
    observer.stage_start("unet", cfg.epochs * steps_per_epoch(len(latents), cfg.batch_size))
    start, last = time.perf_counter(), {}
    unet.train()
    for epoch in range(cfg.epochs):
        total, batches = 0.0, _batches(len(latents), cfg.batch_size, generator)
        for idx in batches:
            z0 = random_crop(latents[idx], cfg.crop_size, generator).to(device)
            loss = diffusion_loss(unet, scheduler, z0, noise_generator, cfg.max_train_timestep)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.step(unet.parameters())
            total += float(loss.detach())
            observer.advance("unet", 1, loss=float(loss.detach()))
        last = {"unet_loss": total / len(batches)}
        observer.epoch_end("unet", epoch, last)
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    summary = {**last, "unet_seconds": time.perf_counter() - start}
    observer.stage_end("unet", summary)
    return summary
