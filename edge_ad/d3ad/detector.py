"""The D3AD detector: one product's trained model, from a frame to a score and a heatmap.

``D3AD`` is a plain ``nn.Module`` holding the four learned parts (autoencoder E/D, latent UNet
ε_θ, feature backbone φ) and the fitted state (severity KNN + bins, map statistics, threshold).
``predict`` follows the data flow of DESIGN.md:

    φ(x) once ─▶ DIC: KNN distance → bin → T̂ ─▶ z0 = E(x), ẑ0 = guided DDIM from √ᾱ_T̂·z0,
    x̂ = D(ẑ0) ─▶ A = G_σ * (λ·norm(|z0 − ẑ0|) + (1−λ)·norm(Σ_j 1 − cos(φ_j(x), φ_j(x̂))))
    ─▶ score = max A, anomalous iff score ≥ threshold

Frames of different T̂ share one batch: the UNet takes per-sample timesteps and every frame
takes the same number of DDIM steps, so nothing is split into T̂ groups.

``fit`` trains the stages in order on normal images only: autoencoder, UNet, domain adaptation
of φ, KNN severity index (train split), calibration of the map statistics and threshold
(held-out validation normals: never the test set, unlike the reference code).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel

from edge_ad.config import Settings
from edge_ad.d3ad.adapt import adapt_backbone
from edge_ad.d3ad.anomaly_map import MapNormalizer, feature_distance, latent_distance
from edge_ad.d3ad.observer import FitObserver
from edge_ad.d3ad.reconstruct import reconstruct_latents
from edge_ad.d3ad.severity import SeverityIndex, pool_features, timesteps_for_bins
from edge_ad.d3ad.trainer import to_model_range
from edge_ad.detector import (
    LatentDiffusionDetector,
    Prediction,
    Scored,
    StageTimer,
    add_prefix,
    resolve_device,
    strip_prefix,
)
from edge_ad.errors import EdgeADError
from edge_ad.models.backbone import FeatureBackbone

__all__ = ["D3AD", "STAGES", "Prediction", "resolve_device"]

STAGES = ("features", "severity", "encode", "diffusion", "decode", "map")


class D3AD(LatentDiffusionDetector):
    """D3AD for one product. Build with :meth:`build`, train with :meth:`fit`, then predict."""

    method = "d3ad"
    STAGES = STAGES

    def __init__(
        self,
        settings: Settings,
        vae: AutoencoderKL,
        unet: UNet2DModel,
        backbone: FeatureBackbone | None,
        severity: SeverityIndex | None = None,
        normalizer: MapNormalizer | None = None,
        threshold: float = math.nan,
    ) -> None:
        super().__init__(settings, vae, unet, backbone, threshold)
        if backbone is None:
            raise EdgeADError("D3AD needs a feature backbone")
        self.severity = severity or SeverityIndex()
        self.normalizer = normalizer or MapNormalizer()
        layers = list(backbone.layers)
        if settings.backbone.severity_layer not in layers:
            raise EdgeADError(f"severity layer {settings.backbone.severity_layer} not in {layers}")
        self._severity_pos = layers.index(settings.backbone.severity_layer)
        self._map_pos = [layers.index(j) for j in settings.backbone.map_layers]

    @classmethod
    def backbone_layers(cls, settings: Settings) -> list[int]:
        b = settings.backbone
        return sorted({b.severity_layer, *b.map_layers})

    def _state_fitted(self) -> bool:
        return self.severity.bin_edges is not None and self.normalizer.fitted

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return add_prefix("severity", self.severity.state_dict()) | add_prefix(
            "normalizer", self.normalizer.to_arrays()
        )

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        severity = strip_prefix("severity", state)
        self.severity = SeverityIndex.from_state({k: v.numpy() for k, v in severity.items()})
        self.normalizer = MapNormalizer.from_arrays(strip_prefix("normalizer", state))

    def compared_features(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [feats[i] for i in self._map_pos]

    def timestep_choices(self) -> list[int]:
        """Every T̂ DIC can choose (one per bin ≥ the minimum bin)."""
        s = self.settings.severity
        bins = np.arange(s.min_bin, s.num_bins + 1)
        return sorted(
            {int(t) for t in timesteps_for_bins(bins, s.num_bins, s.t_max, s.min_bin, s.round_to)}
        )

    # ------------------------------------------------------------------ inference pieces

    def reconstruct(
        self, x: torch.Tensor, t_hat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x in [-1, 1] and per-image T̂ → (z0, ẑ0, x̂)."""
        z0 = self.codec.encode(x)
        z_hat = self.denoise(z0, t_hat)
        return z0, z_hat, self.codec.decode(z_hat)

    def denoise(self, z0: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
        """ẑ0: the guided DDIM steps from √ᾱ_T̂·z0, per-sample T̂."""
        r = self.settings.reconstruct
        return reconstruct_latents(self.eps, z0, t_hat, self.alphas_cumprod, r.steps, r.eta)

    def severity_vectors(self, feats: list[torch.Tensor]) -> np.ndarray:
        return pool_features(feats[self._severity_pos], self.settings.severity.pool_size)

    def choose_timesteps(self, feats: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """DIC for a batch: (mean KNN distances ȳ0, T̂) from the frames' features."""
        s = self.settings.severity
        distances = self.severity.mean_knn_distance(self.severity_vectors(feats))
        bins = self.severity.bin_of(distances)
        return distances, timesteps_for_bins(bins, s.num_bins, s.t_max, s.min_bin, s.round_to)

    def raw_maps(
        self, x: torch.Tensor, timings: dict[str, float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, torch.Tensor]:
        """(l_map, f_map, distances, T̂, x̂) before normalisation, for x in [-1, 1]."""
        assert self.backbone is not None
        timer = StageTimer(timings, self.device)
        size = tuple(x.shape[-2:])
        with timer("features"):
            feats = self.backbone(x)
        with timer("severity"):
            distances, t_hat = self.choose_timesteps(feats)
        with timer("encode"):
            z0 = self.codec.encode(x)
        with timer("diffusion"):
            z_hat = self.denoise(z0, torch.from_numpy(t_hat))
        with timer("decode"):
            x_hat = self.codec.decode(z_hat)
        with timer("map"):
            feats_hat = self.backbone(x_hat)
            l_map = latent_distance(z0, z_hat, size)
            f_map = feature_distance(
                self.compared_features(feats), self.compared_features(feats_hat), size
            )
        return l_map, f_map, distances, t_hat, x_hat

    def score_batch(self, x: torch.Tensor, timings: dict[str, float] | None = None) -> Scored:
        l_map, f_map, distances, t_hat, x_hat = self.raw_maps(x, timings)
        with StageTimer(timings, self.device)("map"):
            m = self.settings.anomaly_map
            amap = self.normalizer.combine(l_map, f_map, m.lam, m.sigma)[:, 0]
            scores = amap.flatten(1).amax(dim=1)
        return Scored(scores, amap, t_hat, x_hat, distances)

    # ------------------------------------------------------------------ training

    def fit_head(
        self, train_images: torch.Tensor, observer: FitObserver | None = None
    ) -> dict[str, float]:
        """Stage 3: domain adaptation of φ on (x, x̂) pairs of normal images."""
        assert self.backbone is not None
        cfg = self.settings
        summary: dict[str, float] = {}
        if cfg.adapt.epochs > 0:
            self.backbone.requires_grad_(True)
            summary = adapt_backbone(
                self.backbone,
                train_images,
                lambda x, t: self.reconstruct(x, t)[2],
                self.timestep_choices(),
                cfg.adapt,
                self.device,
                observer,
                cfg.runtime.seed,
            )
        self.backbone.eval().requires_grad_(False)
        return summary

    @torch.no_grad()
    def fit_index(self, train_images: torch.Tensor, observer: FitObserver | None = None) -> None:
        """Stage 4, DIC: KNN index and bins over the training features (adapted φ)."""
        assert self.backbone is not None
        observer = observer or FitObserver()
        observer.stage_start("knn", len(train_images))
        vectors = []
        for b in train_images.split(16):
            vectors.append(self.severity_vectors(self.backbone(to_model_range(b).to(self.device))))
            observer.advance("knn", len(b))
        s = self.settings.severity
        self.severity.fit(np.concatenate(vectors), k=s.k, num_bins=s.num_bins)
        observer.stage_end("knn", {"knn_k": float(self.severity.k)})

    def calibration_scores(self, val_images: torch.Tensor, observer: FitObserver) -> np.ndarray:
        """Fit the map normalisation on the raw maps of the validation normals, then score them
        with it (one reconstruction per image for both)."""
        l_maps, f_maps = [], []
        for b in val_images.split(8):
            l_map, f_map, *_ = self.raw_maps(to_model_range(b).to(self.device))
            l_maps.append(l_map.cpu())
            f_maps.append(f_map.cpu())
            observer.advance("calibration", len(b))
        self.normalizer.fit(l_maps, f_maps)
        m = self.settings.anomaly_map
        return torch.cat(
            [
                self.normalizer.combine(lm, fm, m.lam, m.sigma).flatten(1).amax(dim=1)
                for lm, fm in zip(l_maps, f_maps, strict=True)
            ]
        ).numpy()
