"""KL autoencoder (E, D) that maps images to the 8x-downsampled, 4-channel latents D3AD diffuses.

The paper uses the pretrained Stable Diffusion VAE unchanged. That needs a download and a GPU,
so by default a small ``diffusers.AutoencoderKL`` is trained per product on CPU
(:func:`build_autoencoder` + :func:`autoencoder_loss`), and :func:`load_pretrained_autoencoder`
takes the SD VAE (``stabilityai/sd-vae-ft-mse``) from a local directory when one is given.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from edge_ad.errors import ConfigError, EdgeADError

DEFAULT_AE_CHANNELS: tuple[int, ...] = (32, 64, 128, 128)


def build_autoencoder(
    block_out_channels: Sequence[int] = DEFAULT_AE_CHANNELS,
    layers_per_block: int = 1,
    latent_channels: int = 4,
    norm_num_groups: int = 16,
    mid_block_attention: bool = True,
) -> AutoencoderKL:
    """A small trainable ``AutoencoderKL``: 4 blocks = 8x down, 4 latent channels like SD's VAE.

    Same block structure as the SD VAE (128-256-512-512, 2 layers/block) but ~40x fewer
    parameters, so it trains on one product's few hundred images on a CPU in minutes. Group
    norm needs ``norm_num_groups`` to divide every width; 16 keeps >= 2 channels per group in
    the 32-wide first block. ``scaling_factor`` starts at 1.0 and must be set from data with
    :func:`estimate_scaling_factor` after training.
    """
    channels = tuple(int(c) for c in block_out_channels)
    if not channels:
        raise ConfigError("autoencoder needs at least one block")
    bad = [c for c in channels if c % norm_num_groups]
    if bad:
        raise ConfigError(
            f"autoencoder norm_num_groups={norm_num_groups} does not divide widths {bad}"
        )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        scaling_factor=1.0,
        mid_block_add_attention=mid_block_attention,
    )


def _looks_like_path(path_or_id: str) -> bool:
    """Hub ids are ``org/name``; anything else with a separator or a leading . ~ / is a path."""
    return (
        path_or_id.startswith((".", "~", "/"))
        or path_or_id.count("/") != 1
        or (os.sep != "/" and os.sep in path_or_id)
    )


def _from_pretrained(source: str | Path, **kwargs: object) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained`` without the hub client's deprecation noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return AutoencoderKL.from_pretrained(source, **kwargs)


def load_pretrained_autoencoder(path_or_id: str, *, allow_download: bool = True) -> AutoencoderKL:
    """Load a diffusers ``AutoencoderKL`` from a local directory, else the HF cache or hub.

    A directory may be the VAE itself (``config.json`` + weights) or a whole SD pipeline
    (``vae/`` subfolder). A hub id (``stabilityai/sd-vae-ft-mse``) is read from the local
    Hugging Face cache first and downloaded only when ``allow_download`` is true and the hub
    is not switched off (``HF_HUB_OFFLINE``). Its latent scale is ``vae.config.scaling_factor``.
    """
    local = Path(path_or_id).expanduser()
    if local.exists() or _looks_like_path(path_or_id):
        if local.is_file():
            raise EdgeADError(f"expected a diffusers autoencoder directory, got a file: {local}")
        if not local.is_dir():
            raise EdgeADError(f"autoencoder directory not found: {local}")
        if (local / "config.json").is_file():
            subfolder = None
        elif (local / "vae" / "config.json").is_file():
            subfolder = "vae"
        else:
            raise EdgeADError(f"no diffusers autoencoder (config.json or vae/) in {local}")
        try:
            return _from_pretrained(local, subfolder=subfolder, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise EdgeADError(f"cannot load autoencoder from {local}: {exc}") from exc
    try:
        return _from_pretrained(path_or_id, local_files_only=True)
    except (OSError, ValueError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    if not allow_download or offline:
        raise EdgeADError(
            f"autoencoder {path_or_id!r} is not available offline; download it where there is "
            "internet and pass its local directory"
        )
    try:
        return _from_pretrained(path_or_id)
    except (OSError, ValueError, RuntimeError) as exc:
        raise EdgeADError(
            f"cannot download autoencoder {path_or_id!r} ({type(exc).__name__}); "
            "pass a local directory instead"
        ) from exc


class LatentCodec(nn.Module):
    """The E/D pair as D3AD uses it: deterministic, scaled latents in, clamped images out.

    ``encode`` returns the posterior *mean* times the scaling factor, not a sample. Anomaly
    scores compare z0 = E(x) with its reconstruction ẑ0 and build the severity of each frame
    on top of it; sampling would add noise of the posterior's std to every pixel of l_map and
    make the same frame score differently on each call. The scale makes the latents roughly
    unit-variance, which the noise schedule (and ε-prediction) assumes.
    """

    def __init__(self, vae: AutoencoderKL, scaling_factor: float | None = None) -> None:
        """Wrap ``vae``; ``scaling_factor`` defaults to ``vae.config.scaling_factor``."""
        super().__init__()
        self.vae = vae
        factor = vae.config.scaling_factor if scaling_factor is None else scaling_factor
        self.scaling_factor = float(factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.downsample_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> z0 (N, C, H/f, W/f), deterministic."""
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ConfigError(
                f"image size {tuple(x.shape[-2:])} is not a multiple of the autoencoder's {f}"
            )
        mean = self.vae.encode(x).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (clamped: decoders overshoot slightly)."""
        x = self.vae.decode(z / self.scaling_factor + self.shift_factor).sample
        return x.clamp(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Round trip D(E(x)); what the autoencoder alone can reproduce."""
        return self.decode(self.encode(x))


PerceptualLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def autoencoder_loss(
    vae: AutoencoderKL,
    x: torch.Tensor,
    kl_weight: float = 1e-6,
    generator: torch.Generator | None = None,
    perceptual: PerceptualLoss | None = None,
    perceptual_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of the KL autoencoder: mean L1 + ``perceptual_weight`` · perceptual + KL.

    The decoder sees a posterior *sample* during training so it learns to decode slightly
    perturbed latents, which is what the diffusion model will hand it as ẑ0. KL is summed per
    image and averaged over the batch (``posterior.kl().mean()``). Its job is only to keep the
    latent scale bounded; LDM sums the L1 over pixels, so the same 1e-6 weighs KL less there
    than against the per-pixel mean here, yet KL stays a small part of the loss (< 1 % after
    20 steps at 64 px). Raise ``kl_weight`` if latents drift to large norms.

    ``perceptual(recon, x)`` is a feature-space distance (LDM trains its autoencoders with
    LPIPS for the same reason): an L1-only decoder averages fine texture away, and that blur is
    exactly what D3AD's feature map then sees on every normal frame.
    """
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    rec = F.l1_loss(recon, x)
    kl = posterior.kl().mean()
    loss = rec + kl_weight * kl
    parts = {"rec": float(rec.detach()), "kl": float(kl.detach())}
    if perceptual is not None and perceptual_weight > 0:
        perc = perceptual(recon, x)
        loss = loss + perceptual_weight * perc
        parts["perceptual"] = float(perc.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


@torch.no_grad()
def estimate_scaling_factor(
    vae: AutoencoderKL,
    images: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 16,
) -> float:
    """Set and return ``1 / std`` of the training latents (posterior means), as LDM does.

    ``images`` is one tensor in [-1, 1] (split into ``batch_size`` chunks) or an iterable of
    such batches.

    The DDPM schedule assumes unit-variance data: with a smaller latent std, noise would
    swamp the signal at every T̂ and the severity-dependent start points would lose meaning.
    The value is stored with ``vae.register_to_config`` so it is saved with the autoencoder.
    """
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    was_training = vae.training
    vae.eval()
    try:
        latents = [
            vae.encode(b.to(vae.device, vae.dtype)).latent_dist.mean.float().flatten()
            for b in batches
        ]
    finally:
        vae.train(was_training)
    if not latents:
        raise EdgeADError("no images to estimate the latent scaling factor from")
    std = float(torch.cat(latents).std())
    if not std > 0:  # also catches NaN
        raise EdgeADError("latents have zero or undefined spread; is the autoencoder trained?")
    factor = 1.0 / std
    vae.register_to_config(scaling_factor=factor)
    return factor
