"""``--method knn``: the patch memory alone, as its own method.

PatchCore (Roth et al. 2022) without the diffusion: the backbone's stride-8 and stride-16 maps,
one 3×3-averaged vector per patch, a greedy coreset of the training patches, and each patch's
distance to its nearest kept patch as the map (bilinear to the frame, Gaussian σ = 4); the
image score is the map's maximum. It is here so a user sees, on their own product, what the
diffusion methods add to the memory term they all can use, and because it is fast: one
backbone pass and one nearest-neighbour search per frame.

The map is in the memory's own units (feature-space distance), so no map statistics are
fitted; the threshold is a quantile of normal scores: the validation images and training
images scored leave-one-image-out (:meth:`Detector.leave_out_distances`).
"""

from __future__ import annotations

import numpy as np
import torch

from edge_ad.config import Settings
from edge_ad.d3ad.observer import FitObserver
from edge_ad.d3ad.trainer import to_model_range
from edge_ad.detector import Detector, Scored, StageTimer
from edge_ad.maps import gaussian_blur, image_score, upsample

STAGES = ("features", "memory", "map")


def distance_map(distances: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Patch distances (N, h, w) → the frame's map (N, size, size): bilinear, then blurred."""
    return gaussian_blur(upsample(distances[:, None].float(), size), sigma)[:, 0]


class PatchKNN(Detector):
    """The patch memory's nearest-neighbour map as a detector."""

    method = "knn"
    STAGES = STAGES

    @classmethod
    def wants_memory(cls, settings: Settings) -> bool:
        return True

    def _map(self, distances: torch.Tensor) -> torch.Tensor:
        s = self.settings
        return distance_map(distances, s.data.image_size, s.anomaly_map.sigma)

    def score_batch(
        self,
        x: torch.Tensor,
        timings: dict[str, float] | None = None,
        reconstruction: bool = False,
    ) -> Scored:
        assert self.backbone is not None
        timer = StageTimer(timings, self.device)
        with timer("features"):
            feats = self.backbone(x)
        with timer("memory"):
            distances = self.memory_distances(feats)
        with timer("map"):
            amap = self._map(distances)
            scores = image_score(amap)
        return Scored(scores, amap, np.zeros(len(x), dtype=np.int64), None)

    def calibration_scores(
        self,
        val_images: torch.Tensor,
        observer: FitObserver,
        index_images: torch.Tensor | None = None,
    ) -> np.ndarray:
        scores = [super().calibration_scores(val_images, observer)]
        _, loo = self.leave_out_distances(index_images, observer)
        if len(loo):
            scores.append(image_score(self._map(loo)).double().numpy())
        return np.concatenate(scores)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch vectors of uint8 images (for diagnostics and tests)."""
        assert self.backbone is not None
        return self.memory_embedding(self.backbone(to_model_range(images).to(self.device)))
