"""The detection methods by name: what ``--method``, bundles and MLflow runs refer to.

=============  ================================================================  ===========
method         idea                                                              paper
=============  ================================================================  ===========
``d3ad``       severity (patch memory or pooled KNN) picks a per-frame timestep; D3AD
               guided DDIM in latent space; memory + latent + feature map
               (the default)
``diffusionad`` norm-guided ONE-step reconstruction; a segmentation network on   DiffusionAD
               (x, x̂) trained on synthetic anomalies
``ran``        pixel-level KL scores at t = 5, 50, 100 + feature MSE against a   RAN
               reconstruction by PaDiM-guided gradient denoising
``knn``        the patch memory alone: each patch's distance to the nearest      PatchCore
               kept normal patch (a PatchCore-style baseline, no diffusion)
=============  ================================================================  ===========
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_ad.config import METHODS, Settings
from edge_ad.errors import ConfigError

if TYPE_CHECKING:
    from edge_ad.detector import Detector

__all__ = ["METHODS", "build_detector", "detector_class"]


def detector_class(method: str) -> type[Detector]:
    """The detector class of ``method`` (imported on demand: each pulls in its own modules)."""
    if method == "d3ad":
        from edge_ad.d3ad.detector import D3AD

        return D3AD
    if method == "diffusionad":
        from edge_ad.diffusionad.detector import DiffusionAD

        return DiffusionAD
    if method == "ran":
        from edge_ad.ran.detector import RAN

        return RAN
    if method == "knn":
        from edge_ad.knn.detector import PatchKNN

        return PatchKNN
    raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def build_detector(settings: Settings) -> Detector:
    """A fresh, untrained detector of ``settings.method``."""
    return detector_class(settings.method).build(settings)
