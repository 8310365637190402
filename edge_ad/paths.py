"""Where edge-ad keeps its state: ``EDGE_AD_HOME`` (default ``~/.edge-ad``).

Every command reads the home from here, so one environment variable moves the MLflow store,
artifacts, generated data and runtime files of a whole installation (tests point it at a
temporary directory).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def edge_home() -> Path:
    """The edge-ad home directory (created on first use)."""
    home = Path(os.environ.get("EDGE_AD_HOME") or Path.home() / ".edge-ad").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an embedded sqlite store under the home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{edge_home() / 'mlruns.db'}"


def default_bootstrap() -> str:
    """``EDGE_AD_BOOTSTRAP`` if set, else where ``edge-ad broker`` listens by default."""
    return os.environ.get("EDGE_AD_BOOTSTRAP") or DEFAULT_BOOTSTRAP
