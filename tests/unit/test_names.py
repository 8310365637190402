"""The one product-name rule: checked where a name becomes a path, an MLflow name, a filter
string or a Serve key, with one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_ad.engine import default_model_dir
from edge_ad.errors import EdgeADError
from edge_ad.names import MAX_PRODUCT_CHARS, check_product_name, is_product_name
from edge_ad.registry import experiment_name, list_versions, model_name

GOOD = ["pcb1", "PCB-1", "line3.cam_a", "7", "a" * MAX_PRODUCT_CHARS]
BAD = ["", "../x", "..", "/abs/p", "a/b", "a'b", "pcb1\n", ".hidden", "-x", "a b", "a" * 300]


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass(name: str) -> None:
    assert is_product_name(name) and check_product_name(name) == name


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_everywhere_a_name_is_used(name: str) -> None:
    """Before: ``..``/absolute names escaped EDGE_AD_HOME, a trailing newline passed the serve
    check, a 300-character name gave a traceback."""
    assert not is_product_name(name)
    for use in (check_product_name, default_model_dir, model_name, experiment_name):
        with pytest.raises(EdgeADError, match=r"product name .* is not allowed"):
            use(name)


def test_cli_refuses_a_traversal_or_overlong_product_in_one_line(run_cli, tmp_path: Path) -> None:
    for name in ("../escape", "/tmp/abs", "x" * 300):
        result = run_cli("train", "-p", name, "--data-root", str(tmp_path))
        assert result.returncode == 2, result.stderr
        assert "is not allowed" in result.stderr and "Traceback" not in result.stderr
    listed = tmp_path / "products.txt"
    listed.write_text("pcb1\n../up  # a comment\n")
    result = run_cli("train", "--products-file", str(listed), "--data-root", str(tmp_path))
    assert result.returncode == 1 and "'../up' is not allowed" in result.stderr


def test_a_foreign_model_with_a_quote_does_not_break_the_listing(tmp_path: Path) -> None:
    """Before: one registered model named ``edge-ad-a'b`` broke ``edge-ad models`` and
    ``promote`` for every product (its name went into a quoted filter string)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("edge-ad-a'b")
    client.create_registered_model("edge-ad-good")
    assert list_versions(uri=uri) == []  # neither has a version; no crash on the quote
