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
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel
from torch import nn

from edge_ad.config import Settings
from edge_ad.d3ad.adapt import adapt_backbone, cosine_feature_loss
from edge_ad.d3ad.anomaly_map import MapNormalizer, feature_distance, latent_distance
from edge_ad.d3ad.observer import FitObserver
from edge_ad.d3ad.reconstruct import alphas_cumprod, reconstruct_latents
from edge_ad.d3ad.severity import SeverityIndex, pool_features, timesteps_for_bins
from edge_ad.d3ad.trainer import LoopControl, to_model_range, train_autoencoder, train_unet
from edge_ad.errors import EdgeADError
from edge_ad.models.autoencoder import (
    LatentCodec,
    build_autoencoder,
    estimate_scaling_factor,
    load_pretrained_autoencoder,
)
from edge_ad.models.backbone import FeatureBackbone, frozen_copy
from edge_ad.models.unet import build_unet, make_noise_scheduler

STAGES = ("features", "severity", "encode", "diffusion", "decode", "map")


class Prediction(NamedTuple):
    """What the detector says about a batch of N frames (all tensors on the CPU)."""

    scores: torch.Tensor  # (N,) float: max of the anomaly map
    maps: torch.Tensor  # (N, H, W) float: normalised, smoothed anomaly map
    timesteps: torch.Tensor  # (N,) int64: T̂ chosen by DIC
    distances: torch.Tensor  # (N,) float64: mean KNN distance ȳ0 (severity)
    is_anomalous: torch.Tensor  # (N,) bool: score ≥ threshold
    reconstructions: torch.Tensor | None  # (N, 3, H, W) in [-1, 1] when asked for

    @staticmethod
    def concat(parts: list[Prediction]) -> Prediction:
        recon = [p.reconstructions for p in parts]
        return Prediction(
            *(torch.cat([getattr(p, f) for p in parts]) for f in Prediction._fields[:5]),
            reconstructions=torch.cat(recon) if all(r is not None for r in recon) else None,
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgeADError("runtime.device=cuda but no GPU is visible; use --set runtime.device=cpu")
    return torch.device(name)


class _Timer:
    """Adds wall time per stage into a dict (synchronising CUDA so the numbers are real)."""

    def __init__(self, sink: dict[str, float] | None, device: torch.device) -> None:
        self.sink, self.device = sink, device

    def __call__(self, stage: str) -> _Timer:
        self.stage = stage
        return self

    def __enter__(self) -> None:
        if self.sink is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.sink is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - self.start
            self.sink[self.stage] = self.sink.get(self.stage, 0.0) + elapsed


class D3AD(nn.Module):
    """D3AD for one product. Build with :meth:`build`, train with :meth:`fit`, then predict."""

    def __init__(
        self,
        settings: Settings,
        vae: AutoencoderKL,
        unet: UNet2DModel,
        backbone: FeatureBackbone,
        severity: SeverityIndex | None = None,
        normalizer: MapNormalizer | None = None,
        threshold: float = math.nan,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.codec = LatentCodec(vae)
        self.unet = unet
        self.backbone = backbone
        self.severity = severity or SeverityIndex()
        self.normalizer = normalizer or MapNormalizer()
        self.threshold = float(threshold)
        s = settings.unet
        self.register_buffer(
            "alphas_cumprod",
            alphas_cumprod(s.beta_start, s.beta_end, s.num_train_timesteps),
            persistent=False,
        )
        layers = list(backbone.layers)
        if settings.backbone.severity_layer not in layers:
            raise EdgeADError(f"severity layer {settings.backbone.severity_layer} not in {layers}")
        self._severity_pos = layers.index(settings.backbone.severity_layer)
        self._map_pos = [layers.index(j) for j in settings.backbone.map_layers]

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, settings: Settings) -> D3AD:
        """Fresh, untrained parts as the settings describe (pretrained weights where asked)."""
        ae = settings.autoencoder
        if ae.pretrained:
            vae = load_pretrained_autoencoder(ae.pretrained)
        else:
            vae = build_autoencoder(ae.block_out_channels, ae.layers_per_block)
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        u = settings.unet
        unet = build_unet(
            sample_size=settings.data.image_size // down,
            in_channels=int(vae.config.latent_channels),
            block_out_channels=u.block_out_channels,
            layers_per_block=u.layers_per_block,
            attention=u.attention,
        )
        b = settings.backbone
        layers = sorted({b.severity_layer, *b.map_layers})
        backbone = FeatureBackbone(b.name, layers, b.weights)
        return cls(settings, vae, unet, backbone)

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def is_fitted(self) -> bool:
        return self.severity.bin_edges is not None and self.normalizer.fitted

    def timestep_choices(self) -> list[int]:
        """Every T̂ DIC can choose (one per bin ≥ the minimum bin)."""
        s = self.settings.severity
        bins = np.arange(s.min_bin, s.num_bins + 1)
        return sorted(
            {int(t) for t in timesteps_for_bins(bins, s.num_bins, s.t_max, s.min_bin, s.round_to)}
        )

    # ------------------------------------------------------------------ inference pieces

    def eps(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε_θ(z_t, t) with per-sample timesteps."""
        return self.unet(z_t, t).sample

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
        timer = _Timer(timings, self.device)
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
                [feats[i] for i in self._map_pos], [feats_hat[i] for i in self._map_pos], size
            )
        return l_map, f_map, distances, t_hat, x_hat

    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor,
        return_reconstruction: bool = False,
        timings: dict[str, float] | None = None,
    ) -> Prediction:
        """Score a batch x (N, 3, H, W): float in [-1, 1], or uint8 in [0, 255]."""
        if not self.is_fitted:
            raise EdgeADError("the detector is not trained (fit it or load a bundle)")
        if x.dtype == torch.uint8:
            x = to_model_range(x)
        elif x.numel() and (float(x.min()) < -1.01 or float(x.max()) > 1.01):
            raise EdgeADError("float frames must be in [-1, 1] (or pass uint8 in [0, 255])")
        size = self.settings.data.image_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (size, size):
            raise EdgeADError(
                f"expected frames of shape (N, 3, {size}, {size}), got {tuple(x.shape)}"
            )
        # Contiguous NCHW whatever the caller built (a permuted HWC array takes other conv
        # kernels and moves scores by ~1e-5): the same frame always gets the same score.
        x = x.to(self.device).contiguous()
        l_map, f_map, distances, t_hat, x_hat = self.raw_maps(x, timings)
        with _Timer(timings, self.device)("map"):
            m = self.settings.anomaly_map
            amap = self.normalizer.combine(l_map, f_map, m.lam, m.sigma)[:, 0]
            scores = amap.flatten(1).amax(dim=1)
        return Prediction(
            scores=scores.float().cpu(),
            maps=amap.float().cpu(),
            timesteps=torch.from_numpy(np.asarray(t_hat, dtype=np.int64)),
            distances=torch.from_numpy(np.asarray(distances, dtype=np.float64)),
            is_anomalous=(scores >= self.threshold).cpu(),
            reconstructions=x_hat.float().cpu() if return_reconstruction else None,
        )

    forward = predict

    @torch.no_grad()
    def predict_many(
        self,
        images: torch.Tensor,
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
        timings: dict[str, float] | None = None,
    ) -> Prediction:
        """``predict`` over uint8 images (N, 3, H, W) in batches."""
        parts = []
        for start in range(0, len(images), batch_size):
            parts.append(self.predict(images[start : start + batch_size], timings=timings))
            if progress:
                progress(min(start + batch_size, len(images)), len(images))
        return Prediction.concat(parts)

    # ------------------------------------------------------------------ training

    def perceptual_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Σ_j GAP(1 − cos(φ⁰_j(x̂), φ⁰_j(x))) with a frozen copy φ⁰ of the (pretrained) map
        layers: the autoencoder learns to keep what the feature map will compare."""
        teacher = frozen_copy(self.backbone)
        pos = self._map_pos

        def loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                target = teacher(x)
            feats = teacher(recon)
            return cosine_feature_loss([feats[i] for i in pos], [target[i] for i in pos])

        return loss

    def fit(
        self,
        train_images: torch.Tensor,
        val_images: torch.Tensor,
        observer: FitObserver | None = None,
    ) -> dict[str, float]:
        """Train every stage on normal uint8 images (N, 3, H, W); return summary metrics.

        ``train_images`` train the generative models, adapt φ and fill the KNN index;
        ``val_images`` (held-out normals) only calibrate the map statistics and threshold.
        The stages are public so that Ray Train (pipelines/train.py) can run the first two
        data-parallel and checkpoint them; this method is the single-process order.
        """
        observer = observer or FitObserver()
        self.prepare_fit(train_images, val_images)
        summary = self.fit_autoencoder(train_images, observer)
        self.fit_scaling(train_images)
        summary |= self.fit_unet(self.encode_images(train_images), observer)
        summary |= self.fit_adaptation(train_images, observer)
        self.fit_severity(train_images, observer)
        summary |= self.calibrate(val_images, observer)
        return summary

    def prepare_fit(self, train_images: torch.Tensor, val_images: torch.Tensor) -> None:
        """Check the inputs, seed, and move to the training device (before any stage)."""
        if len(train_images) < 2:
            raise EdgeADError(f"need at least 2 normal training images, got {len(train_images)}")
        if len(val_images) < 1:
            raise EdgeADError("need at least 1 held-out normal image to calibrate the threshold")
        torch.manual_seed(self.settings.runtime.seed)
        self.to(resolve_device(self.settings.runtime.device))

    def fit_autoencoder(
        self,
        train_images: torch.Tensor,
        observer: FitObserver | None = None,
        control: LoopControl | None = None,
        seed_offset: int = 0,
    ) -> dict[str, float]:
        """Stage 1: the autoencoder E/D (skipped for a pretrained one: the paper uses SD's VAE
        as is). ``seed_offset`` (the worker rank) gives each worker its own crops."""
        cfg = self.settings
        summary: dict[str, float] = {}
        if cfg.autoencoder.pretrained is None and cfg.autoencoder.epochs > 0:
            summary = train_autoencoder(
                self.codec.vae,
                train_images,
                cfg.autoencoder,
                self.device,
                observer,
                cfg.runtime.seed + seed_offset,
                perceptual=self.perceptual_loss() if cfg.autoencoder.perceptual_weight else None,
                control=control,
            )
        self.codec.vae.eval().requires_grad_(False)
        return summary

    @torch.no_grad()
    def fit_scaling(self, train_images: torch.Tensor) -> None:
        """1/std of the training latents (a trained autoencoder; a pretrained one has its own).
        Data-parallel workers call this on *all* train images so they agree on the scale."""
        if self.settings.autoencoder.pretrained is None:
            batches = [to_model_range(b).to(self.device) for b in train_images.split(16)]
            self.codec.scaling_factor = estimate_scaling_factor(self.codec.vae, batches)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents z0 = E(x) of uint8 images, on the CPU."""
        return torch.cat(
            [self.codec.encode(to_model_range(b).to(self.device)).cpu() for b in images.split(16)]
        )

    def fit_unet(
        self,
        latents: torch.Tensor,
        observer: FitObserver | None = None,
        control: LoopControl | None = None,
        seed_offset: int = 0,
    ) -> dict[str, float]:
        """Stage 2: the latent UNet on z0 = E(x) of the training images."""
        cfg = self.settings
        u = cfg.unet
        scheduler = make_noise_scheduler(u.beta_start, u.beta_end, u.num_train_timesteps)
        summary = train_unet(
            self.unet,
            latents,
            scheduler,
            u,
            self.device,
            observer,
            cfg.runtime.seed + seed_offset,
            control=control,
        )
        self.unet.eval().requires_grad_(False)
        return summary

    def fit_adaptation(
        self, train_images: torch.Tensor, observer: FitObserver | None = None
    ) -> dict[str, float]:
        """Stage 3: domain adaptation of φ on (x, x̂) pairs of normal images."""
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
    def fit_severity(self, train_images: torch.Tensor, observer: FitObserver | None = None) -> None:
        """Stage 4, DIC: KNN index and bins over the training features (adapted φ)."""
        observer = observer or FitObserver()
        observer.stage_start("knn", len(train_images))
        vectors = []
        for b in train_images.split(16):
            vectors.append(self.severity_vectors(self.backbone(to_model_range(b).to(self.device))))
            observer.advance("knn", len(b))
        s = self.settings.severity
        self.severity.fit(np.concatenate(vectors), k=s.k, num_bins=s.num_bins)
        observer.stage_end("knn", {"knn_k": float(self.severity.k)})

    @torch.no_grad()
    def calibrate(
        self, val_images: torch.Tensor, observer: FitObserver | None = None
    ) -> dict[str, float]:
        """Fit map normalisation and threshold on normal validation images only."""
        observer = observer or FitObserver()
        observer.stage_start("calibration", len(val_images))
        l_maps, f_maps = [], []
        for b in val_images.split(8):
            l_map, f_map, *_ = self.raw_maps(to_model_range(b).to(self.device))
            l_maps.append(l_map.cpu())
            f_maps.append(f_map.cpu())
            observer.advance("calibration", len(b))
        self.normalizer.fit(l_maps, f_maps)
        m = self.settings.anomaly_map
        scores = torch.cat(
            [
                self.normalizer.combine(lm, fm, m.lam, m.sigma).flatten(1).amax(dim=1)
                for lm, fm in zip(l_maps, f_maps, strict=True)
            ]
        ).numpy()
        self.threshold = float(np.quantile(scores, self.settings.calibration.quantile))
        summary = {
            "threshold": self.threshold,
            "val_score_mean": float(scores.mean()),
            "val_score_max": float(scores.max()),
        }
        observer.stage_end("calibration", summary)
        return summary
