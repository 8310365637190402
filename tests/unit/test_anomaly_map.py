"""Anomaly map: distances, frozen normalization, Gaussian blur vs scipy, image score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from edge_ad.d3ad.anomaly_map import (
    MapNormalizer,
    feature_distance,
    gaussian_blur,
    gaussian_kernel1d,
    image_score,
    latent_distance,
)
from edge_ad.errors import EdgeADError


def test_latent_distance_mean_abs_and_upsampled():
    z0 = torch.zeros(2, 4, 4, 4)
    z_hat = torch.zeros(2, 4, 4, 4)
    z_hat[0, :2] = 2.0  # mean over 4 channels of |diff| = 1 everywhere in image 0
    d = latent_distance(z0, z_hat, 32)
    assert d.shape == (2, 1, 32, 32)
    torch.testing.assert_close(d[0], torch.ones(1, 32, 32))
    torch.testing.assert_close(d[1], torch.zeros(1, 32, 32))
    same = latent_distance(z0, z_hat, (4, 4))
    torch.testing.assert_close(same, (z0 - z_hat).abs().mean(1, keepdim=True))
    assert latent_distance(z0, z_hat, (16, 24)).shape == (2, 1, 16, 24)


def test_feature_distance_identical_and_opposite():
    g = torch.Generator().manual_seed(0)
    f1 = [torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 16, 4, 4, generator=g)]
    zero = feature_distance(f1, [f.clone() for f in f1], 32)
    assert zero.shape == (2, 1, 32, 32)
    torch.testing.assert_close(zero, torch.zeros_like(zero), atol=1e-6, rtol=0)
    opposite = feature_distance(f1, [-f for f in f1], 32)
    torch.testing.assert_close(opposite, torch.full_like(opposite, 4.0))  # 2 per layer, 2 layers
    one_layer = feature_distance(f1[:1], [-f1[0]], 8)
    torch.testing.assert_close(one_layer, torch.full_like(one_layer, 2.0))


def test_gaussian_kernel_matches_scipy_size():
    k = gaussian_kernel1d(4.0)
    assert k.numel() == 33  # radius int(4*4 + 0.5) = 16
    assert k.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(40, 52), (9, 7)])  # also maps smaller than the radius
def test_gaussian_blur_equals_scipy(shape):
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, *shape)).astype(np.float32)
    x[0, 0, 3, 5] = 30.0
    got = gaussian_blur(torch.from_numpy(x), sigma=4.0).numpy()
    for i in range(2):
        want = gaussian_filter(x[i, 0].astype(np.float64), sigma=4, truncate=4.0, mode="reflect")
        np.testing.assert_allclose(got[i, 0], want, atol=1e-4, rtol=0)
    t = torch.from_numpy(x)
    assert gaussian_blur(t, sigma=0) is t  # sigma 0 disables the blur


def _fitted(seed: int = 0) -> tuple[MapNormalizer, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    la = torch.rand(5, 1, 16, 16, generator=g) * 3 + 1
    fa = torch.rand(5, 1, 16, 16, generator=g) * 0.2
    return MapNormalizer().fit(la, fa), la, fa


def test_normalizer_uses_only_fitted_statistics():
    norm, la, fa = _fitted()
    la64, fa64 = la.double(), fa.double()
    mu_l, sd_l = la64.mean().item(), la64.std(unbiased=False).item()
    mu_f, sd_f = fa64.mean().item(), fa64.std(unbiased=False).item()
    assert norm.latent_mean == pytest.approx(mu_l) and norm.latent_std == pytest.approx(sd_l)
    assert norm.feature_mean == pytest.approx(mu_f) and norm.feature_std == pytest.approx(sd_f)

    g = torch.Generator().manual_seed(9)
    lb = torch.rand(3, 1, 16, 16, generator=g) * 50  # set B: a very different range
    fb = torch.rand(3, 1, 16, 16, generator=g)
    got = norm.combine(lb, fb, lam=0.85, sigma=0)
    want = 0.85 * (lb - mu_l) / sd_l + 0.15 * (fb - mu_f) / sd_f
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # Changing the rest of B does not change the transform of B's first frame.
    lb2, fb2 = lb.clone(), fb.clone()
    lb2[1:] *= 100.0
    fb2[1:] = -fb2[1:]
    torch.testing.assert_close(norm.combine(lb2, fb2)[:1], norm.combine(lb, fb)[:1])
    # ... and the blurred map is the blur of the combination.
    blurred = norm.combine(lb, fb, lam=0.85, sigma=4.0)
    torch.testing.assert_close(blurred, gaussian_blur(want.float(), 4.0), rtol=1e-4, atol=1e-4)


def test_normalizer_fit_accepts_batches_and_constant_maps():
    norm, la, fa = _fitted()
    batched = MapNormalizer().fit([la[:2], la[2:]], [fa[:3], fa[3:]])
    assert batched.to_arrays().keys() == norm.to_arrays().keys()
    for k, v in batched.to_arrays().items():
        np.testing.assert_allclose(v, norm.to_arrays()[k], rtol=1e-12)
    const = MapNormalizer().fit(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4))
    assert const.latent_std == 1.0 and const.feature_mean == 1.0
    with pytest.raises(EdgeADError):
        MapNormalizer().combine(la, fa)
    with pytest.raises(EdgeADError):
        MapNormalizer().fit([], fa)


def test_normalizer_state_roundtrip():
    norm, la, fa = _fitted()
    arrays = norm.to_arrays()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    back = MapNormalizer.from_arrays({k: torch.from_numpy(v) for k, v in arrays.items()})
    torch.testing.assert_close(back.combine(la, fa), norm.combine(la, fa))
    with pytest.raises(EdgeADError):
        MapNormalizer.from_arrays({"latent_mean": 0.0})


def test_image_score_is_max():
    amap = torch.zeros(3, 1, 8, 8)
    amap[0, 0, 2, 3] = 5.0
    amap[1] = -1.0
    amap[2, 0, 7, 7] = 0.5
    torch.testing.assert_close(image_score(amap), torch.tensor([5.0, -1.0, 0.5]))
    torch.testing.assert_close(MapNormalizer.image_score(amap), image_score(amap))
