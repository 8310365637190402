"""The DiffusionAD detector (Zhang et al. 2023) on the shared latent-diffusion parts.

    z0 = E(x) ─▶ ẑ0 = norm-guided one step (t_s = 200 guided by t_b = 400; ONE ε_θ call of 2N)
    ─▶ x̂ = D(ẑ0) ─▶ M̂ = sigmoid(S(cat(x, x̂))) ─▶ score = mean of the top-k pixels of M̂

Two UNet evaluations per frame instead of D3AD's ten, no feature backbone and no KNN: the fast
method. Training: the autoencoder and the UNet as for every method (data-parallel under Ray
Train; the UNet learns t < t_b + margin, not D3AD's t < 100), then the segmentation network on
frames half of which carry a synthetic anomaly (edge_ad.data.anomaly_synthesis), with the
UNet frozen.

Departures from the paper, each for a reason:

* latent, not pixel, diffusion: the UNet and its Ray Train stage are shared with D3AD, and a
  256 px pixel UNet is out of reach of a CPU budget;
* the UNet is trained on normal latents only and then frozen (the paper also lets the mask
  loss flow into it): the stages stay separate, checkpointable and cheap;
* the noise of the two scales is one fixed draw per model (seeded by ``runtime.seed``) at
  inference, so a frame gets the same score in every batch and on every replica;
* the threshold is a quantile of held-out normal scores (the paper reports threshold-free
  metrics only).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch import nn

from edge_ad.config import Settings
from edge_ad.d3ad.observer import FitObserver
from edge_ad.d3ad.trainer import steps_per_epoch, to_model_range
from edge_ad.data.anomaly_synthesis import synthesize_anomaly
from edge_ad.detector import LatentDiffusionDetector, Scored, StageTimer, top_k_mean
from edge_ad.diffusionad.one_step import norm_guided_x0
from edge_ad.diffusionad.segmentation import SegmentationNet, mask_loss
from edge_ad.errors import EdgeADError
from edge_ad.maps import gaussian_blur
from edge_ad.models.backbone import FeatureBackbone

STAGES = ("encode", "diffusion", "decode", "segment")


class DiffusionAD(LatentDiffusionDetector):
    """DiffusionAD for one product: build with :meth:`build`, :meth:`fit`, then predict."""

    method = "diffusionad"
    STAGES = STAGES

    def __init__(
        self,
        settings: Settings,
        vae: AutoencoderKL,
        unet: UNet2DModel,
        backbone: FeatureBackbone | None = None,
        threshold: float = math.nan,
    ) -> None:
        super().__init__(settings, vae, unet, backbone, threshold)
        d = settings.diffusionad
        if settings.data.image_size % 2 ** (d.seg_levels - 1):
            raise EdgeADError(
                f"data.image_size ({settings.data.image_size}) must be divisible by "
                f"2^(diffusionad.seg_levels − 1) = {2 ** (d.seg_levels - 1)}"
            )
        self.seg = SegmentationNet(d.seg_channels, d.seg_levels)
        # One fixed ε per scale (t_s, t_b), broadcast over the batch.
        self.register_buffer("scale_noise", self.fixed_noise(2, offset=7), persistent=False)

    def weight_parts(self) -> dict[str, nn.Module]:
        return super().weight_parts() | {"seg": self.seg}

    # ------------------------------------------------------------------ inference

    def denoise(
        self, z0: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """ẑ0_g of the latents; ``noise`` = (ε_s, ε_b), the model's fixed draw by default."""
        d = self.settings.diffusionad
        eps_s, eps_b = noise if noise is not None else (self.scale_noise[0], self.scale_noise[1])
        return norm_guided_x0(
            self.eps, z0, d.t_small, d.t_big, self.alphas_cumprod, d.guidance_w, eps_s, eps_b
        )

    def reconstruct(
        self, x: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x̂ = D(ẑ0_g) for x in [-1, 1]."""
        return self.codec.decode(self.denoise(self.codec.encode(x), noise))

    def segment(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, 1, H, W) of the segmentation network on cat(x, x̂)."""
        return self.seg(torch.cat([x, x_hat], dim=1))

    def score_batch(
        self,
        x: torch.Tensor,
        timings: dict[str, float] | None = None,
        reconstruction: bool = False,
    ) -> Scored:
        d = self.settings.diffusionad
        timer = StageTimer(timings, self.device)
        with timer("encode"):
            z0 = self.codec.encode(x)
        with timer("diffusion"):
            z_hat = self.denoise(z0)
        with timer("decode"):
            x_hat = self.codec.decode(z_hat)
        with timer("segment"):
            amap = torch.sigmoid(self.segment(x, x_hat))
            if d.sigma > 0:
                amap = gaussian_blur(amap, sigma=d.sigma)
            amap = amap[:, 0]
            scores = top_k_mean(amap, d.top_k)
        t = np.full(len(x), d.t_small, dtype=np.int64)
        return Scored(scores, amap, t, x_hat)

    # ------------------------------------------------------------------ training

    def fit_head(
        self, train_images: torch.Tensor, observer: FitObserver | None = None
    ) -> dict[str, float]:
        """Stage 3: the segmentation network on normal frames, ``anomaly_probability`` of them
        given a synthetic anomaly, against their (frozen-UNet) reconstructions."""
        observer = observer or FitObserver()
        d, seed = self.settings.diffusionad, self.settings.runtime.seed
        rng = np.random.default_rng(seed + 11)
        generator = torch.Generator().manual_seed(seed + 12)
        per_epoch = steps_per_epoch(len(train_images), d.seg_batch_size)
        total = d.seg_epochs * per_epoch
        optimizer = torch.optim.Adam(self.seg.parameters(), lr=d.seg_lr)
        schedule = get_cosine_schedule_with_warmup(optimizer, max(1, total // 20), max(1, total))
        observer.stage_start("segmentation", total)
        start, last = time.perf_counter(), {}
        self.seg.train().requires_grad_(True)
        images_hwc = train_images.permute(0, 2, 3, 1).numpy()
        for epoch in range(d.seg_epochs):
            sums: dict[str, float] = {}
            order = torch.randperm(len(train_images), generator=generator)
            for idx in order.split(d.seg_batch_size):
                x, masks = self._synthetic_batch(images_hwc[idx.numpy()], rng)
                x, masks = self._crop(x, masks, generator)
                x, masks = x.to(self.device), masks.to(self.device)
                with torch.no_grad():
                    x_hat = self.reconstruct(x, self._random_noise(x, generator))
                loss, parts = mask_loss(
                    self.segment(x, x_hat), masks, d.focal_weight, d.focal_alpha, d.focal_gamma
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                observer.advance("segmentation", 1, loss=parts["seg_loss"])
            last = {k: v / per_epoch for k, v in sums.items()}
            observer.epoch_end("segmentation", epoch, last)
        self.seg.eval().requires_grad_(False)
        summary = {**last, "seg_seconds": time.perf_counter() - start}
        observer.stage_end("segmentation", summary)
        return summary

    def _synthetic_batch(
        self, images: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames in [-1, 1] (N, 3, H, W) and their masks (N, 1, H, W); each frame carries a
        synthetic anomaly with probability ``anomaly_probability``."""
        p = self.settings.diffusionad.anomaly_probability
        frames, masks = [], []
        for img in images:
            if rng.random() < p:
                img, mask = synthesize_anomaly(img, rng)
            else:
                mask = np.zeros(img.shape[:2], dtype=np.float32)
            frames.append(img)
            masks.append(mask)
        x = to_model_range(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous())
        return x, torch.from_numpy(np.stack(masks))[:, None]

    def _crop(
        self, x: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same random ``seg_crop_size`` window of frames and masks (no-op for None)."""
        size = self.settings.diffusionad.seg_crop_size
        if size is None or size >= x.shape[-1]:
            return x, masks
        top, left = (
            int(v) for v in torch.randint(0, x.shape[-1] - size + 1, (2,), generator=generator)
        )
        window = (..., slice(top, top + size), slice(left, left + size))
        return x[window], masks[window]

    def _random_noise(
        self, like: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh ε of both scales for the latents of frames ``like`` (training)."""
        shape = (len(like), *self.latent_shape(like.shape[-2], like.shape[-1]))
        return (
            torch.randn(shape, generator=generator).to(self.device),
            torch.randn(shape, generator=generator).to(self.device),
        )
