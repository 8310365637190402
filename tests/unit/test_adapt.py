"""Domain adaptation of φ: the loss, and that fine-tuning pulls φ(x̂) towards φ(x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_ad.config import AdaptConfig
from edge_ad.d3ad.adapt import adapt_backbone, cosine_feature_loss
from edge_ad.d3ad.observer import HistoryObserver
from edge_ad.models.backbone import FeatureBackbone


def test_cosine_feature_loss_values() -> None:
    a = [torch.randn(3, 8, 4, 4), torch.randn(3, 16, 2, 2)]
    assert float(cosine_feature_loss(a, a)) < 1e-6
    assert abs(float(cosine_feature_loss(a, [-x for x in a])) - 4.0) < 1e-5  # 2 per layer


def _blurred(x: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """A stand-in reconstruction: what a small autoencoder does to an image (blur)."""
    return F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)


def _images(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="nearest")
    return (base * 255).to(torch.uint8)


def _recon_gap(backbone: FeatureBackbone, images: torch.Tensor) -> float:
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        return float(cosine_feature_loss(backbone(_blurred(x, None)), backbone(x)))


def test_adaptation_reduces_the_reconstruction_gap_and_the_anchor_limits_drift() -> None:
    images = _images()
    cfg = AdaptConfig(epochs=3, lr=3e-3, batch_size=2, anchor_weight=0.0)
    torch.manual_seed(0)
    free = FeatureBackbone(layers=(1, 2), weights=None)
    anchored = FeatureBackbone(layers=(1, 2), weights=None)
    anchored.load_state_dict(free.state_dict())
    teacher = FeatureBackbone(layers=(1, 2), weights=None)
    teacher.load_state_dict(free.state_dict())
    before = _recon_gap(free, images)

    history = HistoryObserver()
    adapt_backbone(free, images, _blurred, [20, 40], cfg, torch.device("cpu"), history)
    after = _recon_gap(free, images)
    assert after < 0.5 * before, (before, after)
    assert len(history.epochs["adaptation"]) == 3

    adapt_backbone(
        anchored,
        images,
        _blurred,
        [20, 40],
        cfg.model_copy(update={"anchor_weight": 10.0}),
        torch.device("cpu"),
    )
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        drift_free = float(cosine_feature_loss(free(x), teacher(x)))
        drift_anchored = float(cosine_feature_loss(anchored(x), teacher(x)))
    assert drift_anchored < drift_free, (drift_anchored, drift_free)
