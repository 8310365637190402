"""Where edge-ad keeps its state: ``EDGE_AD_HOME`` (default ``~/.edge-ad``).

Every command reads the home from here, so one environment variable moves the MLflow store,
artifacts, generated data and runtime files of a whole installation (tests point it at a
temporary directory).
"""

from __future__ import annotations

import os
from pathlib import Path


def edge_home() -> Path:
    """The edge-ad home directory (created on first use)."""
    home = Path(os.environ.get("EDGE_AD_HOME") or Path.home() / ".edge-ad").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
