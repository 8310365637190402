"""Synthetic anomalies on normal frames (DiffusionAD §3.4, Eq. 12, after DRAEM):

    S = β·(M ⊙ N) + (1 − β)·(M ⊙ A) + M̄ ⊙ N,        β ~ U(0.2, 0.8)

N is a normal frame, M a binary Perlin-noise mask and A an anomaly texture. The paper takes A
from DTD (a download) or from the frame itself (shuffled strips); nothing may download here,
so A is either a GENERATED texture (fractal Perlin colour noise, stripes, checks, blotches,
with the paper's colour augmentations) or the frame's own shuffled strips (self-augmentation).
Masks follow the reference code: Perlin noise at 2^k × 2^l cells (k, l ∈ 0..5), rotated,
thresholded at 0.5; an empty mask is drawn again.

DiffusionAD trains its segmentation network on them; D3AD's calibration scores its fused map
on them to choose how much the reconstruction term may weigh.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PERLIN_THRESHOLD = 0.5
MAX_SCALE_EXPONENT = 6  # cells per side 2^k, k ∈ [0, 6)
MIN_TEXTURE_CONTRAST = 12.0  # mean |A − N| (grey levels) under the mask for a visible anomaly


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(
    shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``cells`` lattice cells per axis, scaled by
    √2 to about [−1, 1] like the reference's ``rand_perlin_2d_np`` (so its 0.5 threshold
    keeps the same share of the frame). Any shape: the lattice is sampled at fractional
    positions."""
    h, w = shape
    cy, cx = max(1, int(cells[0])), max(1, int(cells[1]))
    angles = 2 * np.pi * rng.random((cy + 1, cx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0, cy, h, endpoint=False)
    x = np.linspace(0, cx, w, endpoint=False)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = yy - y0, xx - x0

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grads[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    return np.sqrt(2.0) * (top * (1 - uy) + bottom * uy)


def perlin_mask(
    size: int, rng: np.random.Generator, threshold: float = PERLIN_THRESHOLD, tries: int = 50
) -> np.ndarray:
    """A binary (size, size) float32 mask: random-scale Perlin noise, rotated ±90°, > threshold.
    Drawn again while empty (at most ``tries`` times; then one random blob is used)."""
    for _ in range(tries):
        ky, kx = rng.integers(0, MAX_SCALE_EXPONENT, size=2)
        noise = perlin_noise((size, size), (2**ky, 2**kx), rng)
        angle = float(rng.uniform(-90, 90))
        noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="reflect")
        mask = (noise > threshold).astype(np.float32)
        if mask.any():
            return mask
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
    return (((yy - cy) ** 2 + (xx - cx) ** 2) < (size / 8) ** 2).astype(np.float32)


def _fractal(size: int, rng: np.random.Generator, octaves: int = 4) -> np.ndarray:
    out = np.zeros((size, size))
    for o in range(octaves):
        cells = 2 ** (o + int(rng.integers(1, 3)))
        out += perlin_noise((size, size), (cells, cells), rng) / 2**o
    out -= out.min()
    return out / max(out.max(), 1e-8)


def generated_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random texture, uint8 (size, size, 3): DTD's role without the download."""
    kind = int(rng.integers(0, 4))
    yy, xx = np.mgrid[:size, :size] / size
    if kind == 0:  # fractal noise, one colour ramp
        base = _fractal(size, rng)
    elif kind == 1:  # stripes at a random angle and period, perturbed
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.02, 0.2)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
        base = 0.5 + 0.5 * np.sin(2 * np.pi * phase + 3 * _fractal(size, rng, 2))
    elif kind == 2:  # checks / weave
        period = rng.uniform(0.03, 0.15)
        base = ((np.floor(xx / period) + np.floor(yy / period)) % 2) * 0.7 + 0.3 * _fractal(
            size, rng, 2
        )
    else:  # blotches: thresholded noise with soft edges
        base = ndimage.gaussian_filter((_fractal(size, rng) > 0.5).astype(float), 1.5)
    low, high = rng.integers(0, 256, size=(2, 3))
    rgb = low[None, None] + base[..., None] * (high - low)[None, None]
    return _colour_augment(np.clip(rgb, 0, 255).astype(np.uint8), rng)


def _colour_augment(img: np.ndarray, rng: np.random.Generator, n: int = 3) -> np.ndarray:
    """Three of the reference's augmentations: gamma, brightness, invert, posterize, solarize,
    equalize-like contrast stretch, hue shift (channel roll)."""
    out = img.astype(np.float32)
    for op in rng.choice(7, size=n, replace=False):
        if op == 0:
            out = 255.0 * (out / 255.0) ** rng.uniform(0.5, 2.0)
        elif op == 1:
            out = out * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
        elif op == 2:
            out = 255.0 - out
        elif op == 3:
            bits = int(rng.integers(2, 6))
            out = np.floor(out / 2 ** (8 - bits)) * 2 ** (8 - bits)
        elif op == 4:
            out = np.where(out > rng.uniform(64, 192), 255.0 - out, out)
        elif op == 5:
            lo, hi = np.percentile(out, [2, 98])
            out = (out - lo) / max(hi - lo, 1.0) * 255.0
        else:
            out = np.roll(out, int(rng.integers(1, 3)), axis=-1)
        out = np.clip(out, 0, 255)
    return out.astype(np.uint8)


def shuffled_strips(img: np.ndarray, rng: np.random.Generator, grid: int = 8) -> np.ndarray:
    """Self-augmentation: the frame, colour-augmented, with an 8×8 grid of strips shuffled in
    width and then in height (the reference's second anomaly source)."""
    out = _colour_augment(img, rng)
    size = out.shape[0]
    step = max(1, size // grid)
    cols = [out[:, i : i + step] for i in range(0, size, step)]
    out = np.concatenate([cols[i] for i in rng.permutation(len(cols))], axis=1)
    rows = [out[i : i + step] for i in range(0, size, step)]
    return np.concatenate([rows[i] for i in rng.permutation(len(rows))], axis=0)


def synthesize_anomaly(
    image: np.ndarray, rng: np.random.Generator, beta_range: tuple[float, float] = (0.2, 0.8)
) -> tuple[np.ndarray, np.ndarray]:
    """(S, M) for a normal uint8 frame (H, W, 3): Eq. 12 with a Perlin mask and a generated
    texture or the frame's shuffled strips (half each)."""
    size = image.shape[0]
    mask = perlin_mask(size, rng)
    normal = image.astype(np.float32)
    texture = (
        generated_texture(size, rng) if rng.random() < 0.5 else shuffled_strips(image, rng)
    ).astype(np.float32)
    inside = mask > 0
    if np.abs(texture[inside] - normal[inside]).mean() < MIN_TEXTURE_CONTRAST:
        # The frame's own strips can look just like the frame (a plain surface): a label with
        # nothing visible under it would teach the network noise. Use a generated texture.
        texture = generated_texture(size, rng).astype(np.float32)
    beta = rng.uniform(*beta_range)
    m = mask[..., None]
    out = beta * m * normal + (1 - beta) * m * texture + (1 - m) * normal
    return np.clip(out, 0, 255).round().astype(np.uint8), mask
