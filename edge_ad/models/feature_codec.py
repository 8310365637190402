"""A latent space made of frozen backbone features: the ``features`` path of D3AD.

The paper diffuses in Stable Diffusion's VAE latent space. Without that VAE (no download at run
time) a per-product autoencoder trained on two CPU cores is blurry, and its reconstruction error
is then dominated by the blur. Detectors that reconstruct in a frozen pretrained *feature* space
instead (UniAD, You et al. 2022; RD4AD, Deng & Li 2022) avoid that: nothing has to be decoded
back to pixels, so nothing has to be faithful to pixels.

:class:`FeatureCodec` is that space. The patch embedding the memory already computes (stride-8
and stride-16 backbone maps, neighbourhood-averaged, on the stride-8 grid: D channels) is
projected by a fixed linear map fitted on training patches — PCA, whitened — to C channels::

    z0 = W (e − μ) / √λ        e: a patch vector (D,), W: the top C principal directions,
                               λ: their variances, so every channel of z0 has unit variance
    decode(z) = μ + Wᵀ (√λ · z)  back to the D channels (the part of e inside the C directions)

Whitening gives the latent the unit scale the diffusion schedule assumes (no scaling factor to
estimate). Nothing is trained: ``fit`` is one covariance and one eigendecomposition. All state
is three buffers, so a bundle stores it with the other weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from edge_ad.errors import EdgeADError

__all__ = ["FeatureCodec"]

#: Variance floor (relative to the largest principal variance) for whitening: a direction with
#: almost no variance on normal patches would otherwise be blown up into unit-variance noise.
MIN_RELATIVE_VARIANCE = 1e-6


class FeatureCodec(nn.Module):
    """Fixed whitened-PCA projection of D-channel patch embeddings to C latent channels."""

    def __init__(self, in_channels: int, latent_channels: int, splits: Sequence[int] = ()) -> None:
        """``splits``: the channel count of each backbone layer inside the D channels (finest
        first; they must sum to D), for per-layer comparisons of decoded features."""
        super().__init__()
        if not 1 <= latent_channels <= in_channels:
            raise EdgeADError(
                f"latent.channels must be between 1 and the {in_channels} feature channels, "
                f"got {latent_channels}"
            )
        splits = tuple(int(s) for s in splits) or (int(in_channels),)
        if sum(splits) != in_channels:
            raise EdgeADError(f"layer splits {splits} do not add up to {in_channels} channels")
        self.in_channels = int(in_channels)
        self.latent_channels = int(latent_channels)
        self.splits = splits
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("components", torch.zeros(latent_channels, in_channels))
        self.register_buffer("scale", torch.zeros(latent_channels))

    @property
    def fitted(self) -> bool:
        return bool((self.scale > 0).all())

    @torch.no_grad()
    def fit(self, embeddings: Iterable[torch.Tensor]) -> dict[str, float]:
        """Fit μ, W and √λ on training patch embeddings (batches of (N, D, h, w)); returns the
        share of the patches' variance the C channels keep.

        The covariance is accumulated in float64 batch by batch (a product's patches do not
        have to fit in memory at once), centred with the running mean at the end.
        """
        d = self.in_channels
        total = torch.zeros(d, dtype=torch.float64)
        outer = torch.zeros(d, d, dtype=torch.float64)
        count = 0
        for e in embeddings:
            if e.ndim != 4 or e.shape[1] != d:
                raise EdgeADError(f"expected embeddings (N, {d}, h, w), got {tuple(e.shape)}")
            rows = e.detach().double().cpu().permute(0, 2, 3, 1).reshape(-1, d)
            total += rows.sum(0)
            outer += rows.T @ rows
            count += len(rows)
        if count < 2:
            raise EdgeADError("the feature projection needs at least two training patches")
        mean = total / count
        cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
        variances, vectors = torch.linalg.eigh(cov)  # ascending
        variances, vectors = variances.flip(0), vectors.flip(1)
        c = self.latent_channels
        floor = float(variances[0].clamp(min=0)) * MIN_RELATIVE_VARIANCE
        kept = variances[:c].clamp(min=max(floor, 1e-12))
        self.mean.copy_(mean.float())
        self.components.copy_(vectors[:, :c].T.float())
        self.scale.copy_(kept.sqrt().float())
        explained = float(variances[:c].clamp(min=0).sum() / variances.clamp(min=0).sum())
        return {"latent_explained_variance": explained}

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise EdgeADError("the feature projection is not fitted; train the model first")

    def encode(self, embedding: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (N, D, h, w) → whitened latents z0 (N, C, h, w)."""
        self._require_fitted()
        centred = embedding.float() - self.mean[:, None, None]
        z = torch.einsum("cd,ndhw->nchw", self.components, centred)
        return z / self.scale[:, None, None]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, h, w) → patch embeddings (N, D, h, w) inside the kept directions."""
        self._require_fitted()
        e = torch.einsum("cd,nchw->ndhw", self.components, z.float() * self.scale[:, None, None])
        return e + self.mean[:, None, None]

    def layers(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Split D-channel embeddings into the per-layer parts (finest first)."""
        return list(embedding.split(list(self.splits), dim=1))
