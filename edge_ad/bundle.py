"""A trained detector as one directory: what ``eval``, ``infer``, MLflow and Serve all load.

Layout::

    <bundle>/
      bundle.json          format version, method, product, threshold, settings, the
                           autoencoder/UNet configs (latent-diffusion methods), backbone
                           name/layers, metrics
      weights.safetensors  vae.*, unet.*, backbone.* (φ, adapted for D3AD) and the method's
                           own networks (DiffusionAD: seg.*)
      state.safetensors    the method's fitted state (memory.*: the patch memory's kept
                           vectors; D3AD: severity.* bins, normalizer.*, memory_norm.*;
                           RAN: padim.*, stats.*)

Everything is JSON or safetensors, so loading a bundle never unpickles anything: a bundle
that arrived over the network cannot run code. The detector is rebuilt from the bundle alone
(no hub, no packaged backbone weights needed).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import edge_ad
from edge_ad.config import settings_from_dict
from edge_ad.detector import Detector, add_prefix, resolve_device, strip_prefix
from edge_ad.errors import EdgeADError, first_line
from edge_ad.methods import detector_class
from edge_ad.models.backbone import FeatureBackbone

FORMAT = "edge-ad-bundle"
FORMAT_VERSION = 1
META_FILE, WEIGHTS_FILE, STATE_FILE = "bundle.json", "weights.safetensors", "state.safetensors"
#: Parameters a bundle may describe beyond the weights it stores (a backbone whose weights
#: come from its package, buffers): 100 M = 400 MB at float32; an edited architecture that
#: would allocate gigabytes is refused before anything is built.
MAX_UNSTORED_PARAMETERS = 100_000_000


@dataclass
class Bundle:
    """A loaded bundle: the detector plus what is known about it."""

    detector: Detector
    product: str
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def method(self) -> str:
        """The detection method: the detector's own, so it cannot disagree with it."""
        return self.detector.method


def _cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies: what safetensors writes."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def detector_weights(detector: Detector) -> dict[str, torch.Tensor]:
    """``vae.*``, ``unet.*``, ``backbone.*`` (and the method's own networks): every learned
    weight, as CPU copies for safetensors (bundles and Ray Train checkpoints write the same
    keys)."""
    weights: dict[str, torch.Tensor] = {}
    for name, module in detector.weight_parts().items():
        weights |= _cpu_copies(add_prefix(name, module.state_dict()))
    return weights


def load_detector_weights(detector: Detector, weights: dict[str, torch.Tensor]) -> None:
    """Load what :func:`detector_weights` wrote into ``detector``'s modules (strict)."""
    for name, module in detector.weight_parts().items():
        module.load_state_dict(strip_prefix(name, weights))


def save_bundle(
    detector: Detector,
    path: str | Path,
    product: str,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``detector`` to directory ``path`` (created; files inside are replaced)."""
    if not detector.is_fitted:
        raise EdgeADError("cannot save an untrained detector")
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EdgeADError(f"cannot write the bundle to {path}: {err.strerror}") from None
    weights = detector_weights(detector)
    state = _cpu_copies(detector.state_tensors())
    save_file(weights, str(path / WEIGHTS_FILE))
    save_file(state, str(path / STATE_FILE))
    backbone = detector.backbone
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": detector.method,
        "product": product,
        "threshold": detector.threshold,
        "settings": detector.settings.to_dict(),
        **detector.extra_meta(),  # latent-diffusion methods: scaling_factor, vae/unet configs
        "backbone": None
        if backbone is None
        else {
            "name": backbone.name,
            "layers": list(backbone.layers),
            "weights_source": backbone.weights_source,
        },
        "metrics": metrics or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "edge_ad_version": edge_ad.__version__,
        **(extra or {}),
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The bundle's ``bundle.json`` (checked to be an edge-ad bundle)."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise EdgeADError(
            f"{path} is not a model bundle (no {META_FILE}); train one with "
            "`edge-ad train --output DIR`"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise EdgeADError(f"{meta_file} is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT:
        raise EdgeADError(f"{path} is not an edge-ad bundle (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise EdgeADError(
            f"{path} was written by a newer edge-ad (bundle format "
            f"{meta['format_version']}); upgrade edge-ad to load it"
        )
    return meta


def load_bundle(path: str | Path, device: str = "auto") -> Bundle:
    """Rebuild the detector saved by :func:`save_bundle`, on ``device``."""
    path = Path(path)
    meta = read_meta(path)
    for name in (WEIGHTS_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise EdgeADError(f"bundle {path} is incomplete: {name} is missing")
    if meta.get("threshold") is None:
        raise EdgeADError(f"bundle {path} has no calibrated threshold; train it again")
    try:
        detector = _rebuild(path, meta)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, SafetensorError) as err:
        raise EdgeADError(f"bundle {path} is corrupt or incompatible: {first_line(err)}") from None
    detector.eval().requires_grad_(False)
    detector.to(resolve_device(device))
    return Bundle(
        detector=detector,
        product=meta["product"],
        metrics=meta.get("metrics", {}),
        meta=meta,
        path=path,
    )


def _require_finite(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A NaN or infinite number in the fitted state or the calibration makes every score NaN,
    and NaN compares false with the threshold: the frame would pass as normal."""
    if not _is_number(meta["threshold"]):
        raise ValueError(f"bundle.json threshold is {meta['threshold']!r}, not a finite number")
    factor = meta.get("scaling_factor", 1.0)
    if not (_is_number(factor) and factor > 0):
        raise ValueError(f"bundle.json scaling_factor is {factor!r}, not a positive number")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"state {key} holds NaN or infinite values")


def _require_weights_fit(
    path: Path, cls: type[Detector], settings: Any, meta: dict[str, Any]
) -> None:
    """The architecture bundle.json describes must be about the size of the weights stored
    beside it. Checked on PyTorch's meta device (shapes only, no memory): an edited
    ``block_out_channels`` would otherwise allocate gigabytes before the load fails."""
    with safe_open(str(path / WEIGHTS_FILE), "pt") as weights:
        stored = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    with torch.device("meta"):
        shell = cls.from_meta(settings, meta, _backbone(meta))
    needed = sum(p.numel() for p in shell.parameters())
    if needed > stored + MAX_UNSTORED_PARAMETERS:
        raise ValueError(
            f"bundle.json describes {needed:,} parameters but the weights hold {stored:,}"
        )


def _backbone(meta: dict[str, Any]) -> FeatureBackbone | None:
    """The untrained backbone ``bundle.json`` describes (its weights load with the rest)."""
    b = meta.get("backbone")
    if not b:
        return None
    _require_local_backbone(b["name"])
    backbone = FeatureBackbone(b["name"], b["layers"], weights=None)
    backbone.weights_source = b.get("weights_source", "bundle")
    return backbone


def _require_local_backbone(name: Any) -> None:
    """A bundle's backbone must be one timm builds from its own code: a ``hf-hub:`` (or any
    other ``scheme:``) name would make loading fetch a config over the network."""
    import timm

    if not isinstance(name, str) or ":" in name or not timm.is_model(name):
        raise ValueError(f"backbone {name!r} is not a timm architecture built offline")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _rebuild(path: Path, meta: dict[str, Any]) -> Detector:
    settings = settings_from_dict(meta["settings"])
    method = meta.get("method", "d3ad")
    if settings.method != method:
        raise ValueError(f"bundle.json says method {method!r}, its settings {settings.method!r}")
    cls = detector_class(method)
    _require_weights_fit(path, cls, settings, meta)
    detector = cls.from_meta(settings, meta, _backbone(meta))
    state = load_file(str(path / STATE_FILE))
    _require_finite(state, meta)
    detector.load_state_tensors(state)
    load_detector_weights(detector, load_file(str(path / WEIGHTS_FILE)))
    return detector
