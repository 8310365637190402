"""Shared fixtures: an isolated EDGE_AD_HOME and small generated datasets.

Tests never read ../shared (a user's clone lacks it): data is generated here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray must not phone home, and tests must not write into the user's ~/.edge-ad.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def edge_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own EDGE_AD_HOME (MLflow store, generated data, runtime files)."""
    home = tmp_path_factory.mktemp("edge_home")
    monkeypatch.setenv("EDGE_AD_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic product (64 px) in MVTec layout, generated once per session."""
    from edge_ad.data.synthetic import SynthSpec, generate_dataset

    root = tmp_path_factory.mktemp("synth")
    spec = SynthSpec(image_size=64, n_train=48, n_test_good=12, n_test_per_defect=4, seed=0)
    generate_dataset("synth-pcb", root, spec)
    return root


FAST_TINY = ["autoencoder.epochs=0", "unet.epochs=1", "adapt.epochs=0", "data.max_train_images=16"]
"""The tiny profile without generative training: every stage still runs, in seconds. For tests
that need *a* trained bundle (registry, serving), not a good one."""


@pytest.fixture(scope="session")
def fast_model(synth_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One FAST_TINY bundle of ``synth-pcb`` per session: (settings, TrainResult). Tests that
    register it do so in their own MLflow store; the bundle directory is only read."""
    import torch

    from edge_ad.config import load_settings
    from edge_ad.engine import train_product

    root = tmp_path_factory.mktemp("fast_model")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        # Session fixtures run before the per-test EDGE_AD_HOME: give this one its own.
        mp.setenv("EDGE_AD_HOME", str(root / "home"))
        torch.set_num_threads(1)  # a shared 2-core box: OpenMP threads only spin
        try:
            settings = load_settings("tiny", overrides=FAST_TINY)
            result = train_product("synth-pcb", synth_root, settings, output=root / "bundle")
        finally:
            torch.set_num_threads(threads)
    return settings, result


@pytest.fixture
def run_cli(edge_home: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``edge-ad ARGS...`` as a user's shell would: a real process, real exit code."""

    def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "EDGE_AD_HOME": str(edge_home), "COLUMNS": "200"}
        return subprocess.run(
            [sys.executable, "-c", "from cli import app; app()", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def png_bomb() -> Callable[[int], bytes]:
    """``png_bomb(side)``: a 16-bit greyscale PNG of side × side black pixels, a few hundred
    kB on the wire and 2 × side² bytes once decoded (written row by row, never held whole)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    def make(side: int) -> bytes:
        ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
        packer = zlib.compressobj(9)
        row = bytes(1 + 2 * side)
        body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
        signature = b"\x89PNG\r\n\x1a\n"
        return signature + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")

    return make
