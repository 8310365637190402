"""Unit tests for edge_ad.models: backbone φ, KL autoencoder, latent UNet and noise schedule."""

from __future__ import annotations

import pytest
import timm
import torch

from edge_ad.errors import ConfigError, EdgeADError
from edge_ad.models import (
    FeatureBackbone,
    LatentCodec,
    autoencoder_loss,
    build_autoencoder,
    build_unet,
    diffusion_loss,
    estimate_scaling_factor,
    freeze,
    frozen_copy,
    load_backbone_weights,
    load_pretrained_autoencoder,
    make_noise_scheduler,
    resolve_backbone_weights,
    unfreeze,
)

EFFNET = "tf_efficientnet_lite2"


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (smooth so a tiny autoencoder can learn them fast)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return torch.nn.functional.avg_pool2d(x, 5, 1, 2).clamp(-1, 1)


@pytest.fixture(scope="module")
def packaged_backbone() -> FeatureBackbone:
    return FeatureBackbone(EFFNET, layers=(2, 3), weights="auto").eval()


# ---------------------------------------------------------------------------- backbone


@pytest.fixture(scope="module")
def random_backbone() -> FeatureBackbone:
    return FeatureBackbone(EFFNET, layers=(2, 3), weights=None).eval()


@pytest.mark.parametrize("size", [64, 96, 128])
def test_backbone_random_init_shapes_channels_strides(
    random_backbone: FeatureBackbone, size: int
) -> None:
    backbone = random_backbone
    assert backbone.channels == [48, 120]
    assert backbone.strides == [8, 16]
    assert backbone.weights_source == "random"
    assert backbone.removed_blocks == 2  # blocks 5 and 6 never run
    with torch.no_grad():
        feats = backbone(_images(2, size))
    assert [tuple(f.shape) for f in feats] == [
        (2, 48, size // 8, size // 8),
        (2, 120, size // 16, size // 16),
    ]


def test_packaged_weights_load_strictly_and_truncation_is_exact(
    packaged_backbone: FeatureBackbone,
) -> None:
    assert packaged_backbone.weights_source.startswith("packaged:")
    untruncated = FeatureBackbone(EFFNET, layers=(2, 3), weights="auto", truncate=False).eval()
    assert len(untruncated.model.blocks) == 7
    assert len(packaged_backbone.model.blocks) == 5
    x = _images(2, 96)
    with torch.no_grad():
        short, full = packaged_backbone(x), untruncated(x)
    for a, b in zip(short, full, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_packaged_weights_differ_from_random_init(
    packaged_backbone: FeatureBackbone, random_backbone: FeatureBackbone
) -> None:
    random = random_backbone
    loaded_bn = packaged_backbone.model.bn1.running_var
    assert not torch.allclose(loaded_bn, random.model.bn1.running_var)  # random: all ones
    x = _images(2, 64)
    with torch.no_grad():
        a, b = packaged_backbone(x)[0], random(x)[0]
    assert (a - b).abs().mean() > 0.1 * b.abs().mean()


def test_packaged_weights_classify_a_real_photo() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    try:
        photo = datasets.load_sample_image("china.jpg")  # ships with scikit-learn
    except (ImportError, OSError):
        pytest.skip("scikit-learn sample image unavailable")
    model = timm.create_model(EFFNET, pretrained=False).eval()
    path, _ = resolve_backbone_weights(EFFNET, "auto")
    assert load_backbone_weights(model, EFFNET, path) == []  # classifier included: all used
    x = torch.tensor(photo.copy()).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(260, 260), mode="bilinear", antialias=True)
    with torch.no_grad():
        top5 = model(x * 2 - 1).topk(5).indices[0].tolist()
    assert 698 in top5  # ImageNet "palace"


def test_positional_mapping_rejects_a_mismatched_checkpoint(tmp_path) -> None:
    path, _ = resolve_backbone_weights(EFFNET, "auto")
    state = torch.load(path, map_location="cpu", weights_only=True)
    keys = list(state)
    keys[0], keys[1] = keys[1], keys[0]  # stem conv weight <-> bn weight: order broken
    broken = tmp_path / "broken.pth"
    torch.save({k: state[k] for k in keys}, broken)
    with pytest.raises(EdgeADError, match="do not fit"):
        FeatureBackbone(EFFNET, weights=broken)


class _NotATensor:
    pass


def test_weights_file_with_arbitrary_objects_is_refused(tmp_path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": _NotATensor()}, evil)
    with pytest.raises(EdgeADError, match="cannot read weights file"):
        FeatureBackbone(EFFNET, weights=evil)


def test_missing_weights_path_raises() -> None:
    with pytest.raises(EdgeADError, match="not found"):
        FeatureBackbone(EFFNET, weights="/nonexistent/weights.pth")


@pytest.fixture()
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_resnet34_offline_without_path_raises(empty_caches) -> None:
    with pytest.raises(EdgeADError, match="resnet34 ImageNet weights not found offline"):
        FeatureBackbone("resnet34", weights="auto")


def test_resnet34_found_in_local_hub_cache(empty_caches) -> None:
    from safetensors.torch import save_file

    snapshot = empty_caches / "hf" / "hub" / "models--timm--resnet34.a1_in1k" / "snapshots" / "x"
    snapshot.mkdir(parents=True)
    reference = timm.create_model("resnet34", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in reference.items()}, snapshot / "model.safetensors")
    backbone = FeatureBackbone("resnet34", layers=(2, 3), weights="auto").eval()
    assert backbone.channels == [128, 256] and backbone.strides == [8, 16]
    torch.testing.assert_close(backbone.model.conv1.weight, reference["conv1.weight"])
    # [-1, 1] input -> ImageNet mean/std: mid-grey 0 maps to (0.5 - mean) / std
    grey = backbone.normalize(torch.zeros(1, 3, 1, 1)).flatten()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(grey, (0.5 - mean) / std)
    with torch.no_grad():
        feats = backbone(_images(1, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 128, 8, 8), (1, 256, 4, 4)]


def test_backbone_trainable_by_default_and_freeze_helpers() -> None:
    backbone = FeatureBackbone(EFFNET, weights=None)
    assert all(p.requires_grad for p in backbone.parameters())
    anchor = frozen_copy(backbone)
    assert not any(p.requires_grad for p in anchor.parameters()) and not anchor.training
    assert all(p.requires_grad for p in backbone.parameters())  # original untouched
    freeze(backbone)
    assert not any(p.requires_grad for p in backbone.parameters())
    unfreeze(backbone)
    assert all(p.requires_grad for p in backbone.parameters()) and backbone.training


# ---------------------------------------------------------------------------- autoencoder


def _tiny_vae():
    return build_autoencoder((16, 32, 32, 32), norm_num_groups=8, mid_block_attention=False)


def test_autoencoder_default_shapes_and_deterministic_encode() -> None:
    torch.manual_seed(0)
    codec = LatentCodec(build_autoencoder()).eval()
    assert codec.downsample_factor == 8 and codec.latent_channels == 4
    x = _images(2, 64)
    with torch.no_grad():
        z = codec.encode(x)
        z_again = codec.encode(x)
        x_hat = codec.decode(z)
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, z_again, rtol=0, atol=0)
    assert x_hat.shape == (2, 3, 64, 64)
    assert x_hat.min() >= -1 and x_hat.max() <= 1


def test_encode_rejects_sizes_not_divisible_by_eight() -> None:
    codec = LatentCodec(_tiny_vae())
    with pytest.raises(ConfigError):
        codec.encode(torch.zeros(1, 3, 60, 64))


def test_build_autoencoder_checks_group_norm() -> None:
    with pytest.raises(ConfigError):
        build_autoencoder((24, 64, 128, 128), norm_num_groups=16)


def test_autoencoder_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    vae = _tiny_vae()
    x = _images(4, 32)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    history = []
    for step in range(20):
        loss, parts = autoencoder_loss(vae, x, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(parts)
    assert set(history[0]) == {"loss", "rec", "kl"}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["rec"] < 0.7 * history[0]["rec"]


def test_scaling_factor_gives_unit_std_latents_and_survives_save(tmp_path) -> None:
    torch.manual_seed(0)
    vae = _tiny_vae().eval()
    x = _images(6, 32)
    factor = estimate_scaling_factor(vae, x, batch_size=4)
    assert vae.config.scaling_factor == pytest.approx(factor)
    codec = LatentCodec(vae)
    with torch.no_grad():
        z = codec.encode(x)
    assert z.std().item() == pytest.approx(1.0, abs=1e-3)

    vae.save_pretrained(tmp_path / "vae")
    loaded = load_pretrained_autoencoder(str(tmp_path / "vae")).eval()
    assert loaded.config.scaling_factor == pytest.approx(factor)
    with torch.no_grad():
        torch.testing.assert_close(LatentCodec(loaded).encode(x), z)


def test_load_pretrained_autoencoder_offline_errors(tmp_path) -> None:
    with pytest.raises(EdgeADError, match="not found"):
        load_pretrained_autoencoder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeADError, match="no diffusers autoencoder"):
        load_pretrained_autoencoder(str(tmp_path / "empty"))
    with pytest.raises(EdgeADError, match="not available offline"):
        load_pretrained_autoencoder("edge-ad-test/no-such-vae", allow_download=False)


# ---------------------------------------------------------------------------- UNet + schedule


def test_noise_scheduler_is_the_papers_linear_schedule() -> None:
    scheduler = make_noise_scheduler()
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.clip_sample is False
    torch.testing.assert_close(scheduler.betas, torch.linspace(0.0015, 0.0195, 1000))
    torch.testing.assert_close(
        scheduler.alphas_cumprod, torch.cumprod(1 - torch.linspace(0.0015, 0.0195, 1000), 0)
    )


def test_unet_accepts_per_sample_timesteps() -> None:
    torch.manual_seed(0)
    unet = build_unet(sample_size=16).eval()
    z = torch.randn(3, 4, 16, 16)
    t = torch.tensor([0, 400, 999])
    with torch.no_grad():
        eps = unet(z, t).sample
        one_by_one = torch.cat([unet(z[i : i + 1], int(t[i])).sample for i in range(3)])
        same_t = unet(z, torch.tensor([400, 400, 400])).sample
    assert eps.shape == z.shape
    torch.testing.assert_close(eps, one_by_one, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(eps[0], same_t[0], atol=1e-4)  # the timestep does matter


def test_build_unet_checks_group_norm() -> None:
    with pytest.raises(ConfigError):
        build_unet(block_out_channels=(48, 64), norm_num_groups=32)


def test_diffusion_loss_finite_and_decreasing() -> None:
    torch.manual_seed(0)
    unet = build_unet(sample_size=8, block_out_channels=(32, 32), norm_num_groups=8)
    scheduler = make_noise_scheduler()
    z0 = torch.randn(4, 4, 8, 8)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = diffusion_loss(unet, scheduler, z0, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
