"""How much the reconstruction term may weigh in D3AD's fused map, chosen per product.

The fused map is A = w·norm(memory) + (1 − w)·norm(reconstruction). Whether the diffusion's
reconstruction term adds anything beside the patch memory depends on the product and on what
the networks learned on it (a blurry autoencoder, a denoiser that copies its input): a fixed w
tuned on one product can cost points on another. With ``anomaly_map.memory_weight=auto``,
calibration measures it instead, the way DRAEM and DiffusionAD train their segmentation
networks: synthetic anomalies (a Perlin-noise mask filled with a foreign texture or the
frame's own shuffled strips) are pasted into the held-out normal images, and each candidate w
is scored by the mean of the image AUROC (held-out normals vs their anomalous copies) and the
pixel AUROC on the pasted masks. A share below 1 is kept only when it beats the memory alone
by a margin; otherwise w = 1, and inference skips the diffusion altogether.

No test image is ever seen: the held-out normals are the same ones the map statistics and the
threshold come from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edge_ad.data.anomaly_synthesis import synthesize_anomaly
from edge_ad.metrics import image_auroc, pixel_auroc

#: Fewer held-out normals than this are cycled (each copy with another mask) so that the
#: AUROCs are not decided by a handful of frames.
MIN_SYNTHETIC = 32
#: The pixel AUROC reads every ``PIXEL_STRIDE``-th row and column: the maps are blurred, and
#: 1/16 of the pixels keeps the choice in seconds on 256 px frames.
PIXEL_STRIDE = 4


@dataclass(frozen=True)
class WeightChoice:
    """The chosen memory share and what every candidate scored (mean of image and pixel
    AUROC on the synthetic anomalies, 0–1)."""

    weight: float
    objective: dict[float, float]

    def summary(self) -> dict[str, float]:
        """Flat metrics for MLflow and the train summary."""
        out = {"memory_weight": self.weight}
        out |= {f"memory_weight_auroc_w{w:g}": v for w, v in self.objective.items()}
        return out


def synthetic_count(normal_count: int) -> int:
    """How many synthetic anomalies calibration pastes into ``normal_count`` held-out normals."""
    return max(normal_count, MIN_SYNTHETIC)


def synthetic_anomalies(
    images: torch.Tensor, seed: int, count: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomalous copies uint8 (M, 3, H, W), masks float (M, H, W)) of normal uint8 images,
    M = :func:`synthetic_count` unless ``count`` says; same seed, same anomalies."""
    rng = np.random.default_rng(seed)
    m = count if count is not None else synthetic_count(len(images))
    frames, masks = [], []
    for i in range(m):
        hwc = images[i % len(images)].permute(1, 2, 0).numpy()
        out, mask = synthesize_anomaly(hwc, rng)
        frames.append(torch.from_numpy(out).permute(2, 0, 1))
        masks.append(torch.from_numpy(mask))
    return torch.stack(frames), torch.stack(masks)


def choose_memory_weight(
    fused_maps: Callable[[float], torch.Tensor],
    normal_count: int,
    masks: torch.Tensor,
    candidates: Sequence[float],
    margin: float,
) -> WeightChoice:
    """Pick w among ``candidates``.

    ``fused_maps(w)`` returns the blurred fused maps (N, H, W) of the held-out normals (the
    first ``normal_count``) followed by their synthetic anomalies, whose ``masks`` (M, H, W)
    mark the pasted pixels. The best candidate wins; a tie goes to the larger w, and a w
    below 1 must beat w = 1 by ``margin`` (1 is always measured, as the fallback).
    """
    labels = np.r_[np.zeros(normal_count), np.ones(len(masks))]
    all_masks = torch.cat([torch.zeros(normal_count, *masks.shape[1:]), masks.float()])
    pixel_masks = all_masks[:, ::PIXEL_STRIDE, ::PIXEL_STRIDE].numpy()
    objective: dict[float, float] = {}
    for w in sorted({1.0, *map(float, candidates)}, reverse=True):
        maps = fused_maps(w).float().cpu()
        scores = maps.flatten(1).amax(dim=1).numpy()
        pixels = maps[:, ::PIXEL_STRIDE, ::PIXEL_STRIDE].numpy()
        objective[w] = 0.5 * (image_auroc(labels, scores) + pixel_auroc(pixel_masks, pixels))
    best = max(objective, key=lambda w: (objective[w], w))
    if best != 1.0 and objective[best] < objective[1.0] + margin:
        best = 1.0
    return WeightChoice(best, objective)
