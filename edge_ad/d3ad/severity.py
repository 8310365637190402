"""Dynamic Implicit Conditioning (DIC): how far to push a frame into the diffusion chain.

Two severity estimates, chosen by ``severity.mode``:

* ``patch`` (default): the mean of the frame's ``top_k`` largest patch-memory distances
  (:func:`patch_severity`), binned over the same value of NORMAL images the detector did not
  learn from (:class:`SeverityBins`). One defective patch on a large part moves it, where a
  pooled whole-frame vector barely changes.
* ``pooled``: the paper's, below.

D3AD paper §4.1, Algorithm 2. A frame that looks far from every normal training image
probably carries a large defect and needs a deeper start T̂ to be repaired; a frame that looks
normal needs only a shallow one (which preserves detail). The severity estimate is the mean L1
distance ȳ0 from the frame's pooled layer-2 features to its K nearest training features:

    1: y0 = φ_j(x0) pooled to 16×16, flattened                  (:func:`pool_features`)
    2: {y_s1..y_sK} = KNN(y0, Y_train, K), L1                    (:class:`SeverityIndex`)
    3: ȳ0 = 1/K Σ_k ‖y0 − y_sk‖₁                                 (``mean_knn_distance``)
    4: b = ψ(ȳ0), binary search in |B| equal-width train bins    (:func:`bin_of_distances`)
    5: T̂ = round10(max(b, b_min)/|B| · T_max)                    (:func:`timestep_for_bin`)

Where this differs from the reference code (github.com/JustinTebbe/Dynamic-noise-AD, test.py):

* Self-match. The reference fits sklearn ``NearestNeighbors`` on the train set and queries the
  same set with K neighbours, so every train sample finds itself at distance 0 and its mean is
  over K−1 real neighbours plus a zero: train distances (hence the bins) are biased low
  compared with the test distances, which have no self-match. Here the train set is queried
  with K+1 neighbours and the sample's own row is dropped *by index* (not by position: with
  duplicate vectors a twin can be returned first at the same distance 0).
* Bin edges are ``np.histogram``'s (equal width over [min, max] of the train distances; if all
  distances are equal, numpy widens the range to [d−0.5, d+0.5]). Bins are 1-based and, like
  ``np.histogram``, half-open [e_{b−1}, e_b) with the last bin closed. The reference uses
  ``np.digitize(right=True)`` (intervals (e_{b−1}, e_b]) and puts distances ≤ the train minimum
  into a "bin 0". The two disagree only for a distance exactly on an inner edge, and below the
  minimum (bin 0 vs 1), where the minimum bin 2 gives the same T̂ anyway.
* Rounding. Algorithm 2 writes ⌊·⌋ but the implementation details say "rounded to the nearest
  multiple of 10", and the reference's ``roundup`` rounds half *up* (ceil, then minus 10 when
  0 < x mod 10 < 5). We round half up too, in exact integer arithmetic, so a tie such as
  3/10·50 = 15 → 20 cannot flip with float rounding. ``np.round``/``round`` would round ties
  to even (15 → 20 but 25 → 20), which is neither the paper nor the reference.

The faiss index is never pickled: the state is the train vectors (the index is rebuilt from
them in milliseconds), the bin edges, K and the train distances (for the histogram shown to
users).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edge_ad.errors import EdgeADError
from edge_ad.patch_memory import exact_index

__all__ = [
    "SeverityBins",
    "SeverityIndex",
    "bin_of_distances",
    "patch_severity",
    "pool_features",
    "timestep_for_bin",
    "timesteps_for_bins",
    "timesteps_for_distances",
]


def pool_features(feat: torch.Tensor | Sequence[torch.Tensor], size: int = 16) -> np.ndarray:
    """Adaptive-average-pool feature maps to ``size``×``size`` and flatten: the DIC vector y0.

    ``feat`` is one (N, C, H, W) map (the paper uses ResNet layer 2) or several, which are
    pooled separately and concatenated along the feature axis (as the reference does for its
    ``selected_features``). Pooling to a fixed grid makes the vector length independent of the
    image size and keeps coarse spatial layout, so a missing part still moves the distance.

    Returns a C-contiguous float32 array (N, ΣC·size·size), ready for faiss.
    """
    maps = [feat] if isinstance(feat, torch.Tensor) else list(feat)
    if not maps:
        raise ValueError("pool_features needs at least one feature map")
    flat = []
    for fmap in maps:
        if fmap.ndim != 4:
            raise ValueError(f"feature maps must be (N, C, H, W), got shape {tuple(fmap.shape)}")
        pooled = F.adaptive_avg_pool2d(fmap.detach().float(), (size, size))
        flat.append(pooled.flatten(1))
    out = torch.cat(flat, dim=1).cpu().numpy()
    return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Bins and T̂: pure functions (steps 4 and 5 of Algorithm 2)
# --------------------------------------------------------------------------------------------


def bin_of_distances(distances: np.ndarray | Sequence[float], bin_edges: np.ndarray) -> np.ndarray:
    """ψ: 1-based bin number (1..|B|) of each mean KNN distance, by binary search.

    ``bin_edges`` are the |B|+1 increasing edges. Bin b covers [e_{b−1}, e_b) (the last one
    also includes e_|B|), as in ``np.histogram``. Distances below the train minimum go to bin 1
    and distances beyond the train maximum to bin |B| (clipped: such a frame is at least as
    far from normal as the farthest training image, so it gets the deepest start).
    """
    edges = np.asarray(bin_edges, dtype=np.float64)
    num_bins = edges.size - 1
    if num_bins < 1:
        raise ValueError("bin_edges needs at least two edges")
    d = np.asarray(distances, dtype=np.float64)
    # searchsorted over the |B|−1 inner edges: d < e1 → 0, e1 ≤ d < e2 → 1, …, d ≥ e_{|B|−1} → |B|−1
    return np.searchsorted(edges[1:-1], d, side="right").astype(np.int64) + 1


def _round_half_up_multiple(numerator: int, denominator: int, multiple: int) -> int:
    """Round numerator/denominator to the nearest multiple of ``multiple``, ties up (integers)."""
    # round(x / m) half up = ⌊x/m + 1/2⌋ = ⌊(2·num + den·m) / (2·den·m)⌋, exact for ints
    return (2 * numerator + denominator * multiple) // (2 * denominator * multiple) * multiple


def timestep_for_bin(
    bin: int,  # the paper's symbol b
    num_bins: int = 10,
    t_max: int = 80,
    min_bin: int = 2,
    round_to: int = 10,
) -> int:
    """T̂ = round_{round_to}(max(b, b_min) / |B| · T_max), and never below ``round_to``.

    Examples with the defaults: b=1 → max(1,2)=2 → 16 → 20; b=3 → 24 → 20; b=4 → 32 → 30;
    b=5 → 40; b=7 → 56 → 60; b=10 → 80. The result is always a positive multiple of
    ``round_to`` (10), so with 5 or 10 DDIM steps the step size is an integer. ``min_bin``
    keeps the start off the very shallow end "so that we don't rely solely on prior
    information" (paper §5); bins above ``num_bins`` are clipped to it. Ties round up, like
    the reference's ``roundup``. If ``t_max`` is not a multiple of ``round_to`` the top bin
    may round above it (85 → 90), as in the reference.
    """
    b, num_bins, t_max = int(bin), int(num_bins), int(t_max)
    min_bin, round_to = int(min_bin), int(round_to)
    if num_bins < 1 or t_max < 1 or round_to < 1:
        raise ValueError("num_bins, t_max and round_to must be positive")
    b = min(max(b, min_bin), num_bins)
    t_hat = _round_half_up_multiple(b * t_max, num_bins, round_to)
    return max(t_hat, round_to)


def timesteps_for_bins(
    bins: np.ndarray | Sequence[int],
    num_bins: int = 10,
    t_max: int = 80,
    min_bin: int = 2,
    round_to: int = 10,
) -> np.ndarray:
    """Vectorised :func:`timestep_for_bin`: int64 array of T̂, one per bin number."""
    if num_bins < 1 or t_max < 1 or round_to < 1:
        raise ValueError("num_bins, t_max and round_to must be positive")
    b = np.clip(np.asarray(bins, dtype=np.int64), int(min_bin), int(num_bins))
    num, den, m = b * int(t_max), int(num_bins), int(round_to)
    t_hat = (2 * num + den * m) // (2 * den * m) * m
    return np.maximum(t_hat, m).astype(np.int64)


def timesteps_for_distances(
    distances: np.ndarray | Sequence[float],
    bin_edges: np.ndarray,
    t_max: int = 80,
    min_bin: int = 2,
    round_to: int = 10,
) -> np.ndarray:
    """Steps 4–5 of Algorithm 2 for a batch: mean KNN distances ȳ0 → bins b → T̂ (int64)."""
    bins = bin_of_distances(distances, bin_edges)
    num_bins = int(np.asarray(bin_edges).size - 1)
    return timesteps_for_bins(bins, num_bins, t_max, min_bin, round_to)


# --------------------------------------------------------------------------------------------
# The KNN index (steps 2 and 3 of Algorithm 2) and the fitted bins
# --------------------------------------------------------------------------------------------


def _as_vectors(vectors: np.ndarray | torch.Tensor, dim: int | None = None) -> np.ndarray:
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(vectors), dtype=np.float32)
    if arr.ndim != 2:
        raise EdgeADError(f"severity vectors must be 2-D (N, D), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise EdgeADError(
            f"severity vectors have {arr.shape[1]} features but the index was fitted on {dim}; "
            "was the feature extractor or image size changed?"
        )
    if not np.all(np.isfinite(arr)):
        raise EdgeADError("severity vectors contain NaN or infinite values")
    return arr


class SeverityIndex:
    """K-nearest-neighbour L1 severity over the normal training features, with fitted bins.

    Use::

        index = SeverityIndex().fit(pool_features(train_layer2), k=20, num_bins=10)
        t_hat = index.timesteps(pool_features(frame_layer2), t_max=80)

    Fitted state (see :meth:`state_dict`): ``train_vectors`` (N, D) float32, ``bin_edges``
    (|B|+1,) float64, ``train_distances`` (N,) float64, ``histogram`` (|B|,) int64 and the
    scalars ``k`` (the K actually used) and ``num_bins``.
    """

    def __init__(self) -> None:
        self.train_vectors: np.ndarray | None = None
        self.bin_edges: np.ndarray | None = None
        self.train_distances: np.ndarray | None = None
        self.histogram: np.ndarray | None = None
        self.k: int = 0
        self.num_bins: int = 0
        self._index: Any = None
        self._gpu_resources: Any = None  # keeps faiss GPU memory alive while the index lives

    # ---- fitting --------------------------------------------------------------------------

    def fit(
        self, train_vectors: np.ndarray | torch.Tensor, k: int = 20, num_bins: int = 10
    ) -> SeverityIndex:
        """Index the train features, compute their mean KNN distances and the bins.

        Each train vector's mean is over its K nearest *other* train vectors (self-match
        excluded), so train and test distances are on the same footing. With n training
        vectors only n−1 others exist: K is reduced to min(K, n−1), and that effective K is
        also used for new images (stored as ``k``). Fewer than 2 vectors is an error.
        """
        vectors = _as_vectors(train_vectors)
        n = vectors.shape[0]
        if n < 2:
            raise EdgeADError(f"severity index needs at least 2 training images, got {n}")
        if k < 1 or num_bins < 1:
            raise ValueError("k and num_bins must be positive")
        k_eff = min(int(k), n - 1)
        index, self._gpu_resources = exact_index(vectors, metric="l1")

        # Query K+1 so that K neighbours remain after removing the sample itself.
        dist, idx = index.search(vectors, k_eff + 1)
        is_self = idx == np.arange(n)[:, None]
        # With more than K+1 exact duplicates the sample may be missing from its own result
        # list; then every returned distance is 0 (≤ its self-distance) and dropping the last
        # column is equivalent.
        missing = ~is_self.any(axis=1)
        is_self[missing, -1] = True
        first_self = is_self.argmax(axis=1)  # drop exactly one column per row
        keep = np.ones_like(is_self)
        keep[np.arange(n), first_self] = False
        neigh = dist[keep].reshape(n, k_eff).astype(np.float64)
        train_distances = neigh.mean(axis=1)

        histogram, edges = np.histogram(train_distances, bins=int(num_bins))
        self.train_vectors = vectors
        self.train_distances = train_distances
        self.bin_edges = edges.astype(np.float64)
        self.histogram = histogram.astype(np.int64)
        self.k = k_eff
        self.num_bins = int(num_bins)
        self._index = index
        return self

    # ---- inference ------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if self._index is None or self.bin_edges is None or self.train_vectors is None:
            raise EdgeADError("severity index is not fitted; call fit() or from_state() first")

    def mean_knn_distance(self, vectors: np.ndarray | torch.Tensor) -> np.ndarray:
        """ȳ0 for new images: mean L1 distance to their K nearest train vectors (N,) float64.

        No exclusion here: a new image is not in the index (if it happens to equal a training
        image, distance 0 is the right answer).
        """
        self._require_fitted()
        assert self.train_vectors is not None
        q = _as_vectors(vectors, dim=self.train_vectors.shape[1])
        if q.shape[0] == 0:
            return np.zeros((0,), dtype=np.float64)
        dist, _ = self._index.search(q, self.k)
        return dist.astype(np.float64).mean(axis=1)

    def bin_of(self, distances: np.ndarray | Sequence[float]) -> np.ndarray:
        """1-based bins (1..|B|) of mean distances; beyond the train max → |B|, below min → 1."""
        self._require_fitted()
        assert self.bin_edges is not None
        return bin_of_distances(distances, self.bin_edges)

    def timesteps(
        self,
        vectors: np.ndarray | torch.Tensor,
        t_max: int = 80,
        min_bin: int = 2,
        round_to: int = 10,
    ) -> np.ndarray:
        """Algorithm 2 end to end for pooled feature vectors: T̂ per image (int64)."""
        bins = self.bin_of(self.mean_knn_distance(vectors))
        return timesteps_for_bins(bins, self.num_bins, t_max, min_bin, round_to)

    # ---- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray | int]:
        """Arrays and plain ints only (safetensors-friendly); the faiss index is rebuilt."""
        self._require_fitted()
        assert self.train_vectors is not None and self.bin_edges is not None
        assert self.train_distances is not None and self.histogram is not None
        return {
            "train_vectors": self.train_vectors,
            "bin_edges": self.bin_edges,
            "train_distances": self.train_distances,
            "histogram": self.histogram,
            "k": int(self.k),
            "num_bins": int(self.num_bins),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SeverityIndex:
        """Inverse of :meth:`state_dict`; scalars may also come back as 0-d/1-element arrays."""
        try:
            vectors = _as_vectors(np.asarray(state["train_vectors"]))
            edges = np.asarray(state["bin_edges"], dtype=np.float64).reshape(-1)
            train_distances = np.asarray(state["train_distances"], dtype=np.float64).reshape(-1)
            k = int(np.asarray(state["k"]).reshape(-1)[0])
            num_bins = int(np.asarray(state.get("num_bins", edges.size - 1)).reshape(-1)[0])
        except KeyError as exc:
            raise EdgeADError(f"severity state is missing {exc.args[0]!r}") from None
        if edges.size != num_bins + 1 or train_distances.size != vectors.shape[0]:
            raise EdgeADError("severity state is inconsistent (bins or distances do not match)")
        if not 1 <= k < vectors.shape[0]:
            raise EdgeADError(f"severity state has k={k} for {vectors.shape[0]} train vectors")
        if "histogram" in state:
            histogram = np.asarray(state["histogram"], dtype=np.int64).reshape(-1)
        else:
            histogram, _ = np.histogram(train_distances, bins=edges)
        out = cls()
        out.train_vectors = vectors
        out.bin_edges = edges
        out.train_distances = train_distances
        out.histogram = histogram.astype(np.int64)
        out.k = k
        out.num_bins = num_bins
        out._index, out._gpu_resources = exact_index(vectors, metric="l1")
        return out


# --------------------------------------------------------------------------------------------
# Patch mode: severity from the patch memory's distances, bins over held-out normals
# --------------------------------------------------------------------------------------------


def patch_severity(distances: torch.Tensor, top_k: int = 10) -> np.ndarray:
    """Mean of the ``top_k`` largest patch distances of each frame: (N, h, w) → (N,) float64."""
    flat = distances.flatten(1).double()
    return flat.topk(min(int(top_k), flat.shape[1]), dim=1).values.mean(dim=1).cpu().numpy()


class SeverityBins:
    """|B| equal-width bins over the severities of normal images the detector did not learn
    from (validation images and leave-one-image-out training images), as :class:`SeverityIndex`
    bins its train distances; beyond the normal maximum → the deepest bin.

    State: ``bin_edges`` (|B|+1,), ``train_distances`` (the normal severities, for the
    histogram shown to users), ``histogram`` (|B|,).
    """

    def __init__(self) -> None:
        self.bin_edges: np.ndarray | None = None
        self.train_distances: np.ndarray | None = None
        self.histogram: np.ndarray | None = None

    def fit(self, normal_severities: np.ndarray, num_bins: int = 10) -> SeverityBins:
        values = np.asarray(normal_severities, dtype=np.float64).reshape(-1)
        if values.size < 1 or not np.all(np.isfinite(values)):
            raise EdgeADError("severity bins need finite severities of at least one normal image")
        histogram, edges = np.histogram(values, bins=int(num_bins))
        self.bin_edges, self.train_distances = edges.astype(np.float64), values
        self.histogram = histogram.astype(np.int64)
        return self

    def bin_of(self, distances: np.ndarray | Sequence[float]) -> np.ndarray:
        if self.bin_edges is None:
            raise EdgeADError("severity bins are not fitted")
        return bin_of_distances(distances, self.bin_edges)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.bin_edges is None or self.train_distances is None or self.histogram is None:
            raise EdgeADError("severity bins are not fitted")
        return {
            "bin_edges": self.bin_edges,
            "train_distances": self.train_distances,
            "histogram": self.histogram,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SeverityBins:
        try:
            edges = np.asarray(state["bin_edges"], dtype=np.float64).reshape(-1)
            values = np.asarray(state["train_distances"], dtype=np.float64).reshape(-1)
        except KeyError as exc:
            raise EdgeADError(f"severity state is missing {exc.args[0]!r}") from None
        if edges.size < 2 or not np.all(np.diff(edges) > 0):
            raise EdgeADError("severity state has no increasing bin edges")
        out = cls()
        out.bin_edges, out.train_distances = edges, values
        out.histogram = np.histogram(values, bins=edges)[0].astype(np.int64)
        return out
