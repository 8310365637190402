"""Anomaly map and image score from a frame and its reconstruction (paper §4.2, Eq. 9).

    l_map = mean_c |z0 − ẑ0|, upsampled to the image            (:func:`latent_distance`)
    f_map = Σ_j (1 − cos(φ_j(x0), φ_j(x̂0))), each upsampled     (:func:`feature_distance`)
    A_map = G_σ=4 * (λ · norm_l(l_map) + (1 − λ) · norm_f(f_map)),  λ = 0.85 in the paper
    score = max over pixels of A_map                             (:func:`image_score`)

Normalization is the deployable part (:class:`MapNormalizer`). The reference code
(github.com/JustinTebbe/Dynamic-noise-AD, anomaly_map.scale_values_between_zero_and_one)
min-max scales each map type over the *whole test set*, anomalies included: a frame's score
then depends on the other test frames, and a live stream has no test set. Here the statistics
are fitted once on held-out NORMAL validation images and frozen, so a frame's map depends only
on that frame and the fitted state (like anomalib's post-processor buffers).

Choice of statistics: per map type, the mean μ and standard deviation σ of all pixels of the
normal validation maps; norm(m) = (m − μ)/σ. Reasons: it uses every pixel (hundreds of
thousands per image), so it is stable with a handful of validation images, where a min/max
would be set by one extreme pixel; it puts both maps in units of their own normal variability,
so λ weighs two signals of equal noise level (what the reference's [0, 1] scaling aimed at);
and it is affine with a positive scale, so each map's pixel ordering is unchanged and the later
threshold (also taken from normal validation scores) sits on a stable scale.

Upsampling is bilinear with ``align_corners=False`` (half-pixel centres: latent cell i covers
image pixels 8i…8i+7); the reference uses ``align_corners=True``. The Gaussian blur is scipy's
``gaussian_filter(sigma=4, truncate=4, mode="reflect")`` (kernel 33 taps, like the reference's
kornia kernel ``2·int(4σ+0.5)+1``), done as a separable torch convolution so it runs on whole
batches on the GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edge_ad.errors import EdgeADError
from edge_ad.maps import (
    Size,
    gaussian_blur,
    gaussian_kernel1d,
    image_score,
    pooled_mean_std,
    upsample,
)

__all__ = [
    "MapNormalizer",
    "feature_distance",
    "gaussian_blur",
    "gaussian_kernel1d",
    "image_score",
    "latent_distance",
    "pooled_mean_std",
]


def latent_distance(z0: torch.Tensor, z_hat: torch.Tensor, size: Size) -> torch.Tensor:
    """l_map: mean over channels of |z0 − ẑ0| (L1 per latent pixel), upsampled: (N, 1, H, W).

    The paper writes ‖z0 − ẑ0‖₁; the mean (= L1 / C) is what the reference computes and only
    rescales the map, which the normalizer absorbs anyway.
    """
    if z0.shape != z_hat.shape or z0.ndim != 4:
        raise ValueError(f"z0 {tuple(z0.shape)} and ẑ0 {tuple(z_hat.shape)} must match (N,C,h,w)")
    work = torch.promote_types(z0.dtype, torch.float32)
    dist = (z0.to(work) - z_hat.to(work)).abs().mean(dim=1, keepdim=True)
    return upsample(dist, size)


def feature_distance(
    feats_x: Sequence[torch.Tensor], feats_xhat: Sequence[torch.Tensor], size: Size
) -> torch.Tensor:
    """f_map: Σ_j (1 − cos(φ_j(x), φ_j(x̂))) along channels, each layer upsampled: (N, 1, H, W).

    Each term lies in [0, 2]: 0 where the features agree in direction, 2 where they oppose.
    """
    if len(feats_x) != len(feats_xhat) or not feats_x:
        raise ValueError("feats_x and feats_xhat must be equally long, non-empty lists")
    total: torch.Tensor | None = None
    for fx, fxh in zip(feats_x, feats_xhat, strict=True):
        if fx.shape != fxh.shape or fx.ndim != 4:
            raise ValueError(f"feature shapes differ: {tuple(fx.shape)} vs {tuple(fxh.shape)}")
        work = torch.promote_types(fx.dtype, torch.float32)
        d = 1.0 - F.cosine_similarity(fx.to(work), fxh.to(work), dim=1).unsqueeze(1)
        d = upsample(d, size)
        total = d if total is None else total + d
    assert total is not None
    return total


class MapNormalizer:
    """Frozen per-map-type statistics (μ, σ) from normal validation images; combines maps.

    ``fit`` sees only normal validation maps; ``combine`` uses only the fitted numbers, so the
    transform of a frame never depends on other frames in its batch or stream.
    """

    #: σ below this counts as 0 (constant validation maps); such a map is then only centred.
    MIN_STD = 1e-12

    def __init__(
        self,
        latent_mean: float = 0.0,
        latent_std: float = 1.0,
        feature_mean: float = 0.0,
        feature_std: float = 1.0,
        fitted: bool = False,
    ) -> None:
        self.latent_mean = float(latent_mean)
        self.latent_std = float(latent_std)
        self.feature_mean = float(feature_mean)
        self.feature_std = float(feature_std)
        self.fitted = bool(fitted)

    def fit(
        self,
        latent_maps: torch.Tensor | Sequence[torch.Tensor],
        feature_maps: torch.Tensor | Sequence[torch.Tensor],
    ) -> MapNormalizer:
        """Fit μ, σ of the raw (unblurred) l_map and f_map pixels of NORMAL validation images.

        Each argument is one tensor or a list of batches (any shapes; all pixels are pooled).
        """
        self.latent_mean, latent_std = pooled_mean_std(latent_maps)
        self.feature_mean, feature_std = pooled_mean_std(feature_maps)
        self.latent_std = latent_std if latent_std > self.MIN_STD else 1.0
        self.feature_std = feature_std if feature_std > self.MIN_STD else 1.0
        self.fitted = True
        return self

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise EdgeADError("map normalizer is not fitted; call fit() or from_arrays() first")

    def normalize_latent(self, latent_map: torch.Tensor) -> torch.Tensor:
        """norm_l(l_map) = (l_map − μ_l)/σ_l with the fitted statistics."""
        self._require_fitted()
        return (latent_map - self.latent_mean) / self.latent_std

    def normalize_feature(self, feature_map: torch.Tensor) -> torch.Tensor:
        """norm_f(f_map) = (f_map − μ_f)/σ_f with the fitted statistics."""
        self._require_fitted()
        return (feature_map - self.feature_mean) / self.feature_std

    def combine(
        self,
        latent_map: torch.Tensor,
        feature_map: torch.Tensor,
        lam: float = 0.85,
        sigma: float = 4.0,
    ) -> torch.Tensor:
        """A_map = G_σ * (λ·norm_l(l_map) + (1−λ)·norm_f(f_map)) (Eq. 9, then the σ=4 blur)."""
        if latent_map.shape != feature_map.shape:
            raise ValueError(
                f"latent map {tuple(latent_map.shape)} and feature map "
                f"{tuple(feature_map.shape)} must have the same shape"
            )
        amap = lam * self.normalize_latent(latent_map) + (1.0 - lam) * self.normalize_feature(
            feature_map
        )
        return gaussian_blur(amap, sigma=sigma)

    image_score = staticmethod(image_score)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Fitted state as float64 arrays of shape (1,) (safetensors-friendly)."""
        self._require_fitted()
        return {
            "latent_mean": np.array([self.latent_mean], dtype=np.float64),
            "latent_std": np.array([self.latent_std], dtype=np.float64),
            "feature_mean": np.array([self.feature_mean], dtype=np.float64),
            "feature_std": np.array([self.feature_std], dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> MapNormalizer:
        """Inverse of :meth:`to_arrays` (plain floats or 0-d/1-element arrays/tensors)."""

        def scalar(name: str) -> float:
            try:
                value = arrays[name]
            except KeyError:
                raise EdgeADError(f"map normalizer state is missing {name!r}") from None
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])

        out = cls(
            scalar("latent_mean"),
            scalar("latent_std"),
            scalar("feature_mean"),
            scalar("feature_std"),
            fitted=True,
        )
        if not (out.latent_std > 0 and out.feature_std > 0):
            raise EdgeADError("map normalizer state has a non-positive standard deviation")
        return out
