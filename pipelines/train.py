"""``edge-ad train`` as Ray Train jobs: one ``TorchTrainer`` per product, tracked in MLflow.

The same code runs on a laptop (a local Ray started on demand, CPU workers, gloo) and on a GPU
cluster (``RAY_ADDRESS``, NCCL). Per product:

* every worker loads the product's normal images and the same deterministic train/val split,
  and trains on its own shard (``shard_indices``: equal sizes, so every worker takes the same
  number of steps and the all-reduces line up);
* the autoencoder and the UNet are data-parallel: their loss modules are wrapped in DDP by
  ``ray.train.torch.prepare_model``, so gradients are all-reduced in ``backward``;
* after every ``runtime.checkpoint_every`` epochs (at most one per
  ``runtime.checkpoint_interval_s``, and at every stage's end) rank 0 reports a Ray Train
  checkpoint (pipelines/checkpoint.py); a worker that dies (``FailureConfig.max_failures``)
  or a command that is run again with ``--resume`` continues from the latest one;
* the stages that are not data-parallel run once on rank 0 while the other workers wait at the
  next report: the method's head (D3AD: domain adaptation of φ, ≤ 3 short epochs; DiffusionAD:
  the segmentation network), its index (D3AD: KNN and bins; RAN: the PaDiM Gaussian),
  calibration, the bundle, the evaluation on the held-back test split, heatmaps and (D3AD) the
  severity histogram;
* the driver logs the resolved settings as MLflow params before the job, rank 0 logs per-epoch
  losses during it, and the driver logs the eval metrics and artifacts and registers the bundle
  as a new version of ``edge-ad-<product>`` after it.

Several products train as concurrent jobs (one driver thread each) sharing the cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_ad.config import Settings, settings_from_dict
from edge_ad.d3ad.observer import FitObserver, ObserverGroup
from edge_ad.errors import EdgeADError
from edge_ad.paths import edge_home
from pipelines.checkpoint import (
    BUNDLE_DIR,
    REPORT_DIR,
    Resume,
    read_checkpoint,
    write_checkpoint,
)

RUN_STATE_FILE = "edge_ad_run.json"
MAX_EXAMPLE_HEATMAPS = 8


@dataclass(frozen=True)
class TrainRequest:
    """One product to train."""

    product: str
    data_root: str
    layout: str = "auto"
    output: str | None = None  # bundle directory (default: EDGE_AD_HOME/models/<product>)


@dataclass
class JobResult:
    """What one product's Ray Train job produced."""

    product: str
    bundle_path: Path
    run_name: str
    mlflow_run_id: str | None
    model_version: int | None
    summary: dict[str, float]
    report: dict[str, Any] | None
    workers: int
    wall_seconds: float
    resumed: bool = False  # --resume continued an earlier run
    started_from: str = "scratch"  # the checkpoint the last worker group began from


@dataclass
class TrainOptions:
    """How the jobs run (shared by every product of one command)."""

    storage_path: Path | None = None  # Ray Train storage (absolute; shared on a cluster)
    tracking_uri: str | None = None  # MLflow; None = $MLFLOW_TRACKING_URI or the embedded store
    track: bool = True  # log to MLflow
    register: bool = True  # ...and register the model (off: the run only, e.g. `compare`)
    resume: bool = False  # continue each product's last unfinished run
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    evaluate: bool = True  # score the test split on rank 0 after training
    observer_factory: Callable[[str], FitObserver | None] | None = None  # per product
    extra_tags: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- sharding


def shard_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s share of ``n`` items: a strided slice, padded by wrapping around so every
    rank has ``ceil(n / world)`` items (DistributedSampler's rule). Unequal shards would give
    unequal step counts and DDP's all-reduce would wait forever on the rank with fewer steps."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    per_rank = -(-n // world)
    order = np.resize(np.arange(n), per_rank * world)
    return order[rank::world]


# ----------------------------------------------------------------------------- Ray setup


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS``, or start a local Ray (quiet, no dashboard)."""
    import logging

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
            log_to_driver=address is not None,
        )
    except ConnectionError as err:
        raise EdgeADError(f"cannot reach the Ray cluster at {address}: {err}") from None


def default_storage() -> Path:
    return edge_home() / "ray_results"


def _cpus_per_worker(settings: Settings, jobs: int) -> float:
    """Explicit setting, else an even share of the cluster's CPUs (capped at one node's)."""
    import ray

    if settings.runtime.cpus_per_worker is not None:
        return settings.runtime.cpus_per_worker
    total = ray.cluster_resources().get("CPU", 1.0)
    per_node = max(
        (n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=total
    )
    share = total // max(1, settings.runtime.workers * jobs)
    return float(max(1.0, min(share, per_node)))


# ----------------------------------------------------------------------------- run names


def _state_path(storage: Path, run_name: str) -> Path:
    return storage / run_name / RUN_STATE_FILE


def _latest_path(storage: Path, product: str) -> Path:
    return storage / f"latest-{product}.json"


def _write_state(storage: Path, run_name: str, state: dict[str, Any]) -> None:
    path = _state_path(storage, run_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))


def _run_to_resume(storage: Path, product: str) -> dict[str, Any]:
    latest = _latest_path(storage, product)
    if not latest.is_file():
        raise EdgeADError(
            f"nothing to resume for {product!r}: no earlier run under {storage}; "
            "train without --resume"
        )
    run_name = json.loads(latest.read_text())["run_name"]
    state_file = _state_path(storage, run_name)
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("status") == "finished":
        raise EdgeADError(
            f"nothing to resume for {product!r}: its last run {run_name} finished "
            f"(bundle {state.get('bundle_path')}); train without --resume for a new one"
        )
    return {"run_name": run_name, **state}


# ----------------------------------------------------------------------------- worker


def _report(metrics: dict[str, Any], folder: Path | None, name: str) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if folder else None)


def _checkpointer(
    detector: Any,
    stage: str,
    epochs: int,
    runtime: Any,
    rank: int,
    world: int,
    metrics: dict[str, Any],
) -> Callable[[int, dict[str, Any]], None]:
    """``on_epoch_end`` for a data-parallel loop: every ``runtime.checkpoint_every`` epochs,
    but at most once per ``runtime.checkpoint_interval_s`` (a Ray Train checkpoint costs ~2 s,
    more than a tiny epoch), and always after the stage's last epoch, all ranks report (a
    barrier) and rank 0 attaches the checkpoint. Rank 0 decides and broadcasts the decision:
    each rank's clock alone could disagree, and unequal report counts would hang the job."""
    import torch.distributed as dist

    last_saved = time.monotonic()

    def on_epoch_end(epoch: int, loop: dict[str, Any]) -> None:
        nonlocal last_saved
        due = epoch + 1 == epochs or (
            (epoch + 1) % runtime.checkpoint_every == 0
            and time.monotonic() - last_saved >= runtime.checkpoint_interval_s
        )
        if world > 1 and dist.is_initialized():
            flag = torch.tensor([int(due)])
            dist.broadcast(flag, src=0)
            due = bool(flag.item())
        if not due:
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = None
            if rank == 0:
                folder = write_checkpoint(Path(tmp), detector, stage, epoch, epochs, loop)
            _report({"stage": stage, "epoch": epoch, **metrics}, folder, f"{stage}-{epoch:04d}")
        last_saved = time.monotonic()

    return on_epoch_end


class _LastEpoch(FitObserver):
    """Keeps the latest epoch metrics (plus ``fixed`` ones) for the next Ray Train report."""

    def __init__(self, sink: dict[str, Any], fixed: dict[str, Any]) -> None:
        self.sink, self.fixed = sink, fixed
        sink.update(fixed)

    def epoch_end(self, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        self.sink.clear()
        self.sink.update({**self.fixed, **metrics})


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: one product, this worker's part of it."""
    import ray.train
    import ray.train.torch

    from edge_ad.d3ad.trainer import LoopControl
    from edge_ad.engine import load_training_data
    from edge_ad.methods import build_detector
    from pipelines.observers import RelayObserver, TrackingObserver

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    settings = settings_from_dict(config["settings"])
    if settings.runtime.gpus_per_worker > 0 and torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())  # this worker's GPU, for "auto"
    product = config["product"]
    start = time.perf_counter()

    data = load_training_data(product, config["data_root"], settings, config["layout"])
    torch.manual_seed(settings.runtime.seed)  # same initial weights on every rank
    detector = build_detector(settings)
    detector.prepare_fit(data.train_images, data.val_images)

    resume: Resume | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = read_checkpoint(Path(folder), detector)
    # Every report says where this worker group began (a restart after a worker failure or a
    # --resume shows as "unet:7"), so the driver can tell a resumed job from a fresh one.
    last: dict[str, Any] = {}
    marker = {"started_from": f"{resume.stage}:{resume.epoch}" if resume else "scratch"}
    # Progress bars and MLflow hear from rank 0 only; every rank keeps its last epoch metrics.
    observers: list[FitObserver] = [_LastEpoch(last, marker)]
    if rank == 0 and config.get("relay") is not None:
        observers.append(RelayObserver(config["relay"]))
    if rank == 0 and config.get("tracker") is not None:
        observers.append(TrackingObserver(config["tracker"]))
    observer = ObserverGroup(*observers)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        # DDP only when there is someone to all-reduce with; the module stays on its device.
        if world == 1:
            return module
        return ray.train.torch.prepare_model(module, move_to_device=False)

    shard = data.train_images[torch.from_numpy(shard_indices(len(data.train_images), rank, world))]

    def control(stage: str, epochs: int) -> LoopControl:
        return LoopControl(
            wrap=wrap,
            on_epoch_end=_checkpointer(
                detector, stage, epochs, settings.runtime, rank, world, last
            ),
            resume=resume.loop_state(stage) if resume else None,
        )

    summary: dict[str, float] = {}
    if detector.generative:
        summary |= _fit_generative(detector, data, shard, resume, observer, control, rank)

    # Rank 0 alone from here; the others wait at the matching reports. Their CPUs on rank 0's
    # node would idle, so rank 0 takes them (2 workers on a 2-core box: 2 threads, not 1).
    if rank == 0 and world > 1:
        torch.set_num_threads(max(1, int(config["threads"])) * ctx.get_local_world_size())
    if not (resume and resume.finished("head")):
        with tempfile.TemporaryDirectory() as tmp:
            folder = None
            if rank == 0:
                summary |= detector.fit_head(data.train_images, observer)
                folder = write_checkpoint(Path(tmp), detector, "head", 0, 1)
            _report({"stage": "head", **marker, **summary}, folder, "head")
    detector.freeze_trained()

    with tempfile.TemporaryDirectory() as tmp:
        folder, final = None, {}
        if rank == 0:
            detector.fit_index(data.index_images, observer)
            summary |= detector.calibrate(data.val_images, observer, data.index_images)
            timing = {"train_minutes": (time.perf_counter() - start) / 60.0, "workers": world}
            summary |= timing
            if config.get("tracker") is not None:
                config["tracker"].log_metrics(timing)
            folder = write_checkpoint(Path(tmp), detector, "done", 0, 1)
            final = _finish(detector, folder, product, config, data.dataset_info, summary)
        _report({"stage": "done", **marker, **summary, **final}, folder, "done")


def _fit_generative(
    detector: Any,
    data: Any,
    shard: torch.Tensor,
    resume: Resume | None,
    observer: FitObserver,
    control: Callable[[str, int], Any],
    rank: int,
) -> dict[str, float]:
    """The data-parallel stages: autoencoder, latent scale, UNet (skipping what a checkpoint
    says is finished)."""
    settings = detector.settings
    summary: dict[str, float] = {}
    if not (resume and resume.finished("autoencoder")):
        ae = settings.autoencoder
        summary |= detector.fit_autoencoder(
            shard, observer, control("autoencoder", ae.epochs), seed_offset=rank
        )
    else:
        detector.freeze_autoencoder()
    summary |= detector.fit_scaling(data.train_images)
    if not (resume and resume.finished("unet")):
        summary |= detector.fit_unet(
            detector.encode_images(shard),
            observer,
            control("unet", settings.unet.epochs),
            seed_offset=rank,
        )
    else:
        detector.unet.eval().requires_grad_(False)
    return summary


def _finish(
    detector: Any,
    folder: Path,
    product: str,
    config: dict[str, Any],
    dataset_info: dict[str, Any],
    summary: dict[str, float],
) -> dict[str, Any]:
    """Rank 0 after training: the bundle, then (if asked) the test-split report, example
    heatmaps and the severity histogram, all inside the final checkpoint."""
    from edge_ad.bundle import Bundle, save_bundle

    bundle_dir = folder / BUNDLE_DIR
    save_bundle(detector, bundle_dir, product, metrics=summary, extra={"dataset": dataset_info})
    report_dir = folder / REPORT_DIR
    report_dir.mkdir()
    if detector.method == "d3ad":
        _severity_plot(detector, report_dir / "plots")
    if not config.get("evaluate", True):
        return {}
    report = _evaluate(Bundle(detector, product), config, report_dir)
    if report is None:
        return {}
    return {k: v for k, v in report.items() if isinstance(v, int | float) and k != "images"}


def _severity_plot(detector: Any, out: Path) -> None:
    from edge_ad.d3ad.severity import timesteps_for_bins
    from edge_ad.visualize import severity_histogram_png

    s, sev = detector.settings.severity, detector.severity
    bins = np.arange(1, s.num_bins + 1)
    timesteps = timesteps_for_bins(bins, s.num_bins, s.t_max, s.min_bin, s.round_to)
    out.mkdir(parents=True, exist_ok=True)
    severity_histogram_png(
        np.asarray(sev.train_distances),
        np.asarray(sev.bin_edges),
        list(timesteps),
        out / "severity.png",
    )


def _evaluate(bundle: Any, config: dict[str, Any], report_dir: Path) -> dict[str, Any] | None:
    """The test-split report, or None when the dataset has no labelled test split."""
    from edge_ad.data import load_dataset
    from edge_ad.engine import evaluate, infer_images

    dataset = load_dataset(config["data_root"], bundle.product, config["layout"])
    labels = {s.label for s in dataset.test}
    if labels != {0, 1}:
        (report_dir / "eval-skipped.txt").write_text(
            "no test split with both normal and defective images: nothing to evaluate\n"
        )
        return None
    report = evaluate(bundle, config["data_root"], bundle.product, config["layout"])
    (report_dir / "report.json").write_text(json.dumps(report, indent=2))
    examples: list[Path] = []
    for defect_type in sorted({s.defect_type for s in dataset.test}):
        group = [s for s in dataset.test if s.defect_type == defect_type]
        examples.append(Path(group[0].image_path))
    infer_images(bundle, examples[:MAX_EXAMPLE_HEATMAPS], report_dir / "heatmaps")
    return report


# ----------------------------------------------------------------------------- driver


def _trainer(
    config: dict[str, Any], settings: Settings, storage: Path, run_name: str, opts: TrainOptions
):
    import ray.train
    from ray.train.torch import TorchTrainer

    rt = settings.runtime
    use_gpu = rt.gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": config["threads"]}
    if use_gpu:
        resources["GPU"] = rt.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=rt.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )


def _worker_error(err: BaseException) -> BaseException:
    """A user-facing error raised inside a worker, so the CLI prints it as one line."""
    failures = getattr(err, "worker_failures", None) or {}
    for failure in failures.values():
        cause = failure
        while cause is not None and not isinstance(cause, EdgeADError):
            cause = cause.__cause__
        if isinstance(cause, EdgeADError):
            return cause
    return err


def train_one(
    request: TrainRequest, settings: Settings, opts: TrainOptions, jobs: int = 1
) -> JobResult:
    """Run one product's Ray Train job to the end; return where its bundle and model went."""
    import ray

    from edge_ad import registry
    from edge_ad.engine import check_output_dir

    product = request.product
    output = check_output_dir(request.output, product)
    storage = (opts.storage_path or default_storage()).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    previous = _run_to_resume(storage, product) if opts.resume else None
    run_name = (
        previous["run_name"]
        if previous
        else f"{product}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )

    tracker = None
    if opts.track:
        uri = registry.tracking_uri(opts.tracking_uri)
        if previous and previous.get("mlflow_run_id"):
            tracker = registry.resume_run(uri, previous["mlflow_run_id"])
        else:
            tags = {
                "ray_run_name": run_name,
                "workers": str(settings.runtime.workers),
                "method": settings.method,
                **opts.extra_tags,
            }
            tracker = registry.start_run(
                product, settings.to_dict(), uri, run_name=run_name, tags=tags
            )
    _latest_path(storage, product).write_text(json.dumps({"run_name": run_name}))
    state = {
        "product": product,
        "status": "running",
        "mlflow_run_id": tracker.run_id if tracker else None,
        "tracking_uri": tracker.uri if tracker else None,
    }
    _write_state(storage, run_name, state)

    relay = None
    observer = opts.observer_factory(product) if opts.observer_factory else None
    if observer is not None:
        from pipelines.observers import ProgressRelay

        relay = ProgressRelay.remote()
    config = {
        "product": product,
        "data_root": str(Path(request.data_root).expanduser().resolve()),
        "layout": request.layout,
        "settings": settings.to_dict(),
        "threads": _cpus_per_worker(settings, jobs),
        "relay": relay,
        "tracker": tracker,
        "evaluate": opts.evaluate,
    }
    start = time.perf_counter()
    try:
        if relay is not None:
            from pipelines.observers import RelayPump

            with RelayPump(relay, observer):
                result = _trainer(config, settings, storage, run_name, opts).fit()
        else:
            result = _trainer(config, settings, storage, run_name, opts).fit()
    except Exception as err:
        _write_state(storage, run_name, {**state, "status": "failed", "error": str(err)[:500]})
        if tracker is not None:
            tracker.finish("FAILED")
        raise _worker_error(err) from None
    finally:
        if relay is not None:
            ray.kill(relay)
    wall = time.perf_counter() - start

    with result.checkpoint.as_directory() as folder:
        folder = Path(folder)
        if output.exists():
            shutil.rmtree(output)
        shutil.copytree(folder / BUNDLE_DIR, output)
        report_file = folder / REPORT_DIR / "report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else None
        version = None
        if tracker is not None:
            artifacts = {
                name: folder / REPORT_DIR / name
                for name in ("heatmaps", "plots")
                if (folder / REPORT_DIR / name).is_dir()
            }
            if opts.register:
                version = registry.log_trained_model(tracker, output, product, report, artifacts)
            else:
                registry.log_eval(tracker, report, artifacts)
    metrics = dict(result.metrics or {})
    summary = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    started_from = str(metrics.get("started_from", "scratch"))
    if tracker is not None:
        tracker.log_metrics({"wall_seconds": wall})
        tracker.set_tags({"started_from": started_from})
        tracker.finish("FINISHED")
    _write_state(
        storage,
        run_name,
        {**state, "status": "finished", "bundle_path": str(output), "model_version": version},
    )
    return JobResult(
        product=product,
        bundle_path=output,
        run_name=run_name,
        mlflow_run_id=tracker.run_id if tracker else None,
        model_version=version,
        summary=summary,
        report=report,
        workers=settings.runtime.workers,
        wall_seconds=wall,
        resumed=previous is not None,
        started_from=started_from,
    )


def train_products(
    requests: Sequence[TrainRequest],
    settings: Settings,
    opts: TrainOptions | None = None,
    address: str | None = None,
) -> list[JobResult]:
    """Train every product as its own Ray Train job, concurrently, sharing the cluster.

    Returns one result per product in request order; if any job fails, the others still run
    to the end and the first error is raised afterwards.
    """
    opts = opts or TrainOptions()
    names = [r.product for r in requests]
    if len(set(names)) != len(names):
        raise EdgeADError(f"a product is listed twice: {', '.join(names)}")
    ensure_ray(address)
    if len(requests) == 1:
        return [train_one(requests[0], settings, opts)]
    results: dict[str, JobResult] = {}
    errors: dict[str, BaseException] = {}
    lock = threading.Lock()

    def run(request: TrainRequest) -> None:
        try:
            result = train_one(request, settings, opts, jobs=len(requests))
            with lock:
                results[request.product] = result
        except BaseException as err:  # reported after every job has ended
            with lock:
                errors[request.product] = err

    with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="train") as pool:
        list(pool.map(run, requests))
    if errors:
        product, err = next(iter(errors.items()))
        if isinstance(err, EdgeADError):
            raise type(err)(f"{product}: {err}") from None
        raise err
    return [results[r.product] for r in requests]
