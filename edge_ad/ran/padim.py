"""PaDiM's Gaussian model of normal features (Defard et al. 2021), RAN's guide for gradient
denoising (RAN §3.3, Eq. 12):

    L(x) = Σ_ij (f_ij(x) − μ_ij)ᵀ Σ_ij⁻¹ (f_ij(x) − μ_ij)

f_ij is the feature vector at grid position ij: the backbone's multi-scale maps resized to one
grid and concatenated, then a fixed random subset of ``dims`` channels (PaDiM's reduction). μ_ij
and Σ_ij + ε·I come from the normal training images. Everything is torch, so ∇L flows back to the
image (and through the decoder to the latent).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from edge_ad.errors import EdgeADError


def grid_features(feats: list[torch.Tensor], size: int) -> torch.Tensor:
    """Multi-scale maps resized (bilinear) to size×size and concatenated: (N, ΣC, size, size)."""
    return torch.cat(
        [F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False) for f in feats],
        dim=1,
    )


class PaDiM:
    """μ_ij, Σ_ij⁻¹ over a feature grid, fitted on normal images; differentiable distance."""

    def __init__(
        self,
        index: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
        cov_inv: torch.Tensor | None = None,
    ) -> None:
        self.index, self.mean, self.cov_inv = index, mean, cov_inv

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    @staticmethod
    def choose_dims(total: int, dims: int, seed: int) -> torch.Tensor:
        """PaDiM's random channel subset (sorted; all channels when dims ≥ total)."""
        if dims >= total:
            return torch.arange(total)
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(total, generator=g)[:dims].sort().values

    def fit(self, grids: Iterable[torch.Tensor], index: torch.Tensor, eps: float) -> PaDiM:
        """Fit on batches of grid features (N, C, S, S) of normal images (float64 sums)."""
        n, total, outer = 0, None, None
        for g in grids:
            v = g[:, index].detach().to(torch.float64).flatten(2).permute(2, 0, 1)  # (P, N, D)
            total = v.sum(1) if total is None else total + v.sum(1)
            o = torch.einsum("pnd,pne->pde", v, v)
            outer = o if outer is None else outer + o
            n += v.shape[1]
        if n < 2 or total is None or outer is None:
            raise EdgeADError("PaDiM needs at least 2 normal training images")
        mean = total / n
        cov = (outer - n * torch.einsum("pd,pe->pde", mean, mean)) / (n - 1)
        cov += eps * torch.eye(cov.shape[-1], dtype=cov.dtype)
        self.index = index
        self.mean = mean.float()  # (P, D)
        self.cov_inv = torch.linalg.inv(cov).float()  # (P, D, D)
        return self

    def distance(self, grid: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance per position: (N, P), differentiable in ``grid``."""
        if not self.fitted:
            raise EdgeADError("PaDiM is not fitted")
        assert self.index is not None and self.mean is not None and self.cov_inv is not None
        index = self.index.to(grid.device)
        d = grid[:, index].flatten(2).transpose(1, 2) - self.mean.to(grid.device)  # (N, P, D)
        return torch.einsum("npd,pde,npe->np", d, self.cov_inv.to(grid.device), d)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        assert self.index is not None and self.mean is not None and self.cov_inv is not None
        return {"index": self.index, "mean": self.mean, "cov_inv": self.cov_inv}

    @classmethod
    def from_tensors(cls, state: dict[str, torch.Tensor]) -> PaDiM:
        try:
            return cls(state["index"].long(), state["mean"], state["cov_inv"])
        except KeyError as err:
            raise EdgeADError(f"PaDiM state is missing {err}") from None
