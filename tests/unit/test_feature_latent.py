"""D3AD in the frozen feature space: the whitened projection, the corruption the denoiser is
trained to remove, reconstruction from T̂, and a bundle round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_ad.bundle import load_bundle, save_bundle
from edge_ad.config import load_settings
from edge_ad.d3ad.detector import D3AD
from edge_ad.d3ad.observer import HistoryObserver
from edge_ad.d3ad.reconstruct import alphas_cumprod, reconstruct_latents
from edge_ad.data.synthetic import SyntheticProduct
from edge_ad.engine import as_chw
from edge_ad.errors import ConfigError, EdgeADError
from edge_ad.models.corruption import corrupt_latents
from edge_ad.models.feature_codec import FeatureCodec

AC = alphas_cumprod()


def _embeddings(n: int = 6, d: int = 12, seed: int = 0) -> torch.Tensor:
    """Correlated features (N, d, 8, 8) with a non-zero mean and very unequal variances."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) * torch.linspace(0.1, 3.0, d)
    raw = torch.randn(n, 8, 8, d, generator=g) @ mixing.T + torch.linspace(-2, 2, d)
    return raw.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- projection


def test_projection_whitens_and_round_trips_with_every_channel() -> None:
    e = _embeddings()
    codec = FeatureCodec(12, 12, (5, 7))
    info = codec.fit(e.split(2))
    z = codec.encode(e)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 12)
    torch.testing.assert_close(flat.mean(0), torch.zeros(12), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(0), torch.ones(12), atol=1e-3, rtol=0)
    torch.testing.assert_close(codec.decode(z), e, atol=1e-3, rtol=1e-4)
    assert info["latent_explained_variance"] == pytest.approx(1.0)
    assert [p.shape[1] for p in codec.layers(e)] == [5, 7]


def test_fewer_channels_keep_the_largest_variance_directions() -> None:
    e = _embeddings()
    full, small = FeatureCodec(12, 12), FeatureCodec(12, 4)
    full.fit([e])
    info = small.fit([e])
    assert 0.5 < info["latent_explained_variance"] < 1.0
    # The 4 kept directions are the first 4 of the full basis (up to sign).
    overlap = (small.components @ full.components[:4].T).abs()
    torch.testing.assert_close(overlap, torch.eye(4), atol=1e-4, rtol=0)
    residual = (small.decode(small.encode(e)) - e).pow(2).mean()
    assert 0 < float(residual) < float((e - e.mean((0, 2, 3), keepdim=True)).pow(2).mean())


def test_projection_refuses_use_before_fit_and_bad_shapes() -> None:
    codec = FeatureCodec(12, 4)
    with pytest.raises(EdgeADError, match="not fitted"):
        codec.encode(_embeddings())
    with pytest.raises(EdgeADError, match="expected embeddings"):
        codec.fit([torch.zeros(2, 5, 4, 4)])
    with pytest.raises(EdgeADError, match="between 1 and"):
        FeatureCodec(12, 13)


# --------------------------------------------------------------------------- corruption


def _latents(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 6, 16, 16, generator=torch.Generator().manual_seed(1)) + 5.0


@pytest.mark.parametrize("kind", ["noise", "patches", "jitter"])
def test_corruption_changes_only_the_masked_rectangles(kind: str) -> None:
    z0 = _latents()
    out, mask = corrupt_latents(z0, kind, 1.0, (0.05, 0.2), 2, torch.Generator().manual_seed(0))
    inside = mask.expand_as(z0).bool()
    assert bool((mask.flatten(1).sum(1) > 0).all())  # probability 1: every latent corrupted
    assert torch.equal(out[~inside], z0[~inside])
    assert bool((out[inside] != z0[inside]).all())
    # Each sample's mask is a union of rectangles covering at most 2 × 20 % of the grid.
    assert float(mask.mean()) <= 0.4
    if kind == "noise":  # N(0, 1) replaces latents centred at 5
        assert abs(float(out[inside].mean())) < 1.0
    else:  # other images' patches or jittered values stay near the latents' own level
        assert abs(float(out[inside].mean()) - 5.0) < 1.0


def test_patches_come_from_another_latent() -> None:
    z0 = torch.arange(4.0)[:, None, None, None].expand(4, 3, 8, 8).clone()  # image i is all i
    out, mask = corrupt_latents(z0, "patches", 1.0, (0.1, 0.2), 1, torch.Generator())
    for i in range(4):
        values = out[i][mask[i].expand(3, 8, 8).bool()]
        assert values.numel() and bool((values == values[0]).all()) and float(values[0]) != i


def test_no_corruption_is_the_identity_and_probability_is_respected() -> None:
    z0 = _latents(200)
    same, mask = corrupt_latents(z0, "none", 1.0)
    assert torch.equal(same, z0) and not mask.any()
    _, mask = corrupt_latents(z0, "noise", 0.3, generator=torch.Generator().manual_seed(2))
    share = float((mask.flatten(1).sum(1) > 0).float().mean())
    assert 0.2 < share < 0.4
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_latents(z0, "blur")


def test_corruption_loss_asks_for_the_clean_latent() -> None:
    """A model that names ε* = (z_t − √ᾱ_t z0)/√(1−ᾱ_t) (removing it lands on the CLEAN z0)
    has zero loss; one that only names the added noise ε does not, where z̃0 ≠ z0."""
    from types import SimpleNamespace

    from edge_ad.models.unet import corrupted_diffusion_loss, make_noise_scheduler

    scheduler = make_noise_scheduler()
    abar_all = scheduler.alphas_cumprod
    z0 = _latents(3)
    corrupted, _ = corrupt_latents(z0, "noise", 1.0, generator=torch.Generator().manual_seed(3))

    def model(clean: torch.Tensor):
        def call(z_t: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
            abar = abar_all[t].float().reshape(-1, 1, 1, 1)
            return SimpleNamespace(sample=(z_t - abar.sqrt() * clean) / (1 - abar).sqrt())

        return call

    def loss(m) -> float:
        g = torch.Generator().manual_seed(7)
        return float(corrupted_diffusion_loss(m, scheduler, z0, corrupted, g, 100))

    assert loss(model(z0)) < 1e-6
    assert loss(model(corrupted)) > 1e-2  # "denoises" back onto the corruption: penalised


def test_corruption_setting_is_checked() -> None:
    s = load_settings("tiny", overrides=["unet.corruption=patches"])
    assert s.unet.corruption == "patches"
    with pytest.raises(ConfigError, match=r"unet\.corruption"):
        load_settings("tiny", overrides=["unet.corruption=blur"])
    with pytest.raises(ConfigError, match="corruption_area"):
        load_settings("tiny", overrides=["unet.corruption_area=[0.5, 0.1]"])
    with pytest.raises(ConfigError, match="D3AD's"):
        load_settings("tiny", method="ran", overrides=["latent.space=features"])


# --------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("eta", [0.0, 8.0])
def test_clean_feature_latent_with_an_oracle_eps_returns_itself(eta: float) -> None:
    """From √ᾱ_T̂·z0, a model that always names the exact noise of a clean z0 lands on z0."""
    codec = FeatureCodec(12, 8)
    codec.fit([_embeddings()])
    z0 = codec.encode(_embeddings(3, seed=5))

    def oracle(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = AC[t].reshape(-1, 1, 1, 1)
        return (z_t - abar.sqrt() * z0) / (1 - abar).sqrt()

    z_hat = reconstruct_latents(oracle, z0, [40, 80, 160], AC, steps=5, eta=eta)
    torch.testing.assert_close(z_hat, z0, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- the detector

QUICK = ["unet.epochs=2", "latent.space=features", "latent.channels=16"]


def _frames(indices: range, defect: str | None = None) -> torch.Tensor:
    product = SyntheticProduct("feat-pcb", image_size=64, seed=4)
    return as_chw(np.stack([product.render(i, defect)[0] for i in indices]))


@pytest.fixture(scope="module")
def feature_d3ad() -> tuple[D3AD, HistoryObserver]:
    settings = load_settings("tiny", overrides=[*QUICK, "unet.corruption=patches"])
    detector = D3AD.build(settings)
    history = HistoryObserver()
    detector.fit(_frames(range(20)), _frames(range(20, 25)), history)
    return detector, history


def test_feature_latent_trains_no_autoencoder_and_no_adaptation(feature_d3ad) -> None:
    detector, history = feature_d3ad
    assert "autoencoder" not in history.stages and "adapt" not in history.stages
    assert "unet" in history.stages and detector.codec.fitted
    assert set(detector.weight_parts()) == {"codec", "unet", "backbone"}
    assert detector.latent_shape() == (16, 8, 8)
    assert detector.unet.config.in_channels == 16
    pred = detector.predict(_frames(range(30, 33), "scratch"), return_reconstruction=True)
    assert pred.reconstructions is None  # no picture of x̂ in a feature space
    assert pred.maps.shape == (3, 64, 64) and torch.isfinite(pred.scores).all()


def test_feature_latent_round_trips_through_a_bundle(feature_d3ad, tmp_path) -> None:
    detector, _ = feature_d3ad
    save_bundle(detector, tmp_path / "b", "feat-pcb")
    loaded = load_bundle(tmp_path / "b").detector
    assert isinstance(loaded, D3AD) and loaded.feature_latent
    for name in ("mean", "components", "scale"):
        assert torch.equal(getattr(loaded.codec, name), getattr(detector.codec, name))
    frames = _frames(range(40, 44), "contamination")
    want, got = detector.predict(frames), loaded.predict(frames)
    torch.testing.assert_close(got.scores, want.scores)
    assert torch.equal(got.timesteps, want.timesteps)


def test_feature_term_compares_decoded_latents(feature_d3ad) -> None:
    detector, _ = feature_d3ad
    x = detector._checked_input(_frames(range(50, 52), "stain"))
    feats = detector.backbone(x)
    z0 = detector.encode(x, feats)
    f_same = detector.feature_map(x, feats, z0, z0, None)
    assert float(f_same.abs().max()) < 1e-5  # ẑ0 = z0: nothing changed, no distance
    f_other = detector.feature_map(x, feats, z0, z0.flip(0), None)
    assert float(f_other.mean()) > 0.01
