"""Synthetic corruption of latents, so a denoiser learns to *repair* rather than to copy.

A denoiser trained only on normal latents with the plain ε objective also learns the identity:
from D3AD's noiseless start it hands a defect back almost unchanged, and the reconstruction
error stays small exactly where it should be large. DeCo-Diff (Beizaee et al., CVPR 2025) and
"Removing Anomalies as Noises" treat an anomaly as one more kind of noise to be removed; DRAEM
and SimpleNet train on synthetic defects for the same reason. Here, during training, random
rectangles of a share of the clean latents z0 are replaced, and the denoiser is asked for the
clean z0 (see :func:`corrupted_diffusion_loss`):

* ``noise``   — the rectangle becomes N(0, 1) (the whitened latent's own scale);
* ``patches`` — the rectangle is copied from another training latent, at another place:
  realistic content in the wrong position (a texture where a different one belongs);
* ``jitter``  — N(0, s²) is added inside the rectangle, s drawn per rectangle in (0, 1]
  (SimpleNet's feature jitter, local);
* ``none``    — no corruption: the paper's objective.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["CORRUPTIONS", "Corruption", "corrupt_latents"]

Corruption = Literal["none", "noise", "patches", "jitter"]
CORRUPTIONS: tuple[str, ...] = ("none", "noise", "patches", "jitter")


def _rectangle(
    h: int, w: int, area: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random rectangle covering a share of the h×w grid in
    ``area`` and an aspect ratio within [1/3, 3]."""
    u = torch.rand(2, generator=generator).tolist()
    share = area[0] + (area[1] - area[0]) * u[0]
    aspect = 3.0 ** (2.0 * u[1] - 1.0)
    rh = max(1, min(h, round((share * h * w * aspect) ** 0.5)))
    rw = max(1, min(w, round((share * h * w / aspect) ** 0.5)))
    top = int(torch.randint(0, h - rh + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - rw + 1, (1,), generator=generator))
    return top, left, rh, rw


def corrupt_latents(
    z0: torch.Tensor,
    kind: Corruption | str,
    probability: float = 0.5,
    area: tuple[float, float] = (0.01, 0.1),
    max_regions: int = 3,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z̃0, mask): a copy of z0 (N, C, h, w) where each latent, with ``probability``, has 1 to
    ``max_regions`` rectangles (each a share of the grid in ``area``) corrupted as ``kind``
    says; mask (N, 1, h, w) is 1 where a value was changed. ``generator`` (CPU) makes the
    choice reproducible; the random values are drawn on the CPU and moved to z0's device."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    if not 0.0 < area[0] <= area[1] <= 1.0:
        raise ValueError(f"area must satisfy 0 < low ≤ high ≤ 1, got {area}")
    generator = generator or torch.Generator().manual_seed(0)
    n, c, h, w = z0.shape
    out = z0.clone()
    mask = torch.zeros(n, 1, h, w, dtype=z0.dtype, device=z0.device)
    if kind == "none" or probability == 0.0 or n == 0:
        return out, mask
    chosen = torch.rand(n, generator=generator) < probability
    for i in torch.nonzero(chosen).flatten().tolist():
        regions = int(torch.randint(1, max_regions + 1, (1,), generator=generator))
        for _ in range(regions):
            top, left, rh, rw = _rectangle(h, w, area, generator)
            where = (slice(top, top + rh), slice(left, left + rw))
            if kind == "noise":
                values = torch.randn(c, rh, rw, generator=generator)
            elif kind == "jitter":
                scale = float(torch.rand(1, generator=generator)) or 1.0
                values = z0[i, :, where[0], where[1]].cpu() + scale * torch.randn(
                    c, rh, rw, generator=generator
                )
            else:  # patches: the same-sized region of another latent, anywhere in it
                # Any latent but this one (this one only when the batch holds no other).
                other = (i + int(torch.randint(1, max(n, 2), (1,), generator=generator))) % n
                src_top = int(torch.randint(0, h - rh + 1, (1,), generator=generator))
                src_left = int(torch.randint(0, w - rw + 1, (1,), generator=generator))
                values = z0[other, :, src_top : src_top + rh, src_left : src_left + rw].cpu()
            out[i, :, where[0], where[1]] = values.to(out.device, out.dtype)
            mask[i, :, where[0], where[1]] = 1.0
    return out, mask
