"""The RAN detector ("Removing Anomalies as Noises") on the shared latent-diffusion parts.

    z0 = E(x) ─▶ pixel-level score: KL(q ‖ p_θ) at t ∈ {5, 50, 100}, each normalised ─▶ mean
           └──▶ ẑ0 = gradient denoising under PaDiM (lr 0.02, a denoising step every 5)
                x̂ = D(ẑ0) ─▶ feature-level score: MSE of φ(x) vs φ(x̂), strides 2–16 at 64²
    A = G_σ * (α·mean_t norm(KL_t) + (1 − α)·norm(MSE_f)),  α = 0.5;  score = max A

The normalisation statistics (mean, std per KL timestep and of the feature score) and the
threshold come from held-out NORMAL validation images. The paper normalises the KL scores only
and adds the raw feature MSE; here the feature score is put on the same z-scale, so α weighs two
signals of equal noise level whatever the backbone's feature magnitudes.

Departures from the paper: latent diffusion (the shared autoencoder and UNet, not a pixel
UNet); no feature-prediction head on the UNet (the feature score compares φ(x) with φ(x̂) of
the reconstruction, as the other methods do); PaDiM uses the same EfficientNet features; the KL
noise is one fixed draw per model so a frame's score does not depend on its batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel

from edge_ad.config import Settings
from edge_ad.d3ad.observer import FitObserver
from edge_ad.d3ad.trainer import to_model_range
from edge_ad.detector import (
    LatentDiffusionDetector,
    Scored,
    StageTimer,
    add_prefix,
    strip_prefix,
)
from edge_ad.errors import EdgeADError
from edge_ad.maps import gaussian_blur, image_score, pooled_mean_std
from edge_ad.models.backbone import FeatureBackbone
from edge_ad.ran.gradient_denoise import gradient_denoise
from edge_ad.ran.kl_score import kl_map
from edge_ad.ran.padim import PaDiM, grid_features

STAGES = ("encode", "kl", "reconstruct", "decode", "features")


class RAN(LatentDiffusionDetector):
    """RAN for one product: build with :meth:`build`, :meth:`fit`, then predict."""

    method = "ran"
    STAGES = STAGES

    def __init__(
        self,
        settings: Settings,
        vae: AutoencoderKL,
        unet: UNet2DModel,
        backbone: FeatureBackbone | None,
        threshold: float = math.nan,
    ) -> None:
        super().__init__(settings, vae, unet, backbone, threshold)
        if backbone is None:
            raise EdgeADError("RAN needs a feature backbone")
        r, size = settings.ran, settings.data.image_size
        self.feature_size = r.feature_size or size // 4
        self.padim_size = r.padim_size or max(2, size // 8)
        self.padim = PaDiM()
        # (mean, std) of each KL timestep's map, then of the feature map: K + 1 rows.
        self.stats: torch.Tensor | None = None
        # ε per KL timestep and draw, each broadcast over the batch.
        noise = self.fixed_noise(len(r.kl_timesteps), r.kl_samples, offset=5)
        self.register_buffer("kl_noise", noise, persistent=False)

    @classmethod
    def backbone_layers(cls, settings: Settings) -> list[int]:
        return sorted(set(settings.ran.feature_layers))

    def _state_fitted(self) -> bool:
        return self.padim.fitted and self.stats is not None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self._state_fitted():
            return {}
        assert self.stats is not None
        return add_prefix("padim", self.padim.to_tensors()) | {"stats": self.stats}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.padim = PaDiM.from_tensors(strip_prefix("padim", state))
        if "stats" not in state:
            raise EdgeADError("RAN state is missing its normalisation statistics")
        self.stats = state["stats"].double()
        if self.stats.shape != (len(self.settings.ran.kl_timesteps) + 1, 2):
            raise EdgeADError("RAN statistics do not match ran.kl_timesteps")

    # ------------------------------------------------------------------ score pieces

    def kl_maps(self, z0: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
        """One raw KL map (N, 1, H, W) per timestep, averaged over the noise draws."""
        out = []
        for i, t in enumerate(self.settings.ran.kl_timesteps):
            draws = [kl_map(self.eps, z0, t, self.alphas_cumprod, e) for e in self.kl_noise[i]]
            m = torch.stack(draws).mean(0)
            out.append(F.interpolate(m, size=size, mode="bilinear", align_corners=False))
        return out

    def feature_grid(self, x: torch.Tensor, size: int) -> torch.Tensor:
        assert self.backbone is not None
        return grid_features(self.backbone(x), size)

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """PaDiM energy of the decoded latents: Σ_ij Mahalanobis² (N,)."""
        grid = self.feature_grid(self.codec.decode(z), self.padim_size)
        return self.padim.distance(grid).sum(dim=1)

    def reconstruct(self, z0: torch.Tensor) -> torch.Tensor:
        r = self.settings.ran
        return gradient_denoise(
            self.eps,
            self.energy,
            z0,
            self.alphas_cumprod,
            r.denoise_iterations,
            r.denoise_every,
            r.lr,
        )

    def raw_maps(
        self, x: torch.Tensor, timings: dict[str, float] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(KL map per t, feature MSE map, x̂), all (N, 1, H, W) maps, before normalisation."""
        timer = StageTimer(timings, self.device)
        size = (x.shape[-2], x.shape[-1])
        with timer("encode"):
            z0 = self.codec.encode(x)
        with timer("kl"):
            kls = self.kl_maps(z0, size)
        with timer("reconstruct"):
            z_hat = self.reconstruct(z0)
        with timer("decode"):
            x_hat = self.codec.decode(z_hat)
        with timer("features"):
            s = self.feature_size
            diff = self.feature_grid(x, s) - self.feature_grid(x_hat, s)
            f_map = F.interpolate(
                diff.pow(2).mean(dim=1, keepdim=True),
                size=size,
                mode="bilinear",
                align_corners=False,
            )
        return kls, f_map, x_hat

    def combine(self, kls: list[torch.Tensor], f_map: torch.Tensor) -> torch.Tensor:
        """A = G_σ * (α·mean_t norm(KL_t) + (1 − α)·norm(f)) → (N, H, W)."""
        assert self.stats is not None
        stats = self.stats.to(f_map.device)
        r = self.settings.ran
        kl = torch.stack([(m - stats[i, 0]) / stats[i, 1] for i, m in enumerate(kls)]).mean(0)
        f = (f_map - stats[-1, 0]) / stats[-1, 1]
        amap = gaussian_blur((r.alpha * kl + (1.0 - r.alpha) * f).float(), sigma=r.sigma)
        return amap[:, 0]

    def score_batch(
        self,
        x: torch.Tensor,
        timings: dict[str, float] | None = None,
        reconstruction: bool = False,
    ) -> Scored:
        kls, f_map, x_hat = self.raw_maps(x, timings)
        amap = self.combine(kls, f_map)
        t = np.full(len(x), max(self.settings.ran.kl_timesteps), dtype=np.int64)
        return Scored(image_score(amap), amap, t, x_hat)

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def fit_index(self, train_images: torch.Tensor, observer: FitObserver | None = None) -> None:
        """PaDiM's Gaussian per grid position over the training features."""
        assert self.backbone is not None
        observer = observer or FitObserver()
        observer.stage_start("padim", len(train_images))
        r = self.settings.ran
        total = sum(self.backbone.channels)
        index = PaDiM.choose_dims(total, r.padim_dims, self.settings.runtime.seed)

        def grids():
            for b in train_images.split(16):
                yield self.feature_grid(to_model_range(b).to(self.device), self.padim_size).cpu()
                observer.advance("padim", len(b))

        self.padim.fit(grids(), index, r.padim_eps)
        observer.stage_end("padim", {"padim_dims": float(len(index))})

    def calibration_scores(
        self,
        val_images: torch.Tensor,
        observer: FitObserver,
        index_images: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Fit (mean, std) of each raw map on the validation normals, then score them."""
        raw = []
        for b in val_images.split(8):
            kls, f_map, _ = self.raw_maps(to_model_range(b).to(self.device))
            raw.append(([k.cpu() for k in kls], f_map.cpu()))
            observer.advance("calibration", len(b))
        rows = []
        for i in range(len(self.settings.ran.kl_timesteps)):
            rows.append(pooled_mean_std([kls[i] for kls, _ in raw]))
        rows.append(pooled_mean_std([f for _, f in raw]))
        stats = torch.tensor(rows, dtype=torch.float64)
        stats[:, 1] = torch.where(stats[:, 1] > 1e-12, stats[:, 1], torch.ones_like(stats[:, 1]))
        self.stats = stats
        return torch.cat([image_score(self.combine(kls, f)) for kls, f in raw]).double().numpy()
