"""The detection methods by name: what ``--method``, bundles and MLflow runs refer to.

=============  ================================================================  ==============
method         idea                                                              seeds
=============  ================================================================  ==============
``d3ad``       KNN severity picks a per-frame timestep; guided DDIM in latent    004
               space; latent + feature map (the default)
``diffusionad`` norm-guided ONE-step reconstruction; a segmentation network on   002
               (x, x̂) trained on synthetic anomalies (the fast one)
``ran``        pixel-level KL scores at t = 5, 50, 100 + feature MSE against a   000, 001, 003
               reconstruction by PaDiM-guided gradient denoising
=============  ================================================================  ==============
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_ad.config import METHODS, Settings
from edge_ad.errors import ConfigError

if TYPE_CHECKING:
    from edge_ad.detector import LatentDiffusionDetector

__all__ = ["METHODS", "build_detector", "detector_class"]


def detector_class(method: str) -> type[LatentDiffusionDetector]:
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
    raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def build_detector(settings: Settings) -> LatentDiffusionDetector:
    """A fresh, untrained detector of ``settings.method``."""
    return detector_class(settings.method).build(settings)
