"""The operations the CLI exposes, as plain functions: train, evaluate, infer.

Each takes paths and settings, does one job end to end, and returns data (a bundle path, a
report dict, verdicts). No printing here: progress goes through observers/callbacks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edge_ad import metrics
from edge_ad.bundle import Bundle, load_bundle, save_bundle
from edge_ad.config import Settings
from edge_ad.d3ad.observer import FitObserver, HistoryObserver, ObserverGroup
from edge_ad.data import load_dataset, load_images, load_masks, split_train_val
from edge_ad.data.samples import Sample
from edge_ad.data.untrusted import read_untrusted
from edge_ad.detector import Detector, Prediction, finite_or_none
from edge_ad.errors import EdgeADError
from edge_ad.methods import build_detector
from edge_ad.names import check_product_name
from edge_ad.paths import edge_home
from edge_ad.visualize import defect_regions, heatmap_overlay, side_by_side

Progress = Callable[[int, int], None]


def default_model_dir(product: str) -> Path:
    return edge_home() / "models" / check_product_name(product)


def as_chw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → uint8 tensor (N, 3, H, W) (kept uint8: 4× less memory)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted positions of at most ``limit`` of ``n`` items (all of them without a limit)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


@dataclass
class TrainingData:
    """One product's normal images, split the same way wherever training runs."""

    train_images: torch.Tensor  # uint8 (N, 3, H, W): generative models, φ adaptation
    val_images: torch.Tensor  # uint8 (M, 3, H, W): held-out normals, calibration only
    dataset_info: dict
    # uint8 (K, 3, H, W), K ≥ N: fitted state (patch memory, KNN): every training image outside
    # the validation split (or memory.max_images of them), even where the networks train on a
    # capped subset: a memory only gains from more normal patches.
    index_images: torch.Tensor


def load_training_data(
    product: str,
    data_root: str | Path,
    settings: Settings,
    layout: str = "auto",
    progress: Progress | None = None,
) -> TrainingData:
    """Read and split the product's normal train images (deterministic: every Ray Train
    worker that calls this gets the same split and then takes its own shard)."""
    dataset = load_dataset(data_root, product, layout)
    d = settings.data
    train_samples, val_samples = split_train_val(dataset.train, d.val_fraction, d.seed)
    index_pos = _subsample(len(train_samples), settings.memory.max_images, d.seed)
    train_pos = _subsample(len(train_samples), d.max_train_images, d.seed)
    # Load each image once: the union of both subsets, then the validation images.
    union = np.union1d(index_pos, train_pos)
    images = load_images((*(train_samples[i] for i in union), *val_samples), d.image_size, progress)
    loaded = as_chw(images[: len(union)])
    where = {int(p): i for i, p in enumerate(union)}
    info = {
        "root": str(dataset.root),
        "layout": dataset.layout,
        "n_train": len(train_pos),
        "n_val": len(val_samples),
        "n_index": len(index_pos),
    }

    def subset(positions: np.ndarray) -> torch.Tensor:
        if len(positions) == len(union):  # all of them: no copy
            return loaded
        return loaded[[where[int(p)] for p in positions]]

    return TrainingData(
        train_images=subset(train_pos),
        val_images=as_chw(images[len(union) :]),
        dataset_info=info,
        index_images=subset(index_pos),
    )


def check_output_dir(output: str | Path | None, product: str) -> Path:
    """The bundle directory ``--output`` names (default under EDGE_AD_HOME), checked before
    minutes of training rather than after."""
    path = Path(output) if output is not None else default_model_dir(product)
    if path.exists() and not path.is_dir():
        raise EdgeADError(f"--output {path} is a file; give a directory for the bundle")
    return path


@dataclass
class TrainResult:
    bundle_path: Path
    detector: Detector
    summary: dict[str, float]
    history: HistoryObserver
    n_train: int
    n_val: int


def train_product(
    product: str,
    data_root: str | Path,
    settings: Settings,
    output: str | Path | None = None,
    layout: str = "auto",
    observer: FitObserver | None = None,
    load_progress: Progress | None = None,
) -> TrainResult:
    """Train ``settings.method`` in this process on the product's normal training images and
    save the bundle (``pipelines.train`` runs the same stages as a Ray Train job)."""
    path = check_output_dir(output, product)
    start = time.perf_counter()
    data = load_training_data(product, data_root, settings, layout, load_progress)
    history = HistoryObserver()
    detector = build_detector(settings)
    summary = detector.fit(
        data.train_images,
        data.val_images,
        ObserverGroup(observer, history),
        index_images=data.index_images,
    )
    summary["train_minutes"] = (time.perf_counter() - start) / 60.0
    save_bundle(detector, path, product, metrics=summary, extra={"dataset": data.dataset_info})
    info = data.dataset_info
    return TrainResult(path, detector, summary, history, info["n_train"], info["n_val"])


def resolve_model(
    model: str | Path, device: str = "auto", tracking_uri: str | None = None
) -> Bundle:
    """The bundle behind ``--model``: a bundle directory, or a registry URI such as
    ``models:/edge-ad-pcb1@production`` / ``models:/edge-ad-pcb1/3`` (downloaded from MLflow)."""
    text = str(model)
    if text.startswith("models:/"):
        from edge_ad import registry

        path, info = registry.resolve_bundle(text, tracking_uri)
        bundle = load_bundle(path, device=device)
        bundle.meta["registry"] = info
        return bundle
    path = Path(text).expanduser()
    if not path.exists():
        raise EdgeADError(f"model {path} does not exist; train one with `edge-ad train`")
    return load_bundle(path, device=device)


def evaluate(
    bundle: Bundle,
    data_root: str | Path,
    product: str | None = None,
    layout: str = "auto",
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict:
    """Score the test split; return the report (the eval-report keys plus diagnostics)."""
    product = product or bundle.product
    if product != bundle.product:
        raise EdgeADError(
            f"the model was trained for product {bundle.product!r}, not {product!r}; "
            f"pass --product {bundle.product} or the model of {product}"
        )
    detector = bundle.detector
    size = detector.settings.data.image_size
    dataset = load_dataset(data_root, product, layout)
    samples = dataset.test
    if not samples:
        raise EdgeADError(f"product {product!r} has no test images under {dataset.root}")
    images = as_chw(load_images(samples, size))
    labels = np.array([s.label for s in samples])
    timings: dict[str, float] = {}
    start = time.perf_counter()
    pred = detector.predict_many(images, batch_size, progress, timings)
    seconds = time.perf_counter() - start
    # Every stage of the method, in its order; 0 for one this model skips (D3AD's decode when
    # its map has no feature term).
    timings = {stage: timings.get(stage, 0.0) for stage in detector.STAGES} | timings
    scores = pred.scores.numpy()
    report: dict = {
        "product": product,
        "method": bundle.method,
        "images": len(samples),
        "image_auroc": metrics.image_auroc(labels, scores),
        "f1_max": metrics.f1_max(labels, scores),
        "seconds_per_image": seconds / len(samples),
    }
    masked = [s.mask_path is not None or s.label == 0 for s in samples]
    if any(s.mask_path is not None for s in samples):
        keep = np.flatnonzero(masked)
        masks = load_masks([samples[i] for i in keep], size)
        maps = pred.maps.numpy()[keep]
        report["pixel_auroc"] = metrics.pixel_auroc(masks, maps)
        report["pro"] = metrics.aupro(masks, maps)
        report["pixel_ap"] = metrics.pixel_ap(masks, maps)
    else:
        report.update(pixel_auroc=None, pro=None, pixel_ap=None)
    report |= _diagnostics(samples, labels, pred, detector.threshold, timings)
    return report


def _diagnostics(
    samples: Sequence[Sample],
    labels: np.ndarray,
    pred: Prediction,
    threshold: float,
    timings: dict[str, float],
) -> dict:
    """Threshold behaviour, per-defect-type AUROC and the T̂ chosen for normal vs defects."""
    scores, flagged = pred.scores.numpy(), pred.is_anomalous.numpy()
    t_hat = pred.timesteps.numpy()
    types = sorted({s.defect_type for s in samples if s.label == 1})
    per_type = {}
    for t in types:
        idx = [i for i, s in enumerate(samples) if s.defect_type == t or s.label == 0]
        per_type[t] = metrics.image_auroc(labels[idx], scores[idx])

    def histogram(mask: np.ndarray) -> dict[str, int]:
        values, counts = np.unique(t_hat[mask], return_counts=True)
        return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}

    n = len(samples)
    return {
        "threshold": threshold,
        "recall_at_threshold": float(flagged[labels == 1].mean()) if (labels == 1).any() else None,
        "false_positive_rate_at_threshold": float(flagged[labels == 0].mean())
        if (labels == 0).any()
        else None,
        "image_auroc_by_type": per_type,
        "timesteps": {"normal": histogram(labels == 0), "defect": histogram(labels == 1)},
        "mean_timestep": {
            "normal": float(t_hat[labels == 0].mean()) if (labels == 0).any() else None,
            "defect": float(t_hat[labels == 1].mean()) if (labels == 1).any() else None,
        },
        "ms_per_image_by_stage": {k: 1000.0 * v / n for k, v in timings.items()},
    }


def _output_names(paths: Sequence[Path]) -> list[str]:
    """File stems, prefixed with their folder where two images share a stem (MVTec's
    test/crack/000.png and test/good/000.png must not overwrite each other's heatmap)."""
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    # Still equal (a/good/000.png and b/good/000.png): number them.
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def check_infer_output(paths: Sequence[str | Path], out: str | Path) -> Path:
    """``out`` if overlays and JSON may be written there: a folder (or nothing yet), and not
    the folder of any image being scored (overlays are ``<stem>.png``: they would replace
    the inputs)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EdgeADError(f"--out {out} is a file; name a folder for the overlays and JSON")
    inside = [p for p in map(Path, paths) if p.resolve().parent == out.resolve()]
    if inside:
        raise EdgeADError(
            f"--out {out} holds the images being scored ({inside[0].name}, ...); "
            "name another folder so no input is overwritten"
        )
    return out


def infer_images(
    bundle: Bundle,
    paths: Sequence[str | Path],
    out: str | Path,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> list[dict]:
    """Score image files; write ``<stem>.png`` (input | reconstruction | overlay) and
    ``<stem>.json`` per image into ``out``; return the verdicts."""
    detector = bundle.detector
    size = detector.settings.data.image_size
    out = check_infer_output(paths, out)
    out.mkdir(parents=True, exist_ok=True)
    verdicts = []
    names = _output_names([Path(p) for p in paths])
    for start in range(0, len(paths), batch_size):
        chunk = [Path(p) for p in paths[start : start + batch_size]]
        originals = [read_untrusted(p, size) for p in chunk]
        t0 = time.perf_counter()
        pred = detector.predict(as_chw(np.stack(originals)), return_reconstruction=True)
        for i, score in enumerate(pred.scores.tolist()):
            if not np.isfinite(score):
                raise EdgeADError(
                    f"the model gave a non-finite score ({score}) for {chunk[i]}: its bundle "
                    "is broken; retrain it or load another version"
                )
        latency_ms = 1000.0 * (time.perf_counter() - t0) / len(chunk)
        recon_u8 = None
        if pred.reconstructions is not None:  # methods without a reconstruction: 2 panels
            recon = (pred.reconstructions.permute(0, 2, 3, 1).add(1).mul(127.5)).clamp(0, 255)
            recon_u8 = recon.round().to(torch.uint8).numpy()
        for i, path in enumerate(chunk):
            name = names[start + i]
            amap = pred.maps[i].numpy()
            regions = defect_regions(amap, detector.threshold)
            overlay = heatmap_overlay(originals[i], amap, detector.threshold, regions)
            panels = (
                [originals[i], overlay]
                if recon_u8 is None
                else [originals[i], recon_u8[i], overlay]
            )
            Image.fromarray(side_by_side(*panels)).save(out / f"{name}.png")
            verdict = {
                "image": str(path),
                "product": bundle.product,
                "score": float(pred.scores[i]),
                "threshold": detector.threshold,
                "is_anomalous": bool(pred.is_anomalous[i]),
                "timestep": int(pred.timesteps[i]),
                "method": bundle.method,
                "severity_distance": finite_or_none(pred.distances[i]),
                "boxes": regions,
                "latency_ms": latency_ms,
                "overlay": str(out / f"{name}.png"),
            }
            (out / f"{name}.json").write_text(json.dumps(verdict, indent=2))
            verdicts.append(verdict)
        if progress:
            progress(min(start + batch_size, len(paths)), len(paths))
    return verdicts
