"""Typed settings for training and running a detector.

One frozen pydantic model per concern, grouped in :class:`Settings`. A run is described by a
profile (``tiny`` for tests, ``cpu`` for a 2-core laptop, ``paper`` for GPUs with the D3AD paper's
settings), then a YAML file, then ``--set section.key=value`` overrides, each layer replacing
only the keys it names. The resolved settings are saved into every bundle and MLflow run, so a
model can always say how it was made.

Example::

    settings = load_settings("cpu", config_file="line3.yaml", overrides=["unet.epochs=40"])
    settings.unet.epochs  # 40
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edge_ad.errors import ConfigError

PROFILES = ("tiny", "cpu", "paper")
METHODS = ("d3ad", "diffusionad", "ran", "knn")


class _Section(BaseModel):
    # Frozen so a resolved config cannot drift after it was logged; extra="forbid" so a typo in
    # a YAML key is an error instead of a silently ignored setting.
    # allow_inf_nan=False: ".nan" and ".inf" are valid YAML floats, and a NaN β or learning
    # rate trains a model whose every score is NaN.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class DataConfig(_Section):
    image_size: int = Field(
        256, ge=32, le=2048, description="Square side images are resized to (px)."
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of normal train images held back to calibrate."
    )
    max_train_images: int | None = Field(
        None, ge=2, description="Use at most this many train images (None = all)."
    )
    seed: int = 0

    @model_validator(mode="after")
    def _multiple_of_32(self) -> DataConfig:
        # The autoencoder downsamples 8x and the latent UNet a further 4x.
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")
        return self


class AutoencoderConfig(_Section):
    pretrained: str | None = Field(
        None, description="Local path or hub id of a KL autoencoder; None = train one per product."
    )
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = 1
    epochs: int = Field(30, ge=0, description="Ignored for a pretrained autoencoder.")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(4.5e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine = 5 % warm-up, then decay to 0 over the run."
    )
    kl_weight: float = Field(1e-6, ge=0)
    crop_size: int | None = Field(
        128, ge=32, description="Train on random crops of this side (None = full frames)."
    )
    perceptual_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the feature-space (frozen φ, cosine) term next to L1 (0 = off).",
    )


class UNetConfig(_Section):
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    attention: bool = True
    epochs: int = Field(100, ge=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    beta_start: float = Field(0.0015, gt=0, lt=1)
    beta_end: float = Field(0.0195, gt=0, lt=1)
    num_train_timesteps: int = Field(1000, ge=10, le=10_000)
    max_train_timestep: int | None = Field(
        None,
        ge=1,
        description="Train on t < this only (None = all T, as the paper). Inference never "
        "goes past T_max, so a CPU budget is better spent on small t.",
    )
    crop_size: int | None = Field(
        None,
        ge=8,
        description="Train on random latent crops of this side (None = whole latents): "
        "several times more steps in the same time, but attention then sees fewer tokens "
        "than at inference.",
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="Keep an EMA of the weights (with warm-up); None = off."
    )
    corruption: Literal["none", "noise", "patches", "jitter"] = Field(
        "none",
        description="Synthetic corruption of training latents the UNet learns to remove (none = "
        "the paper's plain ε objective; noise / patches from other images / jitter inside "
        "random rectangles, the clean latent as the target).",
    )
    corruption_probability: float = Field(
        0.5, ge=0, le=1, description="Share of training latents that get a corruption."
    )
    corruption_area: tuple[float, float] = Field(
        (0.01, 0.1), description="Share of the latent grid one corrupted rectangle covers."
    )
    snr_gamma: float = Field(
        5.0, gt=0, description="Min-SNR-γ loss weighting of the corruption objective."
    )

    @model_validator(mode="after")
    def _area(self) -> UNetConfig:
        low, high = self.corruption_area
        if not 0 < low <= high <= 1:
            raise ValueError(f"corruption_area must satisfy 0 < low ≤ high ≤ 1, got {low}, {high}")
        if self.beta_start >= self.beta_end:
            raise ValueError(
                f"beta_start ({self.beta_start}) must be below beta_end ({self.beta_end})"
            )
        return self


class LatentConfig(_Section):
    """Which latent space D3AD diffuses in."""

    space: Literal["vae", "features"] = Field(
        "vae",
        description="vae = an autoencoder's latents (trained per product, or a pretrained SD "
        "VAE: the paper); features = the frozen backbone's stride-8/16 patch features, "
        "projected by whitened PCA to `channels` (nothing decoded, nothing to train but the "
        "UNet).",
    )
    channels: int = Field(64, ge=1, description="features space: latent channels kept by PCA.")


class BackboneConfig(_Section):
    name: str = "tf_efficientnet_lite2"
    weights: str | None = Field(
        "auto", description="'auto' = offline packaged weights, a file path, or None (random)."
    )
    severity_layer: int = Field(2, description="Feature block used by the severity KNN (DIC).")
    map_layers: tuple[int, ...] = (2, 3)


class SeverityConfig(_Section):
    mode: Literal["patch", "pooled"] = Field(
        "patch",
        description="patch = mean of the top_k patch-memory distances (a small defect on a "
        "large part still counts); pooled = the paper's KNN over layer-2 features pooled to "
        "pool_size×pool_size.",
    )
    top_k: int = Field(10, ge=1, description="patch mode: patches averaged into the severity.")
    k: int = Field(20, ge=1, description="pooled mode: neighbours of the KNN.")
    num_bins: int = Field(10, ge=2)
    t_max: int = Field(80, ge=10)
    min_bin: int = Field(2, ge=1)
    round_to: int = Field(10, ge=1)
    pool_size: int = Field(16, ge=1)


class ReconstructConfig(_Section):
    # 5 (the paper: 10): from a noiseless start at T̂ ≤ 80, five steps reconstruct as well
    # (magnetic tile: 96.7 / 86.5 / 76.7 with 5 or 10) in half the UNet time.
    steps: int = Field(5, ge=1, description="DDIM steps per frame, whatever its T̂.")
    eta: float | None = Field(
        None,
        ge=0,
        description="Guidance temperature η towards z0 (0 = none; None = by latent space: 8, "
        "the paper's, for vae; 0 for features, where guidance pulls the repair back onto the "
        "defect: magnetic tile, reconstruction map alone 88.6 → 94.2 I-AUROC without it).",
    )

    def guidance(self, latent_space: str) -> float:
        """η for a latent space: the setting, or the default of that space."""
        if self.eta is not None:
            return self.eta
        return 0.0 if latent_space == "features" else 8.0


class MapConfig(_Section):
    # auto: a fixed 0.8 was chosen on magnetic tile, where the fused map and the memory alone
    # are within 0.2 points on I- and P-AUROC; where the reconstruction adds nothing the fusion
    # must fall back to the memory rather than trust a number tuned on one product.
    memory_weight: float | Literal["auto"] = Field(
        "auto",
        description="Share of the patch-memory map in the fused map (1 = memory alone, 0 = the "
        "reconstruction terms alone); each term is normalised on held-out normals first. "
        "auto: calibration picks it among memory_weight_choices on synthetic anomalies pasted "
        "into the held-out normals, and keeps 1 (no diffusion at inference) unless a smaller "
        "share scores better by memory_weight_margin.",
    )

    @field_validator("memory_weight", mode="before")
    @classmethod
    def _weight_or_auto(cls, value: Any) -> Any:
        if value == "auto":
            return value
        try:
            weight = float(value)
        except (TypeError, ValueError):
            weight = math.nan
        if not 0.0 <= weight <= 1.0:  # NaN fails too
            raise ValueError(f"expected a number in [0, 1] or 'auto', got {value!r}")
        return weight

    memory_weight_choices: tuple[Annotated[float, Field(gt=0, le=1)], ...] = Field(
        (1.0, 0.9, 0.8, 0.7), min_length=1, description="The shares auto chooses among."
    )
    memory_weight_margin: float = Field(
        0.005,
        ge=0,
        description="auto: how much better (mean of image and pixel AUROC on the synthetic "
        "anomalies, 0–1) a share below 1 must score than the memory alone to be chosen.",
    )
    # 1.0 (the paper: 0.85): beside the memory map, the feature term φ(x) vs φ(x̂) added
    # nothing measurable (magnetic tile, w = 0.8: 96.7 / 86.5 / 76.7 with λ 0.85 or 1) and
    # costs a decode and a second backbone pass per frame (~150 of ~600 ms on 2 cores).
    lam: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Weight of the latent map vs the feature map inside the reconstruction "
        "term (1 = latent only: frames are then decoded only when a picture of x̂ is asked for).",
    )
    feature_reference: Literal["input", "round_trip"] = Field(
        "round_trip",
        description="latent.space=vae: what φ(x̂) is compared with in the feature term: the "
        "frame x (the paper), or its autoencoder round trip D(E(x)), so the decoder's blur "
        "is in both and cancels (one more decode per frame).",
    )
    sigma: float = Field(4.0, ge=0, description="Gaussian smoothing of the final map (px).")


class MemoryConfig(_Section):
    """The patch memory (PatchCore-style): kept normal patches and their nearest-neighbour map."""

    layers: tuple[int, ...] = Field(
        (2, 3), description="Backbone blocks embedded per patch (stride 8 and 16), finest first."
    )
    neighbourhood: int = Field(3, ge=1, description="Each patch averages this × this around it.")
    coreset_fraction: float = Field(
        0.1, gt=0, le=1, description="Share of all training patches kept (greedy k-center)."
    )
    # The cap bounds the search, the largest cost of a frame (exact NN: time ∝ kept patches),
    # whatever the number of good images. Only large sets reach it (10 % of 274 images at
    # 256 px). Magnetic tile, 540 images: 55 296 → 27 648 kept patches halved the search
    # (164 → 81 ms/frame on 2 cores) at 96.6 / 86.4 / 76.8 vs 96.7 / 86.5 / 76.7.
    max_patches: int | None = Field(
        28_000,
        ge=1,
        description="At most this many patches kept, whatever coreset_fraction gives (None = "
        "no cap): bounds the memory search per frame.",
    )
    projection_dim: int | None = Field(
        128, ge=8, description="Random projection the coreset is chosen in (None = full dim)."
    )
    matmul: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Precision of the coreset's distance matmuls (auto = bfloat16 where the "
        "hardware runs it natively: AMX or a GPU).",
    )
    max_images: int | None = Field(
        None,
        ge=2,
        description="Memory from at most this many training images (None = every training "
        "image outside the validation split, even where the networks train on fewer).",
    )


class AdaptConfig(_Section):
    epochs: int = Field(2, ge=0, le=3)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    anchor_weight: float = Field(
        1.0, ge=0, description="Weight of the frozen-teacher anchor (0 = no anchor)."
    )


class CalibrationConfig(_Section):
    quantile: float = Field(
        0.99, gt=0, lt=1, description="Threshold = this quantile of normal calibration scores."
    )
    loo_images: int = Field(
        200,
        ge=0,
        description="Training images scored leave-one-image-out against the patch memory (as a "
        "new normal frame would be) that join the validation normals for the threshold and the "
        "severity bins: a stable threshold even where the validation split holds 5 images.",
    )


class DiffusionADConfig(_Section):
    """DiffusionAD (Zhang et al. 2023): norm-guided one-step reconstruction + segmentation net."""

    t_small: int = Field(200, ge=1, description="t_s: the guided one-step scale.")
    t_big: int = Field(400, ge=2, description="t_b: the scale of the guide x̂_0b (t_s < t_b).")
    guidance_w: float = Field(1.0, ge=0, description="w of Eq. 7 (0 = plain one-step).")
    top_k: int = Field(50, ge=1, description="Image score = mean of the top-k map pixels.")
    seg_channels: int = Field(32, ge=4, description="Width of the segmentation UNet's first level.")
    seg_levels: int = Field(4, ge=2, le=6, description="Resolutions of the segmentation UNet.")
    seg_epochs: int = Field(20, ge=0)
    seg_crop_size: int | None = Field(
        None,
        ge=32,
        description="Train the segmentation net on random crops of this side (None = whole "
        "frames): both networks are fully convolutional, a 128 px crop costs a quarter.",
    )
    seg_batch_size: int = Field(8, ge=1)
    seg_lr: float = Field(1e-3, gt=0)
    anomaly_probability: float = Field(
        0.5, ge=0, le=1, description="Share of training frames given a synthetic anomaly."
    )
    focal_weight: float = Field(5.0, ge=0, description="γ of Eq. 10 (weight of the focal term).")
    focal_gamma: float = Field(4.0, ge=0)
    focal_alpha: float = Field(0.5, gt=0, lt=1)
    sigma: float = Field(0.0, ge=0, description="Gaussian smoothing of the map (paper: none).")

    @model_validator(mode="after")
    def _ordered(self) -> DiffusionADConfig:
        if self.t_small >= self.t_big:
            raise ValueError(f"t_small ({self.t_small}) must be below t_big ({self.t_big})")
        return self


class RANConfig(_Section):
    """RAN, "Removing Anomalies as Noises"."""

    kl_timesteps: tuple[int, ...] = Field(
        (5, 50, 100), description="t of the pixel-level KL scores (each normalised, averaged)."
    )
    kl_samples: int = Field(1, ge=1, description="Noise draws averaged per KL timestep.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KL score vs the feature one.")
    feature_layers: tuple[int, ...] = Field(
        (0, 1, 2, 3), description="Backbone blocks (strides 2–16) of the feature-level score."
    )
    feature_size: int | None = Field(
        None, ge=4, description="Side the features are resized to (None = image_size / 4)."
    )
    padim_dims: int = Field(64, ge=1, description="Random feature dims PaDiM keeps.")
    padim_size: int | None = Field(
        None, ge=2, description="PaDiM grid side (None = image_size / 8)."
    )
    padim_eps: float = Field(0.01, gt=0, description="Σ + eps·I (PaDiM's regularisation).")
    denoise_iterations: int = Field(
        20, ge=0, description="Gradient steps of the reconstruction (0 = x̂ = D(E(x)))."
    )
    denoise_every: int = Field(5, ge=1, description="N_d: a diffusion denoising step every N_d.")
    lr: float = Field(0.02, gt=0, lt=1, description="s: gradient step size (Eq. 13).")
    sigma: float = Field(4.0, ge=0, description="Gaussian smoothing of the final map (px).")


class RuntimeConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(1, ge=1, description="Ray Train data-parallel workers.")
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs each Ray Train worker reserves (None = share the node's)."
    )
    checkpoint_every: int = Field(
        1, ge=1, description="Ray Train checkpoint every N autoencoder/UNet epochs."
    )
    checkpoint_interval_s: float = Field(
        30.0,
        ge=0,
        description="...but at most one per this many seconds (each costs ~2 s), plus one at the "
        "end of every stage; 0 = every N epochs whatever they cost.",
    )
    seed: int = 0


class Settings(_Section):
    profile: str = "cpu"
    method: Literal["d3ad", "diffusionad", "ran", "knn"] = "d3ad"
    data: DataConfig = DataConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    unet: UNetConfig = UNetConfig()
    latent: LatentConfig = LatentConfig()
    backbone: BackboneConfig = BackboneConfig()
    severity: SeverityConfig = SeverityConfig()
    reconstruct: ReconstructConfig = ReconstructConfig()
    anomaly_map: MapConfig = MapConfig()
    memory: MemoryConfig = MemoryConfig()
    adapt: AdaptConfig = AdaptConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    diffusionad: DiffusionADConfig = DiffusionADConfig()
    ran: RANConfig = RANConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        # Checked up front: each of these would otherwise fail (or silently misbehave) only
        # after minutes of training.
        sev, steps = self.severity, self.reconstruct.steps
        if sev.round_to % steps:
            raise ValueError(
                f"severity.round_to ({sev.round_to}) must be a multiple of reconstruct.steps "
                f"({steps}) so every T̂ splits into whole DDIM steps"
            )
        if sev.min_bin > sev.num_bins:
            raise ValueError(f"severity.min_bin ({sev.min_bin}) exceeds num_bins ({sev.num_bins})")
        highest = sev.t_max + sev.round_to  # T̂ rounds to at most t_max + round_to/2
        if highest >= self.unet.num_train_timesteps:
            raise ValueError(
                f"severity.t_max ({sev.t_max}) must stay below unet.num_train_timesteps"
            )
        needed, why = self.trained_timesteps_needed()
        if needed > self.unet.num_train_timesteps:
            raise ValueError(f"{why} must stay below unet.num_train_timesteps")
        trained = self.unet.max_train_timestep
        if trained is not None and trained < needed:
            raise ValueError(
                f"unet.max_train_timestep ({trained}) must be at least {why} ({needed}): the "
                "UNet would be asked about timesteps it never learned"
            )
        if self.latent.space == "features" and self.method in ("diffusionad", "ran"):
            raise ValueError(
                f"latent.space=features is D3AD's; {self.method} diffuses in the autoencoder's "
                "latents (latent.space=vae)"
            )
        seg_crop = self.diffusionad.seg_crop_size
        latent_side = 2 ** (len(self.autoencoder.block_out_channels) - 1) * 2 ** (
            len(self.unet.block_out_channels) - 1
        )
        if seg_crop is not None and (seg_crop % latent_side or seg_crop > self.data.image_size):
            raise ValueError(
                f"diffusionad.seg_crop_size ({seg_crop}) must be a multiple of {latent_side} "
                f"(autoencoder × UNet down-sampling) and at most data.image_size"
            )
        crop, levels = self.unet.crop_size, len(self.unet.block_out_channels) - 1
        if crop is not None and crop % 2**levels:
            raise ValueError(
                f"unet.crop_size ({crop}) must be a multiple of {2**levels}: the UNet halves "
                f"the latent {levels} times"
            )
        return self

    def trained_timesteps_needed(self) -> tuple[int, str]:
        """How many timesteps (t < this) the UNet must have learned for the method, and the
        settings that say so."""
        if self.method == "diffusionad":
            return self.diffusionad.t_big + 1, "diffusionad.t_big + 1"
        if self.method == "ran":
            return max(self.ran.kl_timesteps) + 1, "max(ran.kl_timesteps) + 1"
        sev = self.severity
        return sev.t_max + sev.round_to, "severity.t_max + round_to"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """``{"unet.epochs": 100, ...}``: the shape MLflow params want."""
        return {
            f"{section}.{key}": value
            for section, values in self.to_dict().items()
            if isinstance(values, dict)
            for key, value in values.items()
        } | {"profile": self.profile, "method": self.method}


# Only what differs from the defaults above (the `cpu` profile), each with the reason.
_PROFILE_OVERRIDES: dict[str, dict[str, Any]] = {
    # ≤ 20 min of training per product on 2 CPU cores at 256 px: a narrow autoencoder trained
    # on 128 px crops, 400 training images, and a UNet that only learns the t < 100 that
    # inference uses. No domain adaptation of φ: pulling φ(x) towards φ(x̂) also blurs the
    # patch memory's features (magnetic tile, fused map, one epoch vs none: P-AUROC 85.7 vs
    # 86.6, PRO 74.9 vs 76.4), and skipping it saves ~3.5 min of training.
    "cpu": {
        "data": {"max_train_images": 400},
        # 10 and 17 epochs (were 15 and 25): 17.4 instead of ~26 training minutes on a slow
        # 2-core machine, magnetic tile 96.4 / 86.4 / 76.7 vs 96.6 / 86.4 / 76.8.
        "autoencoder": {"block_out_channels": (16, 32, 64, 64), "epochs": 10, "lr": 1e-3},
        "unet": {"epochs": 17, "lr": 3e-4, "max_train_timestep": 100},
        "adapt": {"epochs": 0},
    },
    # Under a minute on a laptop: tests, CI and the first demo. 64 px frames, small nets; the
    # UNet only learns the t < 100 it is ever asked about (T̂ ≤ T_max = 80).
    "tiny": {
        "data": {"image_size": 64, "max_train_images": 48},
        "autoencoder": {
            "block_out_channels": (16, 32, 32, 32),
            "epochs": 30,
            "crop_size": None,
        },
        "unet": {
            "block_out_channels": (32, 64),
            "attention": False,
            "epochs": 200,
            "max_train_timestep": 100,
        },
        "severity": {"pool_size": 4},
        # As the cpu profile, so the demo behaves like the line: an adapted φ also moves the
        # patch memory's features (generated product, 64 px: I-AUROC 82.2 with one epoch of
        # adaptation, 84.6 without).
        "adapt": {"epochs": 0},
    },
    # The D3AD paper's settings (§A.1): pretrained SD VAE, ResNet-34, 300 UNet epochs, and its
    # own severity (pooled layer-2 KNN) and map (latent + feature terms, no patch memory).
    "paper": {
        "severity": {"mode": "pooled"},
        "anomaly_map": {"memory_weight": 0.0, "lam": 0.85, "feature_reference": "input"},
        "reconstruct": {"steps": 10, "eta": 8.0},
        "autoencoder": {"pretrained": "stabilityai/sd-vae-ft-mse", "epochs": 0},
        "unet": {"block_out_channels": (224, 448, 672, 896), "epochs": 300, "batch_size": 32},
        "backbone": {"name": "resnet34"},
        "adapt": {"epochs": 3},
        "runtime": {"device": "cuda"},
    },
}


# What each method changes in a profile, with the reason. D3AD needs nothing: the profiles are
# its own. The CPU profiles train the UNet on small t only (D3AD never goes past T_max = 80);
# the other methods ask about deeper t, so their UNet learns up to that.
_METHOD_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "diffusionad": {
        # t_b = 400 is the deepest; a small segmentation UNet a few epochs long.
        "tiny": {
            "unet": {"max_train_timestep": 500},
            "diffusionad": {"seg_channels": 8, "seg_levels": 3, "seg_epochs": 4, "top_k": 10},
        },
        # ~0.14 s per 128 px crop on 2 cores (reconstruction + segmentation step): 6 epochs of
        # 400 frames ≈ 6 min, next to the ~15 min of the shared autoencoder and UNet.
        "cpu": {
            "unet": {"max_train_timestep": 500},
            "diffusionad": {"seg_channels": 16, "seg_epochs": 6, "seg_crop_size": 128},
        },
        # The paper's segmentation network: DRAEM's, 64 wide at the top, 6 resolutions.
        "paper": {"diffusionad": {"seg_channels": 64, "seg_levels": 6, "seg_epochs": 100}},
    },
    "ran": {
        # The KL scores look at t ≤ 100; few gradient steps and a small PaDiM on a CPU.
        "tiny": {
            "unet": {"max_train_timestep": 120},
            "ran": {"denoise_iterations": 5, "padim_dims": 16},
        },
        # Each gradient step back-propagates through the decoder and φ at full size (~0.35 s
        # per 256 px frame on 2 cores): 5 steps and one denoising step, ~2 s per frame.
        "cpu": {"unet": {"max_train_timestep": 120}, "ran": {"denoise_iterations": 5}},
        "paper": {},
    },
}


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(item: str) -> dict[str, Any]:
    """``"unet.epochs=40"`` → ``{"unet": {"epochs": 40}}`` (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value (unet.epochs=40)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: {raw!r} is not a valid value") from None
    node: dict[str, Any] = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "settings"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid setting {where}: {first['msg']}{more}"


def load_settings(
    profile: str = "cpu",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    method: str = "d3ad",
) -> Settings:
    """Resolve settings: profile (and what ``method`` changes in it), then YAML file, then
    ``section.key=value`` overrides."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    layers: dict[str, Any] = _deep_merge({"profile": profile}, _PROFILE_OVERRIDES[profile])
    layers = _deep_merge(layers, _METHOD_OVERRIDES.get(method, {}).get(profile, {}))
    layers["method"] = method
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            from_file = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            first_line = str(err).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML: {first_line}") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        layers = _deep_merge(layers, from_file)
    for item in overrides or []:
        layers = _deep_merge(layers, _parse_override(item))
    try:
        return Settings.model_validate(layers)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def settings_from_dict(values: dict[str, Any]) -> Settings:
    """Rebuild settings saved by :meth:`Settings.to_dict` (bundles, MLflow runs)."""
    try:
        return Settings.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None
