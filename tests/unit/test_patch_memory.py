"""The patch memory: coreset, nearest-neighbour map, leave-one-image-out, state round trips,
patch-mode severity bins, and the ``knn`` method built on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_ad.bundle import load_bundle, save_bundle
from edge_ad.config import load_settings
from edge_ad.d3ad.observer import HistoryObserver
from edge_ad.d3ad.severity import SeverityBins, patch_severity, timesteps_for_bins
from edge_ad.data.synthetic import SyntheticProduct
from edge_ad.detector import leave_out_ids
from edge_ad.engine import as_chw
from edge_ad.errors import EdgeADError
from edge_ad.knn.detector import PatchKNN
from edge_ad.patch_memory import PatchMemory, greedy_coreset, patch_embedding


def _naive_greedy(x: torch.Tensor, count: int, first: int) -> list[int]:
    """The textbook k-center loop: one full pass per chosen point."""
    d = ((x - x[first]) ** 2).sum(1)
    chosen = [first]
    while len(chosen) < count:
        j = int(d.argmax())
        chosen.append(j)
        d = torch.minimum(d, ((x - x[j]) ** 2).sum(1))
    return sorted(chosen)


def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=g) * 5
    which = torch.randint(12, (n,), generator=g)
    return centres[which] + torch.randn(n, dim, generator=g) * torch.rand(n, 1, generator=g)


def test_coreset_covers_every_point_within_its_radius() -> None:
    x = _clustered(3000, 16, 0)
    coreset = greedy_coreset(x, 150, projection_dim=None, seed=3, candidates=64)
    assert len(coreset.indices) == 150 and len(set(coreset.indices.tolist())) == 150
    nearest = torch.cdist(x.double(), x[coreset.indices].double()).min(dim=1).values
    assert float(nearest.max()) <= coreset.radius * (1 + 1e-5) + 1e-6
    # The radius is attained (it is the covering radius, not a loose bound).
    assert float(nearest.max()) == pytest.approx(coreset.radius, rel=1e-4)


def test_blocked_coreset_makes_the_textbook_greedy_choices() -> None:
    x = _clustered(2000, 8, 1)
    coreset = greedy_coreset(x, 120, projection_dim=None, seed=5, candidates=32)
    first = int(torch.randint(2000, (1,), generator=torch.Generator().manual_seed(5)))
    assert coreset.indices.tolist() == _naive_greedy(x, 120, first)


def test_max_patches_caps_the_memory_and_keeps_it_a_greedy_coreset() -> None:
    embeddings = _clustered(6 * 64, 8, 2).T.reshape(8, 6, 8, 8).permute(1, 0, 2, 3)
    capped = PatchMemory.fit(embeddings, fraction=0.5, projection_dim=None, max_patches=40)
    uncapped = PatchMemory.fit(embeddings, fraction=0.5, projection_dim=None)
    assert len(capped.bank) == 40 and len(uncapped.bank) == 192
    # Greedy k-center is a prefix process: the capped memory is the first 40 choices, so its
    # covering radius can only be larger.
    assert capped.radius >= uncapped.radius
    assert set(map(tuple, capped.bank.tolist())) <= set(map(tuple, uncapped.bank.tolist()))
    small = PatchMemory.fit(embeddings, fraction=0.05, projection_dim=None, max_patches=40)
    assert len(small.bank) == round(0.05 * 6 * 64)  # below the cap: the fraction decides
    with pytest.raises(ValueError, match="max_patches"):
        PatchMemory.fit(embeddings, fraction=0.5, max_patches=0)


def test_coreset_of_everything_keeps_everything() -> None:
    x = torch.randn(10, 4)
    coreset = greedy_coreset(x, 10)
    assert coreset.indices.tolist() == list(range(10)) and coreset.radius == 0.0


def _embeddings(n: int, seed: int) -> torch.Tensor:
    """(n, 8, 4, 4) patch vectors of n 'images'."""
    return _clustered(n * 16, 8, seed).reshape(n, 4, 4, 8).permute(0, 3, 1, 2).contiguous()


def test_unseen_patch_scores_higher_than_every_seen_one() -> None:
    train = _embeddings(20, 2)
    memory = PatchMemory.fit(train, fraction=0.25, projection_dim=None)
    seen = memory.distances(train)
    assert seen.shape == (20, 4, 4)
    assert float(seen.max()) <= memory.radius * (1 + 1e-5) + 1e-5
    frame = train[:1].clone()
    frame[0, :, 2, 1] = 40.0  # one patch unlike anything in training
    dist = memory.distances(frame)[0]
    assert float(dist[2, 1]) > float(seen.max())
    assert int(dist.argmax()) == 2 * 4 + 1


def test_leave_one_image_out_ignores_the_images_own_patches() -> None:
    train = _embeddings(6, 4)
    memory = PatchMemory.fit(train, fraction=1.0)  # every patch kept: distances are exact
    assert torch.all(memory.distances(train) < 1e-3)  # each patch finds itself
    together = memory.distances_excluding(train[[0, 3, 5]], [0, 3, 5])
    for row, image in enumerate((0, 3, 5)):
        got = together[row]
        own = train[image].permute(1, 2, 0).reshape(-1, 8)
        others = torch.cat([train[i] for i in range(6) if i != image], dim=1)
        others = others.permute(1, 2, 0).reshape(-1, 8)
        want = torch.cdist(own.double(), others.double()).min(dim=1).values.reshape(4, 4)
        assert torch.allclose(got.double(), want, atol=1e-3)
        assert float(got.min()) > 0


def test_leave_one_out_finds_other_images_behind_hundreds_of_own_patches() -> None:
    # Each image is its own tight cluster, far from the others: every one of a patch's 256
    # nearest kept patches is its own, so the search must look past all of them.
    g = torch.Generator().manual_seed(0)
    train = torch.randn(3, 4, 20, 20, generator=g) * 0.01
    train += torch.arange(3).float().view(3, 1, 1, 1) * 10.0
    memory = PatchMemory.fit(train, fraction=1.0)
    got = memory.distances_excluding(train[[1]], [1])[0]
    mine = train[1].permute(1, 2, 0).reshape(-1, 4).double()
    others = torch.cat([train[0], train[2]], dim=1).permute(1, 2, 0).reshape(-1, 4).double()
    want = torch.cdist(mine, others).min(dim=1).values.reshape(20, 20)
    assert torch.allclose(got.double(), want, rtol=1e-4)
    assert float(got.min()) > 15  # the nearest other image is ~20 away (2·10 per axis)


def test_memory_state_round_trips_and_rejects_bad_state() -> None:
    train = _embeddings(5, 6)
    memory = PatchMemory.fit(train, fraction=0.5, projection_dim=4)
    again = PatchMemory.from_state(memory.state_tensors())
    query = _embeddings(2, 7)
    assert torch.equal(memory.distances(query), again.distances(query))
    assert again.grid == (4, 4) and again.radius == memory.radius
    with pytest.raises(EdgeADError, match="do not fit a memory"):
        memory.distances(torch.zeros(1, 5, 4, 4))
    state = memory.state_tensors()
    with pytest.raises(EdgeADError, match="missing 'bank'"):
        PatchMemory.from_state({k: v for k, v in state.items() if k != "bank"})
    with pytest.raises(EdgeADError, match="NaN"):
        PatchMemory.from_state(state | {"bank": state["bank"] * math.nan})


def test_patch_embedding_shapes_and_neighbourhood() -> None:
    fine, coarse = torch.ones(2, 3, 8, 8), torch.ones(2, 5, 4, 4)
    emb = patch_embedding([fine, coarse])
    assert emb.shape == (2, 8, 8, 8)
    # Zero padding counted at the border (PatchCore's AvgPool2d): corners see 4 of 9 pixels.
    assert float(emb[0, 0, 0, 0]) == pytest.approx(4 / 9)
    assert float(emb[0, 0, 4, 4]) == pytest.approx(1.0)


def test_leave_out_ids_are_spread_and_bounded() -> None:
    assert leave_out_ids(10, 4).tolist() == [0, 3, 6, 9]
    assert leave_out_ids(3, 200).tolist() == [0, 1, 2]
    assert leave_out_ids(1, 5).size == 0 and leave_out_ids(10, 0).size == 0


def test_patch_severity_and_its_bins_on_known_distances() -> None:
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, :2] = torch.tensor([4.0, 2.0])  # top-2 mean 3
    maps[1] += 1.0  # top-2 mean 1
    maps[2, 3, 3] = 10.0  # top-2 mean 5
    assert patch_severity(maps, top_k=2).tolist() == [3.0, 1.0, 5.0]
    # Normals 0..10 → 10 bins of width 1; beyond the normal maximum → the deepest bin.
    bins = SeverityBins().fit(np.arange(11.0), num_bins=10)
    assert bins.bin_of([0.0, 0.5, 3.2, 9.9, 10.0, 50.0]).tolist() == [1, 1, 4, 10, 10, 10]
    t_hat = timesteps_for_bins(bins.bin_of([0.5, 3.2, 50.0]), 10, 80, 2, 10)
    assert t_hat.tolist() == [20, 30, 80]
    again = SeverityBins.from_state(bins.state_dict())
    assert np.array_equal(again.bin_edges, bins.bin_edges)
    assert again.histogram.tolist() == bins.histogram.tolist()


def _product_frames(indices: range, defect: str | None = None) -> torch.Tensor:
    product = SyntheticProduct("knn-pcb", image_size=64, seed=0)
    return as_chw(np.stack([product.render(i, defect)[0] for i in indices]))


@pytest.fixture(scope="module")
def knn() -> tuple[PatchKNN, HistoryObserver]:
    settings = load_settings("tiny", method="knn")
    detector = PatchKNN.build(settings)
    history = HistoryObserver()
    detector.fit(_product_frames(range(24)), _product_frames(range(24, 30)), history)
    return detector, history


def test_knn_fits_only_the_memory_and_calibrates_on_leave_one_out(
    knn: tuple[PatchKNN, HistoryObserver],
) -> None:
    detector, history = knn
    assert set(history.stages) == {"memory", "calibration"}
    assert history.stages["memory"]["memory_images"] == 24
    # 6 validation normals + leave-one-out scores of all 24 training images.
    assert history.stages["calibration"]["calibration_images"] == 30
    assert detector.weight_parts().keys() == {"backbone"}
    assert not detector.generative and detector.is_fitted


def test_knn_scores_defects_above_normals(knn: tuple[PatchKNN, HistoryObserver]) -> None:
    detector, _ = knn
    normal = detector.predict(_product_frames(range(40, 46)))
    defects = [detector.predict(_product_frames(range(50, 53), d)) for d in ("stain", "crack")]
    worst_normal = float(normal.scores.max())
    assert all(float(p.scores.min()) > worst_normal for p in defects)
    assert normal.reconstructions is None and torch.all(normal.timesteps == 0)


def test_knn_bundle_round_trip_gives_identical_scores(
    knn: tuple[PatchKNN, HistoryObserver], tmp_path
) -> None:
    detector, _ = knn
    frames = _product_frames(range(60, 64), "scratch")
    save_bundle(detector, tmp_path / "b", "knn-pcb")
    loaded = load_bundle(tmp_path / "b", device="cpu")
    assert loaded.method == "knn"
    assert torch.equal(detector.predict(frames).scores, loaded.detector.predict(frames).scores)
    assert loaded.detector.threshold == detector.threshold
