"""DIC (Algorithm 2): pooling, KNN with self-match exclusion, bins, T̂ rounding, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_ad.d3ad.severity import (
    SeverityIndex,
    bin_of_distances,
    pool_features,
    timestep_for_bin,
    timesteps_for_bins,
    timesteps_for_distances,
)
from edge_ad.errors import EdgeADError


def _brute_l1(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.abs(q[:, None, :].astype(np.float64) - x[None, :, :]).sum(-1)


def test_pool_features_shape_and_values():
    feat = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = pool_features(feat, size=16)
    assert out.dtype == np.float32 and out.shape == (2, 3 * 16 * 16)
    assert out.flags["C_CONTIGUOUS"]
    expected = feat.reshape(2, 3, 16, 2, 16, 2).mean(dim=(3, 5)).reshape(2, -1).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    both = pool_features([feat, feat[:, :1]], size=4)
    assert both.shape == (2, 3 * 16 + 16)


def test_fit_excludes_self_match():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    idx = SeverityIndex().fit(x, k=5, num_bins=10)
    d = _brute_l1(x, x)
    np.fill_diagonal(d, np.inf)
    expected = np.sort(d, axis=1)[:, :5].mean(axis=1)
    np.testing.assert_allclose(idx.train_distances, expected, rtol=1e-5)
    assert idx.k == 5
    assert (idx.train_distances > 0).all()  # no zero self-distance mixed in


def test_fit_with_duplicates_drops_exactly_one_zero():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 4)).astype(np.float32)
    x = np.concatenate([base, base[:1], base[:1]])  # three copies of row 0
    idx = SeverityIndex().fit(x, k=3)
    d = _brute_l1(x, x)
    np.fill_diagonal(d, np.inf)
    expected = np.sort(d, axis=1)[:, :3].mean(axis=1)
    np.testing.assert_allclose(idx.train_distances, expected, rtol=1e-5, atol=1e-6)
    # Row 0 has two true twins at distance 0 and one real neighbour.
    assert idx.train_distances[0] == pytest.approx(expected[0])
    # Many duplicates (more than K+1): all zero, must not crash.
    many = np.repeat(base[:1], 10, axis=0)
    idx2 = SeverityIndex().fit(np.concatenate([many, base[1:]]), k=3)
    assert np.all(idx2.train_distances[:10] == 0)


def test_small_training_sets():
    x = np.array([[0.0, 0.0], [1.0, 2.0], [4.0, 0.0]], dtype=np.float32)
    idx = SeverityIndex().fit(x, k=20)
    assert idx.k == 2  # k = min(k, n - 1)
    np.testing.assert_allclose(idx.train_distances, [(3 + 4) / 2, (3 + 5) / 2, (4 + 5) / 2])
    with pytest.raises(EdgeADError):
        SeverityIndex().fit(x[:1], k=20)


def test_mean_knn_distance_no_exclusion():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    q = rng.normal(size=(5, 6)).astype(np.float32)
    idx = SeverityIndex().fit(x, k=7)
    expected = np.sort(_brute_l1(q, x), axis=1)[:, :7].mean(axis=1)
    np.testing.assert_allclose(idx.mean_knn_distance(q), expected, rtol=1e-5)
    # A train vector queried as a new image includes its own zero.
    got = idx.mean_knn_distance(x[:1])[0]
    assert got == pytest.approx(np.sort(_brute_l1(x[:1], x)[0])[:7].mean(), rel=1e-5)
    with pytest.raises(EdgeADError):
        idx.mean_knn_distance(q[:, :3])


def test_bins_equal_width_and_edges():
    d = np.array([0.0, 1.0, 2.0, 10.0])
    edges = np.histogram_bin_edges(d, bins=10)  # 0, 1, ..., 10
    got = bin_of_distances([-5.0, 0.0, 0.5, 1.0, 9.99, 10.0, 99.0], edges)
    np.testing.assert_array_equal(got, [1, 1, 1, 2, 10, 10, 10])
    rng = np.random.default_rng(3)
    idx = SeverityIndex().fit(rng.normal(size=(50, 5)).astype(np.float32), k=4, num_bins=10)
    edges = idx.bin_edges
    assert edges.shape == (11,)
    assert edges[0] == pytest.approx(idx.train_distances.min())
    assert edges[-1] == pytest.approx(idx.train_distances.max())
    np.testing.assert_allclose(np.diff(edges), np.diff(edges)[0])
    bins = idx.bin_of(idx.train_distances)
    assert bins.min() >= 1 and bins.max() == 10
    counts = np.bincount(bins, minlength=11)[1:]
    np.testing.assert_array_equal(counts, idx.histogram)  # same convention as np.histogram


@pytest.mark.parametrize(
    ("b", "t_hat"),
    [
        (0, 20),
        (1, 20),
        (2, 20),
        (3, 20),
        (4, 30),
        (5, 40),
        (6, 50),
        (7, 60),
        (8, 60),
        (9, 70),
        (10, 80),
        (11, 80),
    ],
)
def test_timestep_for_bin(b, t_hat):
    assert timestep_for_bin(b, num_bins=10, t_max=80, min_bin=2, round_to=10) == t_hat


def test_timestep_rounding_half_up_and_floor_at_round_to():
    # 3/10 * 50 = 15 exactly: ties round up (reference `roundup`), no float artefacts.
    assert timestep_for_bin(3, t_max=50) == 20
    assert timestep_for_bin(5, t_max=50) == 30  # 25 -> 30
    # Tiny T_max never yields T̂ = 0: always at least round_to.
    assert timestep_for_bin(2, t_max=20) == 10
    assert timestep_for_bin(1, t_max=5) == 10
    for t_max in (10, 20, 37, 80, 100, 250):
        ts = timesteps_for_bins(np.arange(0, 12), t_max=t_max)
        assert (ts % 10 == 0).all() and (ts >= 10).all()
        assert [timestep_for_bin(b, t_max=t_max) for b in range(12)] == ts.tolist()


def test_timesteps_for_distances_and_index_pipeline():
    edges = np.linspace(0.0, 10.0, 11)
    got = timesteps_for_distances([0.1, 4.5, 9.5, 50.0], edges, t_max=80)
    np.testing.assert_array_equal(got, [20, 40, 80, 80])
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 5)).astype(np.float32)
    idx = SeverityIndex().fit(x, k=5)
    far = x[:2] + 100.0
    np.testing.assert_array_equal(idx.timesteps(far, t_max=80), [80, 80])


def test_state_roundtrip_rebuilds_index():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(25, 7)).astype(np.float32)
    q = rng.normal(size=(4, 7)).astype(np.float32)
    idx = SeverityIndex().fit(x, k=6, num_bins=10)
    state = idx.state_dict()
    assert set(state) == {
        "train_vectors",
        "bin_edges",
        "train_distances",
        "histogram",
        "k",
        "num_bins",
    }
    # as the lead would store it: everything as arrays
    arrays = {k: np.asarray(v) for k, v in state.items()}
    back = SeverityIndex.from_state(arrays)
    assert back.k == 6 and back.num_bins == 10
    np.testing.assert_array_equal(back.bin_edges, idx.bin_edges)
    np.testing.assert_allclose(back.mean_knn_distance(q), idx.mean_knn_distance(q))
    np.testing.assert_array_equal(back.timesteps(q), idx.timesteps(q))
    with pytest.raises(EdgeADError):
        SeverityIndex.from_state({"bin_edges": state["bin_edges"]})
    with pytest.raises(EdgeADError):
        SeverityIndex().mean_knn_distance(q)


def test_gpu_failure_falls_back_to_cpu(monkeypatch):
    import faiss

    def broken_resources():
        raise RuntimeError("no GPU here")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", broken_resources, raising=False)
    x = np.random.default_rng(6).normal(size=(10, 3)).astype(np.float32)
    idx = SeverityIndex().fit(x, k=3)
    assert isinstance(idx._index, faiss.IndexFlat) and idx._gpu_resources is None
    assert idx.mean_knn_distance(x[:2]).shape == (2,)
