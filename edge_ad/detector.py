"""What every edge-ad detector is: the interface ``eval``, ``infer``, bundles, Ray Train and Serve
rely on, and the latent-diffusion parts the three methods share.

A detector is a plain ``nn.Module`` for one product (:class:`Detector`):

* ``fit(train_images, val_images, observer, index_images)`` trains it on normal uint8 images
  (N, 3, H, W) and calibrates its threshold on normals it did not learn from (never on test
  images): the held-out validation images and, where the method keeps a patch memory, training
  images scored leave-one-image-out against it;
* ``predict(x)`` → :class:`Prediction` (scores, maps, is_anomalous, ...) for a batch;
* ``weight_parts()`` (learned modules → safetensors) and ``state_tensors()`` /
  ``load_state_tensors()`` (fitted statistics) are what a bundle stores, so
  ``edge_ad.bundle`` saves and rebuilds any method the same way.

:class:`Detector` holds what every method has: settings, the feature backbone φ where the method
reads one, the optional patch memory (:mod:`edge_ad.patch_memory`, PatchCore's idea; the
``knn`` method is that memory alone) and the threshold. :class:`LatentDiffusionDetector` adds
what D3AD, DiffusionAD and RAN ("Removing Anomalies as Noises") have in common here: a KL
autoencoder E/D trained per product and an ε-prediction UNet on its latents (the β schedule of
D3AD). These two stages train data-parallel under Ray Train (pipelines/train.py); each method
then adds its own stages through three hooks run once on rank 0 — ``fit_head`` (weights:
D3AD's domain adaptation, DiffusionAD's segmentation network), ``fit_index`` (fitted state:
the patch memory, D3AD's pooled KNN, RAN's PaDiM Gaussian) and ``calibrate`` — and its own
``score_batch``. Methods are looked up by name in :mod:`edge_ad.methods`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel
from torch import nn

from edge_ad.config import Settings
from edge_ad.d3ad.observer import FitObserver
from edge_ad.d3ad.reconstruct import alphas_cumprod
from edge_ad.d3ad.trainer import LoopControl, to_model_range, train_autoencoder, train_unet
from edge_ad.errors import EdgeADError
from edge_ad.models.autoencoder import (
    LatentCodec,
    build_autoencoder,
    estimate_scaling_factor,
    load_pretrained_autoencoder,
)
from edge_ad.models.backbone import FeatureBackbone, frozen_copy
from edge_ad.models.feature_codec import FeatureCodec
from edge_ad.models.unet import build_unet, make_noise_scheduler
from edge_ad.patch_memory import PatchMemory, embed_images, matmul_dtype, patch_embedding


class Prediction(NamedTuple):
    """What a detector says about a batch of N frames (all tensors on the CPU)."""

    scores: torch.Tensor  # (N,) float: image score (reduction of the map, per method)
    maps: torch.Tensor  # (N, H, W) float: the anomaly map (same scale as the threshold)
    timesteps: torch.Tensor  # (N,) int64: diffusion timestep the frame was reconstructed from
    distances: torch.Tensor  # (N,) float64: D3AD's severity distance (NaN for others)
    is_anomalous: torch.Tensor  # (N,) bool: score ≥ threshold
    reconstructions: torch.Tensor | None  # (N, 3, H, W) in [-1, 1] when asked for (and made)

    @staticmethod
    def concat(parts: list[Prediction]) -> Prediction:
        recon = [p.reconstructions for p in parts]
        return Prediction(
            *(torch.cat([getattr(p, f) for p in parts]) for f in Prediction._fields[:5]),
            reconstructions=torch.cat(recon) if all(r is not None for r in recon) else None,
        )


class Scored(NamedTuple):
    """One method's answer for a batch, before the threshold is applied (on any device)."""

    scores: torch.Tensor  # (N,)
    maps: torch.Tensor  # (N, H, W)
    timesteps: torch.Tensor | np.ndarray  # (N,)
    # (N, 3, H, W) in [-1, 1]; None for a method without one, or where it was not decoded
    x_hat: torch.Tensor | None
    distances: torch.Tensor | np.ndarray | None = None  # (N,) or None


def add_prefix(prefix: str, values: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{"k": v, ...}`` → ``{"prefix.k": tensor(v)}``, the flat form :func:`strip_prefix`
    undoes (numpy arrays become tensors, tensors stay as they are)."""
    return {
        f"{prefix}.{k}": v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))
        for k, v in values.items()
    }


def strip_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"severity.k": v, ...}`` → ``{"k": v}`` for the keys under ``prefix.`` (weights and
    fitted state are stored flat, one prefix per part)."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def finite_or_none(value: float) -> float | None:
    """A per-frame number for JSON (verdicts, infer files): None where the method has none
    (NaN), since JSON has no NaN."""
    value = float(value)
    return value if math.isfinite(value) else None


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgeADError("runtime.device=cuda but no GPU is visible; use --set runtime.device=cpu")
    return torch.device(name)


class StageTimer:
    """Adds wall time per stage into a dict (synchronising CUDA so the numbers are real)."""

    def __init__(self, sink: dict[str, float] | None, device: torch.device) -> None:
        self.sink, self.device = sink, device

    def __call__(self, stage: str) -> StageTimer:
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


def validation_threshold(scores: np.ndarray, quantile: float) -> float:
    """The decision threshold: a quantile of NORMAL calibration scores (held-out validation
    images, plus training images scored leave-one-image-out where the method has a memory)."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), quantile))


def leave_out_ids(n_images: int, count: int) -> np.ndarray:
    """Which of the memory's ``n_images`` training images calibration scores leave-one-out:
    ``count`` of them, evenly spread (deterministic), none when the memory holds one image."""
    if n_images < 2 or count <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n_images - 1, min(count, n_images)).round().astype(np.int64))


class Detector(nn.Module):
    """What every method is: settings, the backbone φ (if it reads one), the patch memory (if it
    keeps one), the threshold, and the fit/predict/bundle machinery around a ``score_batch``."""

    #: The method's name in settings, bundles, MLflow and the CLI.
    method: ClassVar[str] = ""
    #: Pipeline stages ``predict(timings=...)`` reports, in order (benchmarks print them).
    STAGES: ClassVar[tuple[str, ...]] = ()
    #: Whether the method has the autoencoder and UNet stages (Ray Train runs them
    #: data-parallel and checkpoints them per epoch).
    generative: ClassVar[bool] = False

    def __init__(
        self, settings: Settings, backbone: FeatureBackbone | None, threshold: float = math.nan
    ) -> None:
        super().__init__()
        if settings.method != self.method:
            raise EdgeADError(f"settings are for method {settings.method!r}, not {self.method!r}")
        self.settings = settings
        self.backbone = backbone
        self.threshold = float(threshold)
        self.memory: PatchMemory | None = None
        # Empty, but it moves with .to(): the device the detector runs on.
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)
        self.uses_memory = self.wants_memory(settings)
        if self.uses_memory:
            layers = list(backbone.layers) if backbone is not None else []
            missing = [j for j in settings.memory.layers if j not in layers]
            if missing:
                raise EdgeADError(f"memory layers {missing} are not among the backbone's {layers}")
            self._memory_pos = [layers.index(j) for j in settings.memory.layers]

    # ------------------------------------------------------------------ construction

    @classmethod
    def wants_memory(cls, settings: Settings) -> bool:
        """Whether the method, with these settings, keeps a patch memory."""
        return False

    @classmethod
    def backbone_layers(cls, settings: Settings) -> list[int]:
        """The φ blocks the method reads ([] = no backbone)."""
        return sorted(settings.memory.layers) if cls.wants_memory(settings) else []

    @classmethod
    def make_backbone(cls, settings: Settings) -> FeatureBackbone | None:
        layers = cls.backbone_layers(settings)
        b = settings.backbone
        return FeatureBackbone(b.name, layers, b.weights) if layers else None

    @classmethod
    def build(cls, settings: Settings) -> Detector:
        """Fresh, untrained parts as the settings describe (pretrained weights where asked)."""
        return cls(settings, cls.make_backbone(settings))

    @classmethod
    def from_meta(
        cls, settings: Settings, meta: dict[str, Any], backbone: FeatureBackbone | None
    ) -> Detector:
        """The untrained shell a bundle's ``bundle.json`` describes (weights load after)."""
        return cls(settings, backbone, threshold=float(meta["threshold"]))

    def extra_meta(self) -> dict[str, Any]:
        """What ``bundle.json`` (and a checkpoint's progress) must hold to rebuild the parts."""
        return {}

    def restore_meta(self, meta: dict[str, Any]) -> None:
        """Inverse of :meth:`extra_meta` for the values that are not architecture."""

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    @property
    def is_fitted(self) -> bool:
        memory_ready = self.memory is not None or not self.uses_memory
        return math.isfinite(self.threshold) and memory_ready and self._state_fitted()

    def _state_fitted(self) -> bool:
        """Whether the method's own fitted state (index, statistics) is in place."""
        return True

    # ------------------------------------------------------------------ what a bundle holds

    def weight_parts(self) -> dict[str, nn.Module]:
        """Learned modules by the key prefix they have in a weights file."""
        return {"backbone": self.backbone.model} if self.backbone is not None else {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Fitted non-weight state (memory, statistics, indexes) as named CPU tensors."""
        if self.memory is None:
            return {}
        return add_prefix("memory", self.memory.state_tensors())

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors`."""
        if self.uses_memory:
            self.memory = PatchMemory.from_state(strip_prefix("memory", state))

    # ------------------------------------------------------------------ the patch memory

    def memory_embedding(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Patch vectors (N, D, h, w) from the backbone maps the detector already computed."""
        return patch_embedding(
            [feats[i] for i in self._memory_pos], self.settings.memory.neighbourhood
        )

    def memory_distances(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Each patch's distance to the nearest kept normal patch: (N, h, w) on the CPU."""
        assert self.memory is not None
        return self.memory.distances(self.memory_embedding(feats))

    @torch.no_grad()
    def fit_memory(self, images: torch.Tensor, observer: FitObserver | None = None) -> None:
        """The patch memory over ``images`` (normal uint8 training images: every one outside
        the validation split, even where the networks learned from fewer)."""
        assert self.backbone is not None
        observer = observer or FitObserver()
        m = self.settings.memory
        observer.stage_start("memory", len(images))
        embeddings = embed_images(
            images,
            lambda x: self.memory_embedding(self.backbone(x)),  # type: ignore[misc]
            lambda b: to_model_range(b).to(self.device),
            progress=lambda n: observer.advance("memory", n),
        )
        self.memory = PatchMemory.fit(
            embeddings,
            m.coreset_fraction,
            m.projection_dim,
            self.settings.runtime.seed,
            matmul_dtype(m.matmul),
            m.max_patches,
        )
        observer.stage_end(
            "memory",
            {
                "memory_images": float(len(images)),
                "memory_patches": float(len(self.memory.bank)),
                "coreset_seconds": self.memory.coreset_seconds,
                "coreset_radius": self.memory.radius,
            },
        )

    def leave_out_distances(
        self, index_images: torch.Tensor | None, observer: FitObserver
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, patch distances (n, h, w)) of the training images calibration scores
        leave-one-image-out: each against the memory without its own patches, as a new
        normal frame would be. Empty without a memory or without ``index_images``."""
        size = self.settings.data.image_size
        if self.memory is None or index_images is None or self.backbone is None:
            return torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0)
        ids = leave_out_ids(len(index_images), self.settings.calibration.loo_images)
        dists = []
        for start in range(0, len(ids), 8):
            chunk = ids[start : start + 8]
            x = to_model_range(index_images[torch.from_numpy(chunk)]).to(self.device)
            embedding = self.memory_embedding(self.backbone(x))
            dists.append(self.memory.distances_excluding(embedding, chunk.tolist()))
            observer.advance("calibration", len(chunk))
        if not dists:
            return index_images[:0], torch.zeros(0)
        return index_images[torch.from_numpy(ids)], torch.cat(dists)

    def calibration_count(self, val_images: torch.Tensor, index_images: torch.Tensor | None) -> int:
        """How many images calibration scores (for its progress bar)."""
        extra = 0
        if self.uses_memory and index_images is not None:
            extra = len(leave_out_ids(len(index_images), self.settings.calibration.loo_images))
        return len(val_images) + extra

    # ------------------------------------------------------------------ inference

    def score_batch(
        self,
        x: torch.Tensor,
        timings: dict[str, float] | None = None,
        reconstruction: bool = False,
    ) -> Scored:
        """The method itself: frames x in [-1, 1] (checked, on the device) → scores and maps.

        ``reconstruction``: the caller wants x̂ (``infer``'s panels); a method whose score does
        not need the decoded image may then skip decoding when it is False."""
        raise NotImplementedError

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
        x = self._checked_input(x)
        out = self.score_batch(x, timings, reconstruction=return_reconstruction)
        n = len(x)
        distances = (
            np.full(n, np.nan) if out.distances is None else np.asarray(out.distances, np.float64)
        )
        recon = None
        if return_reconstruction and out.x_hat is not None:
            recon = out.x_hat.float().cpu()
        return Prediction(
            scores=out.scores.float().cpu(),
            maps=out.maps.float().cpu(),
            timesteps=torch.as_tensor(np.asarray(out.timesteps, dtype=np.int64)),
            distances=torch.from_numpy(distances),
            is_anomalous=(out.scores >= self.threshold).cpu(),
            reconstructions=recon,
        )

    forward = predict

    def _checked_input(self, x: torch.Tensor) -> torch.Tensor:
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
        return x.to(self.device).contiguous()

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

    def fit(
        self,
        train_images: torch.Tensor,
        val_images: torch.Tensor,
        observer: FitObserver | None = None,
        index_images: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Train every stage on normal uint8 images (N, 3, H, W); return summary metrics.

        ``train_images`` train the networks; ``index_images`` (default: the same) are what the
        fitted state (patch memory, KNN index) is built from; ``val_images`` (held-out normals)
        only calibrate the map statistics and the threshold. The stages are public so that Ray
        Train (pipelines/train.py) can run the generative ones data-parallel and checkpoint
        them; this method is the single-process order.
        """
        observer = observer or FitObserver()
        index_images = train_images if index_images is None else index_images
        self.prepare_fit(train_images, val_images)
        summary = self.fit_generative(train_images, observer)
        summary |= self.fit_head(train_images, observer)
        self.freeze_trained()  # φ in eval mode from here: BatchNorm must not see batches
        self.fit_index(index_images, observer)
        summary |= self.calibrate(val_images, observer, index_images)
        return summary

    def prepare_fit(self, train_images: torch.Tensor, val_images: torch.Tensor) -> None:
        """Check the inputs, seed, and move to the training device (before any stage)."""
        if len(train_images) < 2:
            raise EdgeADError(f"need at least 2 normal training images, got {len(train_images)}")
        if len(val_images) < 1:
            raise EdgeADError("need at least 1 held-out normal image to calibrate the threshold")
        torch.manual_seed(self.settings.runtime.seed)
        self.to(resolve_device(self.settings.runtime.device))

    def fit_generative(
        self, train_images: torch.Tensor, observer: FitObserver | None = None
    ) -> dict[str, float]:
        """Stages 1–2 in one process (methods without generative models have none)."""
        return {}

    def fit_head(
        self, train_images: torch.Tensor, observer: FitObserver | None = None
    ) -> dict[str, float]:
        """Stage 3 (rank 0): the method's own learned part after the generative models."""
        return {}

    def fit_index(self, train_images: torch.Tensor, observer: FitObserver | None = None) -> None:
        """Stage 4 (rank 0): the method's fitted state over the training images (default: the
        patch memory, for methods that keep one)."""
        if self.uses_memory:
            self.fit_memory(train_images, observer)

    def freeze_trained(self) -> None:
        """Eval mode and no gradients for every learned part, after the trained stages (a
        backbone left in train mode would normalise with batch statistics: scores would depend
        on the batch, and fitting an index would move its running statistics)."""
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def calibrate(
        self,
        val_images: torch.Tensor,
        observer: FitObserver | None = None,
        index_images: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Fit the method's map statistics (if any) and the threshold on normal images the
        detector did not learn from: the validation images and, for methods with a memory,
        training images scored leave-one-image-out (``index_images``: the memory's images).
        Methods with statistics override :meth:`calibration_scores`."""
        observer = observer or FitObserver()
        observer.stage_start("calibration", self.calibration_count(val_images, index_images))
        scores = self.calibration_scores(val_images, observer, index_images)
        self.threshold = validation_threshold(scores, self.settings.calibration.quantile)
        summary = {
            "threshold": self.threshold,
            "calibration_images": float(len(scores)),
            "val_score_mean": float(scores.mean()),
            "val_score_max": float(scores.max()),
        }
        summary |= self.calibration_summary()
        observer.stage_end("calibration", summary)
        return summary

    def calibration_summary(self) -> dict[str, float]:
        """What the method chose during calibration, for the train summary and MLflow."""
        return {}

    def calibration_scores(
        self,
        val_images: torch.Tensor,
        observer: FitObserver,
        index_images: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Scores of the validation normals (default: the method's own scores as they are)."""
        scores = []
        for b in val_images.split(8):
            scores.append(self.score_batch(to_model_range(b).to(self.device)).scores.cpu())
            observer.advance("calibration", len(b))
        return torch.cat(scores).double().numpy()


class LatentDiffusionDetector(Detector):
    """Autoencoder E/D + latent ε-UNet (+ backbone φ) and the shared generative stages."""

    generative = True

    def __init__(
        self,
        settings: Settings,
        vae: AutoencoderKL | None,
        unet: UNet2DModel,
        backbone: FeatureBackbone | None,
        threshold: float = math.nan,
    ) -> None:
        """``vae`` is None in the ``features`` latent space: the latent is then the backbone's
        patch features through a fitted :class:`FeatureCodec` (no autoencoder at all)."""
        super().__init__(settings, backbone, threshold)
        self.codec: LatentCodec | FeatureCodec
        if self.feature_latent:
            if backbone is None:
                raise EdgeADError("latent.space=features needs a feature backbone")
            # z0 projects the memory's patch embedding, whether or not a memory is kept.
            layers = list(backbone.layers)
            self._memory_pos = [layers.index(j) for j in settings.memory.layers]
            splits = [backbone.channels[i] for i in self._memory_pos]
            self.codec = FeatureCodec(sum(splits), settings.latent.channels, splits)
        elif vae is None:
            raise EdgeADError("latent.space=vae needs an autoencoder")
        else:
            self.codec = LatentCodec(vae)
        self.unet = unet
        s = settings.unet
        self.register_buffer(
            "alphas_cumprod",
            alphas_cumprod(s.beta_start, s.beta_end, s.num_train_timesteps),
            persistent=False,
        )

    # ------------------------------------------------------------------ construction

    @property
    def feature_latent(self) -> bool:
        """Whether the latent is the backbone's projected features (else an autoencoder's)."""
        return self.settings.latent.space == "features"

    @classmethod
    def build(cls, settings: Settings) -> LatentDiffusionDetector:
        ae = settings.autoencoder
        backbone = cls.make_backbone(settings)
        vae: AutoencoderKL | None = None
        if settings.latent.space == "features":
            assert backbone is not None
            down, channels = _patch_stride(backbone, settings), settings.latent.channels
        else:
            if ae.pretrained:
                vae = load_pretrained_autoencoder(ae.pretrained)
            else:
                vae = build_autoencoder(ae.block_out_channels, ae.layers_per_block)
            down = 2 ** (len(vae.config.block_out_channels) - 1)
            channels = int(vae.config.latent_channels)
        u = settings.unet
        unet = build_unet(
            sample_size=settings.data.image_size // down,
            in_channels=channels,
            block_out_channels=u.block_out_channels,
            layers_per_block=u.layers_per_block,
            attention=u.attention,
        )
        return cls(settings, vae, unet, backbone)

    @classmethod
    def from_meta(
        cls, settings: Settings, meta: dict[str, Any], backbone: FeatureBackbone | None
    ) -> LatentDiffusionDetector:
        vae = None
        if settings.latent.space == "vae":
            vae = AutoencoderKL.from_config(_public_config(meta["vae_config"]))
        unet = UNet2DModel.from_config(_public_config(meta["unet_config"]))
        detector = cls(settings, vae, unet, backbone, threshold=float(meta["threshold"]))
        detector.restore_meta(meta)
        return detector

    def extra_meta(self) -> dict[str, Any]:
        if isinstance(self.codec, FeatureCodec):  # its projection is stored with the weights
            return {"unet_config": dict(self.unet.config)}
        return {
            "scaling_factor": self.codec.scaling_factor,
            "vae_config": dict(self.codec.vae.config),
            "unet_config": dict(self.unet.config),
        }

    def restore_meta(self, meta: dict[str, Any]) -> None:
        if "scaling_factor" in meta and isinstance(self.codec, LatentCodec):
            self.codec.scaling_factor = float(meta["scaling_factor"])

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """(C, h, w) of the latents of H×W frames (default: the settings' image size)."""
        if isinstance(self.codec, FeatureCodec):
            assert self.backbone is not None
            down = _patch_stride(self.backbone, self.settings)
            channels = self.codec.latent_channels
        else:
            vae = self.codec.vae
            down = 2 ** (len(vae.config.block_out_channels) - 1)
            channels = int(vae.config.latent_channels)
        size = self.settings.data.image_size
        h, w = (height or size) // down, (width or size) // down
        return (channels, h, w)

    def fixed_noise(self, *leading: int, offset: int = 0) -> torch.Tensor:
        """Gaussian ε of shape (*leading, 1, C, h, w), the same for every model built with these
        settings: the methods that noise a frame use one fixed draw (broadcast over the batch)
        so a frame's score does not depend on its batch, its replica or the call."""
        g = torch.Generator().manual_seed(self.settings.runtime.seed + offset)
        return torch.randn((*leading, 1, *self.latent_shape()), generator=g)

    def weight_parts(self) -> dict[str, nn.Module]:
        latent: dict[str, nn.Module]
        if isinstance(self.codec, FeatureCodec):  # the fitted projection, as buffers
            latent = {"codec": self.codec}
        else:
            latent = {"vae": self.codec.vae}
        return latent | {"unet": self.unet} | super().weight_parts()

    def encode(
        self,
        x: torch.Tensor,
        feats: list[torch.Tensor] | None = None,
        embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z0 of frames x in [-1, 1]: E(x) scaled, or the projected patch embedding of φ(x).
        A caller that already has φ(x) (``feats``) or its embedding (``embedding``, computed for
        the memory search) passes it, so neither is computed twice."""
        if isinstance(self.codec, LatentCodec):
            return self.codec.encode(x)
        if embedding is None:
            assert self.backbone is not None
            embedding = self.memory_embedding(feats or self.backbone(x))
        return self.codec.encode(embedding)

    def eps(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε_θ(z_t, t) with per-sample timesteps."""
        return self.unet(z_t, t).sample

    # ------------------------------------------------------------------ training

    def fit_generative(
        self, train_images: torch.Tensor, observer: FitObserver | None = None
    ) -> dict[str, float]:
        summary = self.fit_autoencoder(train_images, observer)
        summary |= self.fit_scaling(train_images)
        return summary | self.fit_unet(self.encode_images(train_images), observer)

    def perceptual_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Σ_j GAP(1 − cos(φ⁰_j(x̂), φ⁰_j(x))) with a frozen copy φ⁰ of the (pretrained) backbone:
        the autoencoder learns to keep what the feature maps will compare."""
        from edge_ad.d3ad.adapt import cosine_feature_loss

        if self.backbone is None:
            raise EdgeADError(
                f"autoencoder.perceptual_weight needs a feature backbone; {self.method} has none"
            )
        teacher = frozen_copy(self.backbone)

        def loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                target = self.compared_features(teacher(x))
            return cosine_feature_loss(self.compared_features(teacher(recon)), target)

        return loss

    def compared_features(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The backbone blocks the method compares between x and x̂ (default: all it reads)."""
        return feats

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
        if isinstance(self.codec, FeatureCodec):  # no autoencoder in the features space
            return summary
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

    def freeze_autoencoder(self) -> None:
        """Eval mode, no gradients for E/D (a resumed job past the autoencoder stage)."""
        if isinstance(self.codec, LatentCodec):
            self.codec.vae.eval().requires_grad_(False)

    @torch.no_grad()
    def fit_scaling(self, train_images: torch.Tensor) -> dict[str, float]:
        """The latent's scale: 1/std of the training latents (a trained autoencoder; a
        pretrained one has its own), or the whitened projection of the training features.
        Data-parallel workers call this on *all* train images so they agree on the scale."""
        if isinstance(self.codec, FeatureCodec):
            assert self.backbone is not None
            self.backbone.eval()
            embeddings = (
                self.memory_embedding(self.backbone(to_model_range(b).to(self.device))).cpu()
                for b in train_images.split(16)
            )
            return self.codec.fit(embeddings)
        if self.settings.autoencoder.pretrained is None:
            batches = [to_model_range(b).to(self.device) for b in train_images.split(16)]
            self.codec.scaling_factor = estimate_scaling_factor(self.codec.vae, batches)
        return {}

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents z0 = E(x) of uint8 images, on the CPU."""
        return torch.cat(
            [self.encode(to_model_range(b).to(self.device)).cpu() for b in images.split(16)]
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


def _patch_stride(backbone: FeatureBackbone, settings: Settings) -> int:
    """Down-sampling of the patch grid (the finest memory layer's stride): the ``features``
    latent's h × w."""
    return backbone.strides[list(backbone.layers).index(settings.memory.layers[0])]


def _public_config(config: dict[str, Any]) -> dict[str, Any]:
    # diffusers configs carry bookkeeping keys (_class_name, _diffusers_version, ...).
    return {k: v for k, v in config.items() if not k.startswith("_")}


def top_k_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest values of each map (N, ...) → (N,) (DiffusionAD's image score)."""
    flat = maps.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)
