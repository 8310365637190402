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
