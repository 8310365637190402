"""The D3AD detector: one product's trained model, from a frame to a score and a heatmap.

``D3AD`` is a plain ``nn.Module`` holding the learned parts (autoencoder E/D, latent UNet ε_θ,
feature backbone φ) and the fitted state (patch memory, severity bins, map statistics,
threshold). ``predict`` follows the data flow:

    φ(x) once ─▶ patch memory: each patch's distance to the nearest normal patch, d(x)
    ─▶ DIC: severity (mean of the top-k patch distances, or the paper's pooled KNN) → bin → T̂
    ─▶ z0 = E(x), ẑ0 = guided DDIM from √ᾱ_T̂·z0, x̂ = D(ẑ0)
    ─▶ A = G_σ * (w·norm_m(d) + (1−w)·(λ·norm_l(|z0 − ẑ0|) + (1−λ)·norm_f(f))),
       f = Σ_j 1 − cos(φ_j(x), φ_j(x̂))   (λ = 1: f, x̂ and φ(x̂) are skipped; x̂ is
       decoded only when the caller asks for the picture)
    ─▶ score = max A, anomalous iff score ≥ threshold

w = ``anomaly_map.memory_weight``; each term is normalised with the statistics of held-out
normal images. ``auto`` (the default) chooses w at calibration on synthetic anomalies pasted
into the held-out normals (:mod:`edge_ad.d3ad.fusion_weight`); at w = 1 the map is the memory's
alone and the encode and diffusion stages are skipped (T̂ is still chosen and reported).
With w = 0 and ``severity.mode=pooled`` this is the paper's D3AD exactly (the ``paper``
profile keeps it reachable).

Two latent spaces (``latent.space``): ``vae`` (above: an autoencoder's latents, the paper's) and
``features``, where z0 is the backbone's stride-8/16 patch features φ(x) projected by a fixed
whitened PCA (:class:`~edge_ad.models.feature_codec.FeatureCodec`): no autoencoder is trained
or run, ``encode`` is one matrix product on features already computed for the memory, the
feature term compares the decoded features of z0 and ẑ0 per layer, and there is no picture
of x̂ (the map is the picture). φ is never adapted there: it *is* the latent space.

Frames of different T̂ share one batch: the UNet takes per-sample timesteps and every frame
takes the same number of DDIM steps, so nothing is split into T̂ groups.

``fit`` trains the stages in order on normal images only: autoencoder (or the feature
projection), UNet, domain adaptation of φ (``vae`` space), the patch memory (and, pooled
mode, the KNN severity index) over every training image,
then calibration on normal images the detector did not learn from: the held-out validation
images (and, for ``memory_weight=auto``, synthetic anomalies pasted into them), plus training
images scored leave-one-image-out against the memory (never the test set, unlike the
reference code).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel

from edge_ad.config import Settings
from edge_ad.d3ad.adapt import adapt_backbone
from edge_ad.d3ad.anomaly_map import MapNormalizer, feature_distance, latent_distance
from edge_ad.d3ad.fusion_weight import (
    WeightChoice,
    choose_memory_weight,
    synthetic_anomalies,
    synthetic_count,
)
from edge_ad.d3ad.observer import FitObserver
from edge_ad.d3ad.reconstruct import reconstruct_latents
from edge_ad.d3ad.severity import (
    SeverityBins,
    SeverityIndex,
    patch_severity,
    pool_features,
    timesteps_for_bins,
)
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
from edge_ad.maps import gaussian_blur, pooled_mean_std, upsample
from edge_ad.models.autoencoder import LatentCodec
from edge_ad.models.backbone import FeatureBackbone
from edge_ad.models.feature_codec import FeatureCodec

__all__ = ["D3AD", "STAGES", "Prediction", "resolve_device"]

STAGES = ("features", "memory", "severity", "encode", "diffusion", "decode", "map")


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
        severity: SeverityIndex | SeverityBins | None = None,
        normalizer: MapNormalizer | None = None,
        threshold: float = math.nan,
    ) -> None:
        super().__init__(settings, vae, unet, backbone, threshold)
        if backbone is None:
            raise EdgeADError("D3AD needs a feature backbone")
        if severity is None:
            severity = SeverityIndex() if settings.severity.mode == "pooled" else SeverityBins()
        self.severity = severity
        self.normalizer = normalizer or MapNormalizer()
        # (μ, σ) of the raw memory map over the validation normals' pixels (NaN: not fitted).
        self.memory_stats = (math.nan, math.nan)
        # memory_weight=auto: the w calibration chose (None: not calibrated yet).
        self.weight_choice: WeightChoice | None = None
        layers = list(backbone.layers)
        if settings.backbone.severity_layer not in layers:
            raise EdgeADError(f"severity layer {settings.backbone.severity_layer} not in {layers}")
        self._severity_pos = layers.index(settings.backbone.severity_layer)
        self._map_pos = [layers.index(j) for j in settings.backbone.map_layers]

    @classmethod
    def wants_memory(cls, settings: Settings) -> bool:
        return settings.severity.mode == "patch" or settings.anomaly_map.memory_weight != 0

    @classmethod
    def backbone_layers(cls, settings: Settings) -> list[int]:
        b = settings.backbone
        latent = settings.memory.layers if settings.latent.space == "features" else ()
        return sorted(
            {b.severity_layer, *b.map_layers, *latent, *super().backbone_layers(settings)}
        )

    @property
    def auto_weight(self) -> bool:
        """Whether calibration chooses w (``memory_weight=auto``)."""
        return self.uses_memory and self.settings.anomaly_map.memory_weight == "auto"

    @property
    def memory_weight(self) -> float:
        """w, the memory map's share in the fused map: the setting, or what calibration chose
        (NaN until then)."""
        if not self.uses_memory:
            return 0.0
        if self.auto_weight:
            return self.weight_choice.weight if self.weight_choice else math.nan
        return float(self.settings.anomaly_map.memory_weight)

    @property
    def _lowest_memory_weight(self) -> float:
        """The smallest w the maps being computed may be fused with: w, or while ``auto`` is
        still to choose, the smallest candidate (calibration needs every term of each)."""
        if self.auto_weight and self.weight_choice is None:
            return min(self.settings.anomaly_map.memory_weight_choices)
        return self.memory_weight

    @property
    def feature_weight(self) -> float:
        """Share of the feature term f in the fused map, (1 − w)(1 − λ): at 0 the score needs
        neither x̂ = D(ẑ0) nor φ(x̂), and frames are not decoded unless x̂ is asked for."""
        return (1.0 - self._lowest_memory_weight) * (1.0 - self.settings.anomaly_map.lam)

    def _state_fitted(self) -> bool:
        memory_ready = not self.memory_weight or math.isfinite(self.memory_stats[0])
        weight_ready = self.weight_choice is not None or not self.auto_weight
        return (
            self.severity.bin_edges is not None
            and self.normalizer.fitted
            and memory_ready
            and weight_ready
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = super().state_tensors()
        state |= add_prefix("severity", self.severity.state_dict())
        state |= add_prefix("normalizer", self.normalizer.to_arrays())
        if self.memory_weight:
            norm = {"stats": np.asarray(self.memory_stats)}
            if self.weight_choice is not None:
                norm["weight"] = np.asarray([self.weight_choice.weight])
            state |= add_prefix("memory_norm", norm)
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(state)
        severity = {k: v.numpy() for k, v in strip_prefix("severity", state).items()}
        if self.settings.severity.mode == "pooled":
            self.severity = SeverityIndex.from_state(severity)
        else:
            self.severity = SeverityBins.from_state(severity)
        self.normalizer = MapNormalizer.from_arrays(strip_prefix("normalizer", state))
        norm = strip_prefix("memory_norm", state)
        if self.auto_weight:
            weight = norm.get("weight")
            if weight is None or weight.numel() != 1 or not 0 < float(weight[0]) <= 1:
                raise EdgeADError("bundle state has no valid chosen memory weight")
            self.weight_choice = WeightChoice(float(weight[0]), {})
        if self.memory_weight:
            stats = norm.get("stats")
            if stats is None or stats.numel() != 2 or not bool(stats[1] > 0):
                raise EdgeADError("bundle state has no valid memory map statistics")
            self.memory_stats = (float(stats[0]), float(stats[1]))

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
        """x in [-1, 1] and per-image T̂ → (z0, ẑ0, x̂) (the ``vae`` latent space)."""
        if not isinstance(self.codec, LatentCodec):
            raise EdgeADError("a reconstructed image exists only in latent.space=vae")
        z0 = self.codec.encode(x)
        z_hat = self.denoise(z0, t_hat)
        return z0, z_hat, self.codec.decode(z_hat)

    def denoise(self, z0: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
        """ẑ0: the guided DDIM steps from √ᾱ_T̂·z0, per-sample T̂."""
        r = self.settings.reconstruct
        eta = r.guidance(self.settings.latent.space)
        return reconstruct_latents(self.eps, z0, t_hat, self.alphas_cumprod, r.steps, eta)

    def severity_vectors(self, feats: list[torch.Tensor]) -> np.ndarray:
        return pool_features(feats[self._severity_pos], self.settings.severity.pool_size)

    def severities(
        self, feats: list[torch.Tensor], memory_distances: torch.Tensor | None
    ) -> np.ndarray:
        """Each frame's severity: the mean of its top-k patch-memory distances (patch mode) or
        the mean L1 distance of its pooled layer-2 vector to its K nearest training vectors
        (pooled mode, the paper's ȳ0)."""
        s = self.settings.severity
        if s.mode == "patch":
            assert memory_distances is not None
            return patch_severity(memory_distances, s.top_k)
        assert isinstance(self.severity, SeverityIndex)
        return self.severity.mean_knn_distance(self.severity_vectors(feats))

    def choose_timesteps(
        self, feats: list[torch.Tensor], memory_distances: torch.Tensor | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """DIC for a batch: (severities, T̂) from the frames' features (and memory distances)."""
        s = self.settings.severity
        distances = self.severities(feats, memory_distances)
        bins = self.severity.bin_of(distances)
        return distances, timesteps_for_bins(bins, s.num_bins, s.t_max, s.min_bin, s.round_to)

    def raw_maps(
        self,
        x: torch.Tensor,
        timings: dict[str, float] | None = None,
        memory_distances: torch.Tensor | None = None,
        reconstruction: bool = False,
    ) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor | None, np.ndarray, np.ndarray, torch.Tensor | None
    ]:
        """(l_map, f_map, m_map, severities, T̂, x̂) before normalisation, for x in [-1, 1].

        ``memory_distances`` (N, h, w) replaces the memory search (calibration passes the
        leave-one-image-out distances of training images); m_map is None without a memory.
        Where the feature term has no weight, f_map is zeros and x̂ is decoded only if
        ``reconstruction`` asks for it (None otherwise): decoding and φ(x̂) are a third of
        the time of a frame. Where the memory has all the weight (w = 1), l_map is zeros too
        and nothing is encoded or diffused unless x̂ is asked for.
        """
        assert self.backbone is not None
        timer = StageTimer(timings, self.device)
        size = tuple(x.shape[-2:])
        with timer("features"):
            feats = self.backbone(x)
        embedding = None  # the patch vectors, kept for a features latent's z0
        with timer("memory"):
            if self.uses_memory and memory_distances is None:
                assert self.memory is not None
                embedding = self.memory_embedding(feats)
                memory_distances = self.memory.distances(embedding)
        with timer("severity"):
            distances, t_hat = self.choose_timesteps(feats, memory_distances)
        x_hat = None
        pixel_space = isinstance(self.codec, LatentCodec)
        if not (reconstruction or self._lowest_memory_weight < 1):
            # The memory alone makes the map: nothing to reconstruct.
            assert memory_distances is not None  # w = 1 implies a memory
            with timer("map"):
                m_map = upsample(memory_distances[:, None].float().to(x.device), size)
                zeros = torch.zeros_like(m_map)
            return zeros, zeros, m_map, distances, t_hat, None
        with timer("encode"):
            z0 = self.encode(x, feats, embedding)
        with timer("diffusion"):
            z_hat = self.denoise(z0, torch.from_numpy(t_hat))
        if pixel_space and (reconstruction or self.feature_weight > 0):
            with timer("decode"):
                x_hat = self.codec.decode(z_hat)
        with timer("map"):
            l_map = latent_distance(z0, z_hat, size)
            if self.feature_weight > 0:
                f_map = self.feature_map(x, feats, z0, z_hat, x_hat)
            else:
                f_map = torch.zeros_like(l_map)
            m_map = None
            if memory_distances is not None:
                m_map = upsample(memory_distances[:, None].float().to(l_map.device), size)
        return l_map, f_map, m_map, distances, t_hat, x_hat

    def feature_map(
        self,
        x: torch.Tensor,
        feats: list[torch.Tensor],
        z0: torch.Tensor,
        z_hat: torch.Tensor,
        x_hat: torch.Tensor | None,
    ) -> torch.Tensor:
        """f_map, Σ_j 1 − cos per layer j between what the frame is and what was rebuilt:

        * ``features`` latent: the decoded features of z0 and of ẑ0 (both through the same
          projection, so only the diffusion's change is measured);
        * ``vae`` latent, ``feature_reference=input`` (the paper): φ(x) vs φ(x̂);
        * ``vae`` latent, ``feature_reference=round_trip``: φ(D(E(x))) vs φ(D(ẑ0)), so the
          autoencoder's own blur, common to both, cancels (one more decode and φ pass).
        """
        assert self.backbone is not None
        size = tuple(x.shape[-2:])
        if isinstance(self.codec, FeatureCodec):
            parts = self.codec.layers(self.codec.decode(z0))
            parts_hat = self.codec.layers(self.codec.decode(z_hat))
            return feature_distance(parts, parts_hat, size)
        assert x_hat is not None
        if self.settings.anomaly_map.feature_reference == "round_trip":
            feats = self.backbone(self.codec.decode(z0))
        return feature_distance(
            self.compared_features(feats), self.compared_features(self.backbone(x_hat)), size
        )

    def combine(
        self,
        l_map: torch.Tensor,
        f_map: torch.Tensor,
        m_map: torch.Tensor | None,
        memory_weight: float | None = None,
    ) -> torch.Tensor:
        """The fused, blurred map (N, H, W) from the raw maps and the fitted statistics, with
        the memory share w (default: the detector's)."""
        m = self.settings.anomaly_map
        w = self.memory_weight if memory_weight is None else memory_weight
        amap = self.normalizer.combine(l_map, f_map, m.lam, sigma=0.0)
        if w:
            assert m_map is not None
            mean, std = self.memory_stats
            amap = w * (m_map - mean) / std + (1.0 - w) * amap
        return gaussian_blur(amap, m.sigma)[:, 0]

    def score_batch(
        self,
        x: torch.Tensor,
        timings: dict[str, float] | None = None,
        reconstruction: bool = False,
    ) -> Scored:
        l_map, f_map, m_map, distances, t_hat, x_hat = self.raw_maps(
            x, timings, reconstruction=reconstruction
        )
        with StageTimer(timings, self.device)("map"):
            amap = self.combine(l_map, f_map, m_map)
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
        # In the features latent φ *is* the latent space: adapting it would move the space the
        # UNet was trained in.
        if cfg.adapt.epochs > 0 and not self.feature_latent:
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
        """Stage 4: the patch memory (every training image) and, in pooled mode, DIC's KNN
        index over the pooled layer-2 features (adapted φ)."""
        assert self.backbone is not None
        observer = observer or FitObserver()
        super().fit_index(train_images, observer)
        if self.settings.severity.mode != "pooled":
            return
        observer.stage_start("knn", len(train_images))
        vectors = []
        for b in train_images.split(16):
            vectors.append(self.severity_vectors(self.backbone(to_model_range(b).to(self.device))))
            observer.advance("knn", len(b))
        s = self.settings.severity
        assert isinstance(self.severity, SeverityIndex)
        self.severity.fit(np.concatenate(vectors), k=s.k, num_bins=s.num_bins)
        observer.stage_end("knn", {"knn_k": float(self.severity.k)})

    def calibration_count(self, val_images: torch.Tensor, index_images: torch.Tensor | None) -> int:
        extra = synthetic_count(len(val_images)) if self.auto_weight else 0
        return super().calibration_count(val_images, index_images) + extra

    def calibration_scores(
        self,
        val_images: torch.Tensor,
        observer: FitObserver,
        index_images: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Calibrate on normal images the detector did not learn from, in order:

        1. memory distances of the validation images, and of training images leave-one-image-
           out (patch mode: the severity bins are fitted over both);
        2. raw maps of the validation images → the statistics each map is normalised with;
        3. ``memory_weight=auto``: raw maps of synthetic anomalies pasted into the validation
           images → the memory share w (:func:`choose_memory_weight`);
        4. fused scores of the validation and leave-one-out images → (caller) the threshold.
        """
        assert self.backbone is not None
        val_batches = list(val_images.split(8))
        val_memory = [self._memory_or_none(b) for b in val_batches]
        loo_images, loo_memory = self.leave_out_distances(index_images, FitObserver())
        if self.settings.severity.mode == "patch":
            assert isinstance(self.severity, SeverityBins)
            normal = [d for d in val_memory if d is not None]
            normal += [loo_memory] if len(loo_memory) else []
            s = self.settings.severity
            self.severity.fit(patch_severity(torch.cat(normal), s.top_k), s.num_bins)

        raw = []
        for b, mem in zip(val_batches, val_memory, strict=True):
            raw.append(self._raw_cpu(b, mem))
            observer.advance("calibration", len(b))
        self.normalizer.fit([r[0] for r in raw], [r[1] for r in raw])
        memory_maps = [r[2] for r in raw if r[2] is not None]
        if memory_maps:
            mean, std = pooled_mean_std(memory_maps)
            self.memory_stats = (mean, std if std > MapNormalizer.MIN_STD else 1.0)
        if self.auto_weight:
            self.weight_choice = self._choose_weight(val_images, raw, observer)

        scores = [self.combine(*r).flatten(1).amax(dim=1) for r in raw]
        for start in range(0, len(loo_images), 8):
            b = to_model_range(loo_images[start : start + 8]).to(self.device)
            maps = self.raw_maps(b, None, loo_memory[start : start + 8])
            scores.append(self.combine(*maps[:3]).flatten(1).amax(dim=1).cpu())
            observer.advance("calibration", len(b))
        return torch.cat(scores).double().numpy()

    def calibration_summary(self) -> dict[str, float]:
        return self.weight_choice.summary() if self.weight_choice is not None else {}

    def _memory_or_none(self, images: torch.Tensor) -> torch.Tensor | None:
        """Memory distances of uint8 images (None without a memory)."""
        if not self.uses_memory:
            return None
        assert self.backbone is not None
        return self.memory_distances(self.backbone(to_model_range(images).to(self.device)))

    def _raw_cpu(
        self, images: torch.Tensor, memory: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(l_map, f_map, m_map) of uint8 images, on the CPU."""
        x = to_model_range(images).to(self.device)
        l_map, f_map, m_map, *_ = self.raw_maps(x, None, memory)
        return l_map.cpu(), f_map.cpu(), None if m_map is None else m_map.cpu()

    def _choose_weight(
        self,
        val_images: torch.Tensor,
        val_raw: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
        observer: FitObserver,
    ) -> WeightChoice:
        """w for ``memory_weight=auto``: each candidate's fused maps of the validation normals
        and of synthetic anomalies pasted into them, scored against the pasted masks."""
        frames, masks = synthetic_anomalies(val_images, self.settings.runtime.seed)
        raw = list(val_raw)
        for b in frames.split(8):
            raw.append(self._raw_cpu(b, self._memory_or_none(b)))
            observer.advance("calibration", len(b))

        def fused(w: float) -> torch.Tensor:
            return torch.cat([self.combine(*r, memory_weight=w) for r in raw])

        m = self.settings.anomaly_map
        return choose_memory_weight(
            fused, len(val_images), masks, m.memory_weight_choices, m.memory_weight_margin
        )
