"""Domain adaptation of the feature backbone φ (D3AD paper §4.3).

An ImageNet backbone sees the autoencoder's small reconstruction artefacts (blur, colour shift)
as differences, and the feature map f_map then lights up on normal images. Fine-tuning φ for a
few epochs so that φ(x) ≈ φ(x̂) on normal training images teaches it to ignore what the
generative model cannot reproduce anyway, while real defects (which x̂ removes) still differ.

Loss per batch (paper Eq. 10: 1 − cosine along channels at every position, globally averaged):

    L = Σ_j GAP(1 − cos(φ_j(x̂), φ_j(x)))  +  w · Σ_j GAP(1 − cos(φ_j(x), φ⁰_j(x)))

This is the same per-position distance the feature map f_map measures. (The reference code
instead takes one cosine of the whole flattened map, which lets a few positions differ a lot.)
The second term anchors φ to a frozen copy φ⁰ of the pretrained backbone. Without it the
cheapest solution is to make φ constant, which zeroes the first term and destroys the features
the KNN severity and the feature map rely on. ``anchor_weight=0`` reproduces the paper.

Each batch is reconstructed from a random T̂ (a uniformly drawn severity bin, as the reference
code's ``DA_rnd_step``), so φ learns to ignore reconstruction artefacts at every noise level.
BatchNorm statistics stay frozen: batches of 8 on a CPU would only add noise to them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from edge_ad.config import AdaptConfig
from edge_ad.d3ad.observer import FitObserver
from edge_ad.d3ad.trainer import _batches, steps_per_epoch, to_model_range
from edge_ad.models.backbone import FeatureBackbone, frozen_copy, set_batchnorm_eval

ReconstructFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_feature_loss(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_j GAP(1 − cos(a_j, b_j)): cosine along channels per position, averaged (Eq. 10)."""
    return sum((1.0 - F.cosine_similarity(x, y, dim=1)).mean() for x, y in zip(a, b, strict=True))


def adapt_backbone(
    backbone: FeatureBackbone,
    images: torch.Tensor,
    reconstruct: ReconstructFn,
    timestep_choices: Sequence[int],
    cfg: AdaptConfig,
    device: torch.device,
    observer: FitObserver | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Fine-tune ``backbone`` in place on normal images (uint8 (N, 3, H, W)).

    ``reconstruct(x, t_hat)`` returns x̂ for images x in [-1, 1] and per-image T̂ (no grad).
    """
    observer = observer or FitObserver()
    generator = torch.Generator().manual_seed(seed)
    teacher = frozen_copy(backbone) if cfg.anchor_weight > 0 else None
    choices = torch.tensor(list(timestep_choices), dtype=torch.long)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=cfg.lr, weight_decay=0.0)
    observer.stage_start("adaptation", cfg.epochs * steps_per_epoch(len(images), cfg.batch_size))
    start, last = time.perf_counter(), {}
    for epoch in range(cfg.epochs):
        backbone.train()
        set_batchnorm_eval(backbone)
        sums = {"da_loss": 0.0, "da_recon": 0.0, "da_anchor": 0.0}
        batches = _batches(len(images), cfg.batch_size, generator)
        for idx in batches:
            x = to_model_range(images[idx]).to(device)
            t_hat = choices[torch.randint(len(choices), (1,), generator=generator)].expand(len(x))
            with torch.no_grad():
                x_hat = reconstruct(x, t_hat.to(device))
            feats_x = backbone(x)
            recon_term = cosine_feature_loss(backbone(x_hat), feats_x)
            anchor_term = torch.zeros((), device=device)
            if teacher is not None:
                with torch.no_grad():
                    feats_t = teacher(x)
                anchor_term = cosine_feature_loss(feats_x, feats_t)
            loss = recon_term + cfg.anchor_weight * anchor_term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["da_loss"] += float(loss.detach())
            sums["da_recon"] += float(recon_term.detach())
            sums["da_anchor"] += float(anchor_term.detach())
            observer.advance("adaptation", 1, loss=float(loss.detach()))
        last = {k: v / len(batches) for k, v in sums.items()}
        observer.epoch_end("adaptation", epoch, last)
    backbone.eval()
    summary = {**last, "da_seconds": time.perf_counter() - start}
    observer.stage_end("adaptation", summary)
    return summary
