"""DiffusionAD's segmentation sub-network and its loss (DiffusionAD §3.3, Eqs. 10–11).

The network sees the frame and its reconstruction side by side, ``cat(x, x̂)`` (6 channels), and
outputs the anomaly mask M̂ at full resolution: where x and x̂ differ in a way normal
reconstructions never do. It is the reference code's DRAEM-style U-Net (conv-BN-ReLU pairs,
max-pool down, bilinear up, skip connections) with its width and depth as settings, since the
paper's 64-wide, 6-level net is a GPU network.

    L_mask = SmoothL1(M, M̂) + γ·L_focal(M, M̂),  γ = 5                         (Eq. 10)
    L_focal = α·(1 − p_t)^4 · BCE,  α = 0.5                           (reference code)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SegmentationNet(nn.Module):
    """U-Net: (N, 6, H, W) = cat(x, x̂) in [−1, 1] → mask logits (N, 1, H, W).

    ``channels`` is the first level's width; it doubles per level up to 8× (the reference's
    64 → 512). H and W must be divisible by 2^(levels − 1).
    """

    def __init__(self, channels: int = 32, levels: int = 4, in_channels: int = 6) -> None:
        super().__init__()
        widths = [channels * min(2**i, 8) for i in range(levels)]
        self.widths = widths
        self.down = nn.ModuleList(
            [_block(in_channels if i == 0 else widths[i - 1], w) for i, w in enumerate(widths)]
        )
        self.up_conv = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(widths[i + 1], widths[i], 3, padding=1, bias=False),
                    nn.BatchNorm2d(widths[i]),
                    nn.ReLU(inplace=True),
                )
                for i in range(levels - 1)
            ]
        )
        self.up_block = nn.ModuleList([_block(2 * widths[i], widths[i]) for i in range(levels - 1)])
        self.head = nn.Conv2d(widths[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up_block))):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.up_block[i](torch.cat([skips[i], self.up_conv[i](x)], dim=1))
        return self.head(x)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, gamma: float = 4.0
) -> torch.Tensor:
    """Binary focal loss α·(1 − p_t)^γ·BCE averaged over pixels (from logits, for stability)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)  # the probability given to the true class
    return (alpha * (1.0 - p_t) ** gamma * bce).mean()


def mask_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    focal_weight: float = 5.0,
    alpha: float = 0.5,
    gamma: float = 4.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 10: SmoothL1(M, M̂) + γ·focal(M, M̂), with M̂ = sigmoid(logits)."""
    smooth = F.smooth_l1_loss(torch.sigmoid(logits), target)
    focal = focal_loss(logits, target, alpha, gamma)
    loss = smooth + focal_weight * focal
    return loss, {"seg_loss": float(loss.detach()), "seg_focal": float(focal.detach())}
