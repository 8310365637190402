from __future__ import annotations

from pathlib import Path

import pytest

from edge_ad.config import PROFILES, Settings, load_settings, settings_from_dict
from edge_ad.errors import ConfigError


def test_profiles_differ_where_they_should() -> None:
    tiny, cpu, paper = (load_settings(p) for p in PROFILES)
    assert tiny.data.image_size < cpu.data.image_size
    assert tiny.data.max_train_images < cpu.data.max_train_images
    assert paper.data.max_train_images is None  # the paper trains on every image
    assert cpu.unet.epochs < paper.unet.epochs
    assert paper.backbone.name == "resnet34"
    assert paper.autoencoder.pretrained == "stabilityai/sd-vae-ft-mse"
    # The paper's map and DDIM steps; the others drop the feature term and half the steps
    # (measured equal beside the patch memory).
    assert (paper.anomaly_map.lam, paper.reconstruct.steps) == (0.85, 10)
    assert (cpu.anomaly_map.lam, cpu.reconstruct.steps) == (1.0, 5)
    # The paper's D3AD constants are shared by every profile.
    for s in (tiny, cpu, paper):
        assert (s.severity.k, s.severity.num_bins, s.severity.t_max) == (20, 10, 80)
        assert s.anomaly_map.sigma == 4.0
        assert (s.unet.beta_start, s.unet.beta_end) == (0.0015, 0.0195)


def test_yaml_then_overrides_layer_in_order(tmp_path: Path) -> None:
    cfg = tmp_path / "line.yaml"
    cfg.write_text(
        "unet:\n  epochs: 7\n  lr: 0.0002\n  max_train_timestep: 200\nseverity:\n  t_max: 120\n"
    )
    s = load_settings("tiny", cfg, ["unet.epochs=9", "reconstruct.eta=0"])
    assert s.unet.epochs == 9  # override beats file
    assert s.unet.lr == 0.0002  # file beats profile
    assert s.severity.t_max == 120
    assert s.reconstruct.eta == 0.0
    assert s.data.image_size == 64  # untouched profile value survives


def test_round_trip_through_dict() -> None:
    s = load_settings("cpu", overrides=["adapt.epochs=3"])
    again = settings_from_dict(s.to_dict())
    assert again == s
    assert again.flat()["adapt.epochs"] == 3


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["unet.epoch=3"], "unet.epoch"),
        (["data.image_size=100"], "multiple of 32"),
        (["adapt.epochs=9"], "adapt.epochs"),
        (["novalue"], "section.key=value"),
        (["unet.epochs=["], "not a valid value"),
        (["reconstruct.steps=20"], "multiple of reconstruct.steps"),
        (["severity.min_bin=11"], "exceeds num_bins"),
        (["severity.t_max=200"], "never learned"),  # tiny/cpu UNets learn t < 100 only
        (["unet.crop_size=9"], "multiple of 2"),  # the tiny UNet halves the latent once
    ],
)
def test_bad_overrides_are_one_line_errors(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings("tiny", overrides=overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_profile_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown profile"):
        load_settings("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("cpu", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings("cpu", bad)


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        s.unet.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "word"),
    [
        ("unet.beta_start=.nan", "finite number"),
        ("unet.lr=.inf", "finite number"),
        ("autoencoder.lr=-.inf", "finite number"),
        ("data.image_size=1048576", "less than or equal to 2048"),
        ("unet.beta_end=1.5", "less than 1"),
        ("unet.beta_start=0.03", "must be below beta_end"),
    ],
)
def test_non_finite_and_unbounded_settings_are_refused(override: str, word: str) -> None:
    """Before: .nan, .inf (valid YAML floats) and a 1048576-px image size were accepted."""
    with pytest.raises(ConfigError, match=word):
        load_settings("cpu", overrides=[override])
