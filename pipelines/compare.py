"""``edge-ad compare``: several methods trained and evaluated on ONE product and ONE split.

Each method runs as its own Ray Train job (the same path as ``edge-ad train``: data-parallel
generative stages, MLflow run with params and metrics), one after the other so each gets the
whole machine and its timings are comparable. The train/validation split is the deterministic
one of ``data.seed`` and the evaluation is the held-back test split, identical for all. Runs are
tracked (tag ``compare=<id>``) but NOT registered: a comparison must not move ``staging``.

The result is one table (I-AUROC, P-AUROC, PRO, AP, recall and FPR at the threshold, s/img,
train minutes) and a JSON report.
A method that fails is reported as such and the others still run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_ad.config import METHODS, Settings
from edge_ad.d3ad.observer import FitObserver
from edge_ad.errors import EdgeADError

#: The report columns, in table order (metrics in [0, 1]).
METRICS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap", "seconds_per_image", "train_minutes")


def parse_methods(text: str) -> list[str]:
    """``"d3ad,ran"`` → ``["d3ad", "ran"]`` (checked, no repeats).

    An entry may carry its own settings after ``@``, several joined by ``@``:
    ``d3ad@latent.space=vae,d3ad@latent.space=features`` compares two D3AD variants; each
    entry is a row labelled as written.
    """
    entries = [m.strip() for m in text.split(",") if m.strip()]
    if not entries:
        raise EdgeADError(f"--methods names no method; choose from {', '.join(METHODS)}")
    unknown = [e for e in entries if split_entry(e)[0] not in METHODS]
    if unknown:
        raise EdgeADError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)} "
            "(optionally with settings: d3ad@latent.space=features)"
        )
    if len(set(entries)) != len(entries):
        raise EdgeADError(f"a method is listed twice: {text}")
    return entries


def split_entry(entry: str) -> tuple[str, list[str]]:
    """``"d3ad@latent.space=features@unet.epochs=5"`` → ``("d3ad", ["latent.space=features",
    "unet.epochs=5"])``: the method and the settings this row alone gets."""
    method, *overrides = entry.split("@")
    return method.strip().lower(), [o.strip() for o in overrides if o.strip()]


def entry_folder(entry: str) -> str:
    """A folder name for an entry's bundle (settings characters made path-safe)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in entry)


def compare_methods(
    product: str,
    data_root: str | Path,
    settings_for: Callable[[str], Settings],
    methods: Sequence[str],
    output: Path,
    layout: str = "auto",
    tracking_uri: str | None = None,
    observer_factory: Callable[[str], FitObserver | None] | None = None,  # by method
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate each method in turn; return the comparison report.

    ``methods`` are :func:`parse_methods` entries; ``settings_for(entry)`` gives an entry's
    resolved settings (the profile with what the method changes in it, the user's overrides,
    then the entry's own). ``on_result(entry, row)`` is called as each entry finishes.
    """
    from pipelines.train import TrainOptions, TrainRequest, ensure_ray, train_one

    compare_id = f"{product}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    ensure_ray()
    rows: dict[str, dict[str, Any]] = {}
    split: dict[str, Any] = {}
    for method in methods:
        settings = settings_for(method)
        opts = TrainOptions(
            tracking_uri=tracking_uri,
            register=False,
            # Bars labelled by method (the product is the same for all).
            observer_factory=(lambda _p, m=method: observer_factory(m))
            if observer_factory
            else None,
            extra_tags={"compare": compare_id},
        )
        request = TrainRequest(product, str(data_root), layout, str(output / entry_folder(method)))
        try:
            job = train_one(request, settings, opts)
        except EdgeADError as err:
            rows[method] = {"error": str(err)}
        else:
            report = job.report or {}
            if not report:
                raise EdgeADError(
                    f"{product} has no test split with both good and defective images under "
                    f"{data_root}: nothing to compare on"
                )
            rows[method] = {
                "method": report.get("method"),  # what the evaluated bundle says it is
                **{k: report.get(k) for k in METRICS if k != "train_minutes"},
                "train_minutes": job.summary.get("train_minutes", job.wall_seconds / 60.0),
                "f1_max": report.get("f1_max"),
                "recall_at_threshold": report.get("recall_at_threshold"),
                "false_positive_rate_at_threshold": report.get("false_positive_rate_at_threshold"),
                "mean_timestep": report.get("mean_timestep"),
                "image_auroc_by_type": report.get("image_auroc_by_type"),
                # Where a method spends its s/img (each detector's own STAGES).
                "ms_per_image_by_stage": report.get("ms_per_image_by_stage"),
                "threshold": job.summary.get("threshold"),
                "bundle": str(job.bundle_path),
                "mlflow_run_id": job.mlflow_run_id,
                "profile": settings.profile,
            }
            from edge_ad.bundle import read_meta

            dataset = read_meta(job.bundle_path).get("dataset", {})
            split = split or {
                "train_images": dataset.get("n_train"),
                "val_images": dataset.get("n_val"),
                "test_images": report.get("images"),
            }
        if on_result is not None:
            on_result(method, rows[method])
    return {
        "product": product,
        "data_root": str(data_root),
        "compare_id": compare_id,
        "split": split,
        "methods": rows,
    }
