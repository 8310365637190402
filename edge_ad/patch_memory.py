"""A memory of normal patches: how far each patch of a frame is from anything seen in training.

This is PatchCore's idea (Roth et al., "Towards Total Recall in Industrial Anomaly Detection",
2022; anomalib's ``models/image/patchcore``), kept as a shared part that every method can use:

1. **Patch embedding** (:func:`patch_embedding`): the backbone maps a detector already computes
   (stride 8 and 16), each averaged over its 3×3 neighbourhood so a patch sees its context, the
   coarser map upsampled to the finer grid, concatenated along channels: one vector per
   stride-8 patch.
2. **Greedy k-center coreset** (:func:`greedy_coreset`): a fraction (default 10 %) of all
   training patches, chosen so every training patch lies close to one kept patch. The choice
   runs on a random projection of the vectors (Johnson–Lindenstrauss: distances are kept up to
   a small factor) and, unlike a per-point loop, in *blocks*: see the function.
3. **Exact nearest neighbour** (:class:`PatchMemory`): faiss ``IndexFlatL2`` over the kept
   patches (a GPU index when faiss has one); a frame's map is each patch's L2 distance to its
   nearest kept patch.

All fitted state is plain tensors (the kept vectors, the image each came from, the grid shape,
the coreset's covering radius): a bundle stores it with safetensors and the index is rebuilt in
milliseconds on load. Nothing is pickled.

Leave-one-image-out distances (:meth:`PatchMemory.distances_excluding`) score a training image
against the memory *without the patches it contributed*, which is what a new normal frame
sees. Calibration uses them so the threshold rests on hundreds of normal images instead of
the handful a small validation split holds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from edge_ad.errors import EdgeADError

__all__ = [
    "Coreset",
    "PatchMemory",
    "exact_index",
    "greedy_coreset",
    "patch_embedding",
]


# --------------------------------------------------------------------------------------------
# 1. Patch embedding
# --------------------------------------------------------------------------------------------


def patch_embedding(feats: Sequence[torch.Tensor], neighbourhood: int = 3) -> torch.Tensor:
    """Backbone maps (N, C_j, h_j, w_j), finest first → patch vectors (N, ΣC_j, h_0, w_0).

    Each map is averaged over a ``neighbourhood``×``neighbourhood`` window (stride 1, zero
    padding counted at the border, as PatchCore's ``AvgPool2d(3, 1, 1)``), then bilinearly
    resized to the first map's grid. The zero padding matters: averaging border patches over
    the pixels that exist instead cost 8 I-AUROC points on a real texture set (the border
    features of a zero-padded CNN vary most between normal images; damping them helps).
    """
    if not feats:
        raise ValueError("patch_embedding needs at least one feature map")
    size = tuple(feats[0].shape[-2:])
    pad = neighbourhood // 2
    out = []
    for f in feats:
        f = f.float()
        if neighbourhood > 1:
            f = F.avg_pool2d(f, neighbourhood, stride=1, padding=pad)
        if tuple(f.shape[-2:]) != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def flatten_patches(embedding: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) → (N·h·w, D), image-major (the rows of image i are contiguous)."""
    n, d, h, w = embedding.shape
    return embedding.permute(0, 2, 3, 1).reshape(n * h * w, d)


# --------------------------------------------------------------------------------------------
# 2. Greedy k-center coreset
# --------------------------------------------------------------------------------------------


class Coreset(NamedTuple):
    """The kept rows and how well they cover the rest."""

    indices: torch.Tensor  # (M,) int64, sorted ascending
    radius: float  # max over all rows of the distance to the nearest kept row (selection space)
    seconds: float


def _nearest_sq_dist(
    x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Squared L2 distance of each row of x to its nearest row of c: ‖x‖² + min_c(‖c‖² − 2x·c).

    ‖x‖² is constant per row, so it is added after the minimum and the rest is ONE fused
    ``addmm`` (in ``dtype``: bfloat16 runs on AMX/tensor cores) followed by a row minimum: the
    elementwise work of the textbook form would cost ten times the matmul on a CPU.
    """
    c_sq = (c * c).sum(1)
    part = torch.addmm(c_sq[None, :].to(dtype), x.to(dtype), c.to(dtype).T, alpha=-2.0)
    return (part.amin(dim=1).float() + x_sq).clamp_min_(0.0)


def _pairwise_sq_dist(c: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances among the rows of c (float32)."""
    c_sq = (c * c).sum(1)
    return (c_sq[:, None] + c_sq[None, :] - 2.0 * (c @ c.T)).clamp_min_(0.0)


def matmul_dtype(name: str) -> torch.dtype:
    """``auto`` → bfloat16 where the CPU (or GPU) runs it natively, else float32."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if torch.cuda.is_available():
        return torch.bfloat16
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.bfloat16 if native is not None and native() else torch.float32


def greedy_coreset(
    vectors: torch.Tensor,
    count: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    candidates: int = 1024,
    dtype: torch.dtype = torch.float32,
    chunk: int = 32768,
) -> Coreset:
    """Greedy k-center selection of ``count`` rows of ``vectors`` (N, D).

    The classic loop (Sener & Savarese 2018; PatchCore; anomalib's ``KCenterGreedy``) adds the
    row farthest from the kept set, then updates every row's distance to the kept set: one pass
    over all N rows per kept row, memory-bound and slow on a CPU. Here the same choices are made
    in blocks, exactly:

    * take the ``candidates`` rows with the largest current distance d, and τ = the largest d
      outside them;
    * within the candidates (their pairwise distances are one small matmul), keep adding the
      one with the largest updated distance while that distance is ≥ τ: no row outside can
      beat it, since outside rows' distances only shrink from ≤ τ; this is exactly the next
      greedy choice;
    * then update d for all rows against the whole block in one blocked matmul (BLAS, or
      bfloat16 on AMX/tensor cores when ``dtype`` says so).

    The selection runs on a Gaussian random projection to ``projection_dim`` (None = the
    vectors as they are), centred so the matmul form of the distance loses little precision.
    ``radius`` is the covering radius in that space: every row lies within it of a kept row
    (exactly for float32; bfloat16 rounds the cross term at ≈ 3 significant digits).
    """
    start = time.perf_counter()
    n = int(vectors.shape[0])
    if count <= 0:
        raise ValueError("coreset count must be positive")
    if count >= n:
        return Coreset(torch.arange(n), 0.0, time.perf_counter() - start)
    g = torch.Generator().manual_seed(seed)
    x = vectors.float()
    x = x - x.mean(dim=0, keepdim=True)
    if projection_dim is not None and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=g) / math.sqrt(projection_dim)
        x = torch.cat([part @ proj.to(x.device) for part in x.split(chunk)])
    x_sq = (x * x).sum(1)

    def update(d: torch.Tensor, centres: torch.Tensor) -> None:
        c = x[centres]
        for lo in range(0, n, chunk):
            part = _nearest_sq_dist(x[lo : lo + chunk], x_sq[lo : lo + chunk], c, dtype)
            torch.minimum(d[lo : lo + chunk], part, out=d[lo : lo + chunk])

    first = int(torch.randint(n, (1,), generator=g))
    chosen = [first]
    d = torch.full((n,), math.inf, device=x.device)
    update(d, torch.tensor([first], device=x.device))
    while len(chosen) < count:
        b = min(candidates, n)
        top, cand = d.topk(min(b + 1, n))
        tau = float(top[b]) if len(top) > b else -math.inf
        cand, local = cand[:b], top[:b].double().cpu().numpy().copy()
        pair = _pairwise_sq_dist(x[cand]).double().cpu().numpy()
        block: list[int] = []
        need = count - len(chosen)
        while len(block) < need:
            j = int(local.argmax())
            if local[j] < tau:
                break
            block.append(j)
            np.minimum(local, pair[j], out=local)
            local[j] = -1.0  # never again (its own distance is 0)
        centres = cand[torch.as_tensor(block, device=cand.device)]
        chosen.extend(int(i) for i in centres.tolist())
        update(d, centres)
    radius = math.sqrt(max(float(d.max()), 0.0))
    indices = torch.as_tensor(sorted(chosen), dtype=torch.int64)
    return Coreset(indices, radius, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# 3. The memory and its exact nearest-neighbour search
# --------------------------------------------------------------------------------------------


def exact_index(vectors: np.ndarray, metric: str = "l2") -> tuple[Any, Any]:
    """Exact faiss index over ``vectors`` (``l2``: squared L2, ``l1``); on a GPU when faiss
    has one, else on the CPU. Returns (index, gpu_resources): keep the resources alive as long
    as the index. A GPU build that fails (no L1 support, out of memory) falls back to the CPU.
    """
    import faiss  # local import: only fitted detectors need it

    dim = int(vectors.shape[1])
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_L1
    num_gpus = getattr(faiss, "get_num_gpus", lambda: 0)()
    if num_gpus > 0 and hasattr(faiss, "StandardGpuResources"):
        try:
            resources = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlat(dim, faiss_metric))
            gpu_index.add(vectors)
            return gpu_index, resources
        except Exception:  # any GPU failure: use the CPU index
            pass
    index = faiss.IndexFlat(dim, faiss_metric)
    index.add(vectors)
    return index, None


class PatchMemory:
    """Kept normal patch vectors and the exact 1-NN distance of new patches to them.

    Use::

        memory = PatchMemory.fit(embeddings, fraction=0.1)     # (N, D, h, w) of train images
        dist = memory.distances(patch_embedding(feats))        # (N', h, w)

    State (:meth:`state_tensors`): ``bank`` (M, D) float32, ``image_of`` (M,) int64 (which
    training image each kept patch came from, ascending), ``grid`` (h, w), ``radius`` and
    ``coreset_seconds``.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        image_of: torch.Tensor,
        grid: tuple[int, int],
        radius: float = 0.0,
        coreset_seconds: float = 0.0,
    ) -> None:
        bank = bank.detach().float().cpu().contiguous()
        image_of = image_of.detach().to(torch.int64).cpu().contiguous()
        if bank.ndim != 2 or bank.shape[0] < 1 or image_of.shape != (bank.shape[0],):
            raise EdgeADError(
                f"patch memory state is inconsistent: bank {tuple(bank.shape)}, "
                f"image_of {tuple(image_of.shape)}"
            )
        if not bool(torch.isfinite(bank).all()):
            raise EdgeADError("patch memory contains NaN or infinite values")
        if bool((image_of[1:] < image_of[:-1]).any()):
            raise EdgeADError("patch memory state is inconsistent: image_of is not sorted")
        self.bank, self.image_of = bank, image_of
        self.grid = (int(grid[0]), int(grid[1]))
        self.radius, self.coreset_seconds = float(radius), float(coreset_seconds)
        self._array = bank.numpy()
        self._index, self._gpu_resources = exact_index(self._array)

    # ---- fitting --------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        embeddings: torch.Tensor,
        fraction: float = 0.1,
        projection_dim: int | None = 128,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        max_patches: int | None = None,
    ) -> PatchMemory:
        """Keep a greedy coreset of ``fraction`` of the patches of ``embeddings``
        (N, D, h, w), the patch vectors of N normal training images, and at most
        ``max_patches`` of them (None = no cap)."""
        if embeddings.ndim != 4 or embeddings.shape[0] < 1:
            raise EdgeADError(f"patch embeddings must be (N, D, h, w), got {embeddings.shape}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"coreset fraction must be in (0, 1], got {fraction}")
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"max_patches must be positive, got {max_patches}")
        h, w = embeddings.shape[-2:]
        flat = flatten_patches(embeddings)
        count = max(1, round(fraction * flat.shape[0]))
        if max_patches is not None:
            count = min(count, max_patches)
        coreset = greedy_coreset(flat, count, projection_dim, seed, dtype=dtype)
        image_of = torch.div(coreset.indices, h * w, rounding_mode="floor")
        return cls(flat[coreset.indices], image_of, (h, w), coreset.radius, coreset.seconds)

    # ---- inference ------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def _queries(self, embedding: torch.Tensor) -> tuple[np.ndarray, tuple[int, int, int]]:
        if embedding.ndim != 4 or embedding.shape[1] != self.dim:
            raise EdgeADError(
                f"patch embeddings of shape {tuple(embedding.shape)} do not fit a memory of "
                f"{self.dim}-dim patches; was the backbone or image size changed?"
            )
        n, _, h, w = embedding.shape
        q = flatten_patches(embedding.detach()).float().cpu().numpy()
        return np.ascontiguousarray(q), (n, h, w)

    def distances(self, embedding: torch.Tensor) -> torch.Tensor:
        """L2 distance of each patch to its nearest kept patch: (N, D, h, w) → (N, h, w)."""
        q, shape = self._queries(embedding)
        if q.shape[0] == 0:
            return torch.zeros(shape)
        sq, _ = self._index.search(q, 1)
        return torch.from_numpy(np.sqrt(np.maximum(sq[:, 0], 0.0))).reshape(shape)

    def distances_excluding(self, embedding: torch.Tensor, images: Sequence[int]) -> torch.Tensor:
        """:meth:`distances` for training images (N, D, h, w), image i against the memory
        without the patches image ``images[i]`` contributed (leave-one-image-out).

        Exact and fast: a plain (BLAS) search for the k nearest kept patches, taking the first
        that is not the image's own; only patches whose k nearest are all their own search
        deeper, and the rare rest with a faiss ID selector (which scans without BLAS).
        """
        q, shape = self._queries(embedding)
        if len(images) != shape[0]:
            raise ValueError(f"{len(images)} image ids for {shape[0]} embeddings")
        per_image = shape[1] * shape[2]
        owner = torch.as_tensor(list(images), dtype=torch.int64).repeat_interleave(per_image)
        lo = torch.searchsorted(self.image_of, owner, right=False).numpy()
        hi = torch.searchsorted(self.image_of, owner, right=True).numpy()
        if np.any(hi - lo >= len(self.image_of)):
            raise EdgeADError("cannot leave out the only image in the patch memory")
        best = np.full(len(q), np.inf, dtype=np.float64)
        pending = np.arange(len(q))
        for k in (1, 16, 256):
            if not len(pending):
                break
            k = min(k, len(self.image_of))
            sq, idx = self._index.search(q[pending], k)
            own = (idx >= lo[pending, None]) & (idx < hi[pending, None])
            nearest = np.where(own, np.inf, sq).min(axis=1)
            found = np.isfinite(nearest)
            best[pending[found]] = nearest[found]
            pending = pending[~found]
        for i in pending:  # every one of 256 neighbours is the image's own: scan the rest
            rest = np.concatenate([self._array[: lo[i]], self._array[hi[i] :]])
            best[i] = float(((rest - q[i]) ** 2).sum(axis=1).min())
        return torch.from_numpy(np.sqrt(np.maximum(best, 0.0))).reshape(shape)

    # ---- state ----------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "bank": self.bank,
            "image_of": self.image_of,
            "grid": torch.tensor(self.grid, dtype=torch.int64),
            "radius": torch.tensor([self.radius], dtype=torch.float64),
            "coreset_seconds": torch.tensor([self.coreset_seconds], dtype=torch.float64),
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> PatchMemory:
        try:
            grid = [int(v) for v in state["grid"].reshape(-1).tolist()]
            if len(grid) != 2:
                raise EdgeADError(f"patch memory grid must be (h, w), got {grid}")
            return cls(
                state["bank"],
                state["image_of"],
                (grid[0], grid[1]),
                float(state["radius"].reshape(-1)[0]),
                float(state.get("coreset_seconds", torch.zeros(1)).reshape(-1)[0]),
            )
        except KeyError as exc:
            raise EdgeADError(f"patch memory state is missing {exc.args[0]!r}") from None


def embed_images(
    images: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    to_input: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Patch embeddings (N, D, h, w) of uint8 images, on the CPU, in batches: ``embed`` maps
    a batch (after ``to_input``) to its patch vectors."""
    out = []
    with torch.no_grad():
        for b in images.split(batch_size):
            out.append(embed(to_input(b)).cpu())
            if progress:
                progress(len(b))
    return torch.cat(out)
