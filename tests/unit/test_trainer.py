"""Unit tests for the training loops: latent crops, EMA weights, the perceptual AE term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_ad.config import AutoencoderConfig, UNetConfig, load_settings
from edge_ad.d3ad.detector import D3AD
from edge_ad.d3ad.trainer import random_crop, train_autoencoder, train_unet
from edge_ad.models import autoencoder_loss, build_autoencoder, build_unet, make_noise_scheduler


class _ShapeRecorder(nn.Module):
    """A one-conv stand-in for ε_θ that records the latent sizes it is trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, z: torch.Tensor, t: torch.Tensor):
        self.seen.append(tuple(z.shape))
        return type("Out", (), {"sample": self.conv(z)})()


def _latents(n: int = 8, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(0))


def test_random_crop_takes_a_window_of_the_input() -> None:
    x = torch.arange(2 * 4 * 16 * 16, dtype=torch.float32).reshape(2, 4, 16, 16)
    crop = random_crop(x, 8, torch.Generator().manual_seed(3))
    assert crop.shape == (2, 4, 8, 8)
    top = int((crop[0, 0, 0, 0] % 256) // 16)
    left = int(crop[0, 0, 0, 0] % 16)
    assert torch.equal(crop, x[..., top : top + 8, left : left + 8])
    assert random_crop(x, None, torch.Generator()) is x


def test_unet_trains_on_latent_crops_when_asked() -> None:
    recorder = _ShapeRecorder()
    cfg = UNetConfig(epochs=1, batch_size=4, crop_size=8, ema_decay=None)
    train_unet(recorder, _latents(), make_noise_scheduler(), cfg, torch.device("cpu"))
    assert recorder.seen and all(s[-2:] == (8, 8) for s in recorder.seen)
    whole = _ShapeRecorder()
    cfg = UNetConfig(epochs=1, batch_size=4, crop_size=None, ema_decay=None)
    train_unet(whole, _latents(), make_noise_scheduler(), cfg, torch.device("cpu"))
    assert all(s[-2:] == (16, 16) for s in whole.seen)


def _trained_unet(ema_decay: float | None) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    unet = build_unet(16, 4, (32, 64), attention=False)
    initial = build_unet(16, 4, (32, 64), attention=False)
    initial.load_state_dict(unet.state_dict())
    cfg = UNetConfig(epochs=6, batch_size=4, lr=1e-3, ema_decay=ema_decay)
    train_unet(unet, _latents(), make_noise_scheduler(), cfg, torch.device("cpu"))
    return unet, initial


def _distance(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return sum(float((p - q).detach().norm()) for p, q in pairs)


def test_ema_leaves_averaged_weights_that_lag_the_raw_ones() -> None:
    raw, initial = _trained_unet(None)
    ema, _ = _trained_unet(0.999)
    # Same seed, same steps: only the final copy differs. The average trails the raw
    # trajectory, so it ends nearer the start, but it did move (it is not the initial copy).
    assert _distance(ema, raw) > 0
    assert 0 < _distance(ema, initial) < _distance(raw, initial)


def test_autoencoder_loss_adds_the_weighted_perceptual_term() -> None:
    torch.manual_seed(0)
    vae = build_autoencoder((16, 16), norm_num_groups=8, mid_block_attention=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def perceptual(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (recon - target).pow(2).mean()

    g = torch.Generator().manual_seed(1)
    plain, p0 = autoencoder_loss(vae, x, 1e-6, torch.Generator().manual_seed(1))
    loss, parts = autoencoder_loss(vae, x, 1e-6, g, perceptual, perceptual_weight=2.0)
    assert set(parts) == {"loss", "rec", "kl", "perceptual"}
    assert parts["rec"] == p0["rec"]  # same posterior sample
    expected = float(plain.detach()) + 2.0 * parts["perceptual"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert parts["perceptual"] > 0


def test_detector_perceptual_loss_is_zero_on_identity_and_leaves_phi_untouched() -> None:
    settings = load_settings("tiny", overrides=["backbone.weights=null"])
    detector = D3AD.build(settings)
    loss_fn = detector.perceptual_loss()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2).requires_grad_(True)
    assert float(loss_fn(x, x)) < 1e-6
    loss = loss_fn(blurred, x)
    assert float(loss) > 1e-3
    loss.backward()
    assert blurred.grad is not None and float(blurred.grad.abs().sum()) > 0
    assert all(p.grad is None for p in detector.backbone.parameters())


def test_autoencoder_training_reports_the_perceptual_part() -> None:
    torch.manual_seed(0)
    vae = build_autoencoder((16, 16), norm_num_groups=8, mid_block_attention=False)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    cfg = AutoencoderConfig(epochs=1, batch_size=2, crop_size=None, perceptual_weight=0.5)
    summary = train_autoencoder(
        vae, images, cfg, torch.device("cpu"), perceptual=lambda r, x: (r - x).abs().mean()
    )
    assert summary["ae_perceptual"] > 0


@pytest.mark.parametrize(("schedule", "final_lr"), [("cosine", 0.0), ("constant", 1e-3)])
def test_autoencoder_learning_rate_schedule(schedule: str, final_lr: float) -> None:
    vae = build_autoencoder((16, 16), norm_num_groups=8, mid_block_attention=False)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    cfg = AutoencoderConfig(
        epochs=2, batch_size=2, lr=1e-3, crop_size=None, perceptual_weight=0, lr_schedule=schedule
    )
    summary = train_autoencoder(vae, images, cfg, torch.device("cpu"))
    assert summary["ae_lr"] == pytest.approx(final_lr, abs=1e-12)
