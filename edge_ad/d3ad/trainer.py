"""Training loops of the two generative parts: the KL autoencoder and the latent UNet.

Both loops take already-loaded uint8 image tensors (one product is a few hundred images: they
fit in memory, and indexing a tensor beats a DataLoader on a 2-core box). A :class:`LoopControl`
lets Ray Train run the same loops data-parallel and resumable: ``wrap`` puts the module that
computes the loss into DDP (so gradients are all-reduced in ``backward``), ``on_epoch_end``
receives the loop state to checkpoint, and ``resume`` continues from such a state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from edge_ad.config import AutoencoderConfig, UNetConfig
from edge_ad.d3ad.observer import FitObserver
from edge_ad.models.autoencoder import PerceptualLoss, autoencoder_loss
from edge_ad.models.corruption import corrupt_latents
from edge_ad.models.unet import corrupted_diffusion_loss, diffusion_loss

LoopState = dict[str, Any]


def _same(module: torch.nn.Module) -> torch.nn.Module:
    return module


@dataclass
class LoopControl:
    """How a training loop runs when it is one of several workers, or is resumed.

    ``wrap(module)`` returns the module to call for the loss (DDP under Ray Train; the
    parameters stay those of ``module``). ``on_epoch_end(epoch, state)`` gets the optimizer,
    schedule, EMA and RNG state after each epoch; passing that state back as ``resume`` makes the
    loop continue with epoch ``state["epoch"] + 1`` exactly as if it had not stopped (the model
    weights are restored by the caller).
    """

    wrap: Callable[[torch.nn.Module], torch.nn.Module] = _same
    on_epoch_end: Callable[[int, LoopState], None] | None = None
    resume: LoopState | None = None

    @property
    def start_epoch(self) -> int:
        return 0 if self.resume is None else int(self.resume["epoch"]) + 1


class AutoencoderObjective(torch.nn.Module):
    """The autoencoder's training loss as one ``forward``, so DDP sees every parameter use
    (``encode`` and ``decode`` are separate methods that DDP's ``forward`` hook would miss)."""

    def __init__(
        self,
        vae: AutoencoderKL,
        kl_weight: float,
        perceptual: PerceptualLoss | None = None,
        perceptual_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        # A plain attribute, not a submodule: the frozen teacher inside must not be synced.
        self.__dict__["perceptual"] = perceptual
        self.perceptual_weight = perceptual_weight

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return autoencoder_loss(
            self.vae, x, self.kl_weight, generator, self.perceptual, self.perceptual_weight
        )


def _generator_states(*generators: torch.Generator) -> list[torch.Tensor]:
    return [g.get_state() for g in generators]


def _restore_generators(states: list[torch.Tensor], *generators: torch.Generator) -> None:
    for g, state in zip(generators, states, strict=True):
        g.set_state(state)


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
    vae: AutoencoderKL,
    images: torch.Tensor,
    cfg: AutoencoderConfig,
    device: torch.device,
    observer: FitObserver | None = None,
    seed: int = 0,
    perceptual: PerceptualLoss | None = None,
    control: LoopControl | None = None,
) -> dict[str, float]:
    """Fit the autoencoder on normal images (uint8 (N, 3, H, W)) with L1 + small KL, plus
    ``cfg.perceptual_weight`` · ``perceptual(recon, x)`` when a perceptual loss is given."""
    observer = observer or FitObserver()
    control = control or LoopControl()
    generator = torch.Generator().manual_seed(seed)
    # Posterior samples from a generator of the loop's own, so a resumed run draws the same.
    sample_generator = torch.Generator(device=device).manual_seed(seed + 2)
    objective = control.wrap(
        AutoencoderObjective(vae, cfg.kl_weight, perceptual, cfg.perceptual_weight)
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    total_steps = cfg.epochs * steps_per_epoch(len(images), cfg.batch_size)
    # A constant rate leaves the last weights wherever the last noisy steps put them (the same
    # settings gave validation L1 0.073 and 0.099 in two runs); decaying it settles them.
    schedule = (
        get_cosine_schedule_with_warmup(optimizer, max(1, total_steps // 20), total_steps)
        if cfg.lr_schedule == "cosine"
        else None
    )
    if control.resume is not None:
        optimizer.load_state_dict(control.resume["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(control.resume["schedule"])
        _restore_generators(control.resume["generators"], generator, sample_generator)
    first = control.start_epoch
    observer.stage_start("autoencoder", total_steps)
    if first:  # resumed: the bar starts where the checkpoint left off
        observer.advance("autoencoder", first * steps_per_epoch(len(images), cfg.batch_size))
    start, last = time.perf_counter(), {}
    vae.train()
    for epoch in range(first, cfg.epochs):
        sums: dict[str, float] = {}
        batches = _batches(len(images), cfg.batch_size, generator)
        for idx in batches:
            x = random_crop(to_model_range(images[idx]), cfg.crop_size, generator).to(device)
            loss, parts = objective(x, sample_generator)
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
        if control.on_epoch_end is not None:
            state = {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict() if schedule is not None else None,
                "generators": _generator_states(generator, sample_generator),
            }
            control.on_epoch_end(epoch, state)
    vae.eval()
    summary = {**last, "ae_seconds": time.perf_counter() - start}
    observer.stage_end("autoencoder", summary)
    return summary


def train_unet(
    unet: UNet2DModel,
    latents: torch.Tensor,
    scheduler: DDPMScheduler,
    cfg: UNetConfig,
    device: torch.device,
    observer: FitObserver | None = None,
    seed: int = 0,
    control: LoopControl | None = None,
) -> dict[str, float]:
    """Fit the ε-prediction UNet on the training latents z0 (paper Eq. 6), or, with
    ``cfg.corruption``, to remove synthetic corruption of them as if it were noise.

    With ``cfg.ema_decay`` the weights left in ``unet`` at the end are the exponential moving
    average (diffusers' ``EMAModel`` with warm-up), which LDM and DDPM sample from. It is off in
    every profile: with latent crops and 3× the steps it lowered magnetictile I-AUROC,
    because a better denoiser from a noiseless start also rebuilds the defects.
    """
    observer = observer or FitObserver()
    control = control or LoopControl()
    generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator(device=device).manual_seed(seed + 1)
    model = control.wrap(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = (
        EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
        if cfg.ema_decay is not None
        else None
    )
    if control.resume is not None:
        optimizer.load_state_dict(control.resume["optimizer"])
        if ema is not None:
            ema.load_state_dict(control.resume["ema"])
        _restore_generators(control.resume["generators"], generator, noise_generator)
    per_epoch = steps_per_epoch(len(latents), cfg.batch_size)
    first = control.start_epoch
    observer.stage_start("unet", cfg.epochs * per_epoch)
    if first:
        observer.advance("unet", first * per_epoch)
    start, last = time.perf_counter(), {}
    unet.train()
    for epoch in range(first, cfg.epochs):
        total, batches = 0.0, _batches(len(latents), cfg.batch_size, generator)
        for idx in batches:
            z0 = random_crop(latents[idx], cfg.crop_size, generator).to(device)
            if cfg.corruption == "none":
                loss = diffusion_loss(model, scheduler, z0, noise_generator, cfg.max_train_timestep)
            else:
                corrupted, _ = corrupt_latents(
                    z0,
                    cfg.corruption,
                    cfg.corruption_probability,
                    cfg.corruption_area,
                    generator=generator,
                )
                loss = corrupted_diffusion_loss(
                    model,
                    scheduler,
                    z0,
                    corrupted,
                    noise_generator,
                    cfg.max_train_timestep,
                    cfg.snr_gamma,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.step(unet.parameters())
            total += float(loss.detach())
            observer.advance("unet", 1, loss=float(loss.detach()))
        last = {"unet_loss": total / len(batches)}
        observer.epoch_end("unet", epoch, last)
        if control.on_epoch_end is not None:
            state = {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "generators": _generator_states(generator, noise_generator),
            }
            control.on_epoch_end(epoch, state)
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    summary = {**last, "unet_seconds": time.perf_counter() - start}
    observer.stage_end("unet", summary)
    return summary
