"""Map arithmetic every method shares: resizing a coarse map to the frame, the Gaussian blur
(scipy's, on whole batches), the image score, and the pooled statistics maps are normalised
with.

The blur is scipy's ``gaussian_filter(sigma, truncate=4, mode="reflect")`` done as a separable
torch convolution, so it runs on whole batches on the GPU; upsampling is bilinear with
``align_corners=False`` (half-pixel centres: a stride-8 cell i covers pixels 8i…8i+7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from edge_ad.errors import EdgeADError

__all__ = [
    "gaussian_blur",
    "gaussian_kernel1d",
    "image_score",
    "pooled_mean_std",
    "upsample",
]

Size = int | tuple[int, int] | Sequence[int]


def _hw(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = (int(s) for s in size)
    return (h, w)


def upsample(m: torch.Tensor, size: Size) -> torch.Tensor:
    """(N, C, h, w) → (N, C, H, W), bilinear, half-pixel centres (identity at the same size)."""
    hw = _hw(size)
    if tuple(m.shape[-2:]) == hw:
        return m
    return F.interpolate(m, size=hw, mode="bilinear", align_corners=False)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy's 1-D Gaussian: radius int(truncate·σ + 0.5), exp(−x²/2σ²) normalized (float64)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return k / k.sum()


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-n axis padded by ``radius`` in scipy "reflect" mode (dcba|abcd|dcba)."""
    i = torch.arange(-radius, n + radius, device=device)
    j = torch.remainder(i, 2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def gaussian_blur(x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) maps; equals scipy.ndimage.gaussian_filter
    (sigma, truncate, mode="reflect") applied to each (H, W) plane. ``sigma <= 0``: identity."""
    if sigma <= 0:
        return x
    if x.ndim != 4:
        raise ValueError(f"maps must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    work = torch.promote_types(x.dtype, torch.float32)
    k = gaussian_kernel1d(sigma, truncate).to(device=x.device, dtype=work)
    r = (k.numel() - 1) // 2
    y = x.to(work).reshape(n * c, 1, h, w)
    y = y.index_select(3, _reflect_index(w, r, x.device))
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = y.index_select(2, _reflect_index(h, r, x.device))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w).to(x.dtype)


def image_score(amap: torch.Tensor) -> torch.Tensor:
    """Image anomaly score = max of the anomaly map over all pixels (and channels): (N,)."""
    return amap.flatten(1).amax(dim=1)


def pooled_mean_std(maps: torch.Tensor | Sequence[torch.Tensor]) -> tuple[float, float]:
    """Mean and standard deviation of all pixels of one map tensor or a list of batches."""
    parts = [maps] if isinstance(maps, torch.Tensor) else list(maps)
    parts = [p.detach().to(torch.float64).reshape(-1) for p in parts]
    count = sum(p.numel() for p in parts)
    if count == 0:
        raise EdgeADError("cannot fit the map normalizer: no validation maps were given")
    if not all(bool(torch.isfinite(p).all()) for p in parts):
        raise EdgeADError("validation anomaly maps contain NaN or infinite values")
    mean = sum(float(p.sum()) for p in parts) / count
    var = sum(float(((p - mean) ** 2).sum()) for p in parts) / count
    return mean, math.sqrt(var)
