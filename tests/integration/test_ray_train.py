"""Ray Train + MLflow, for real: a local Ray cluster, an MLflow sqlite store, tiny models.

Covers: two data-parallel workers train and register a model with params,
per-epoch metrics, eval metrics and artifacts; promotion and its gate; the pyfunc model loaded
by alias scores like the bundle; a worker killed mid-training and the job finishing from its
checkpoint; ``--resume`` of an interrupted run; two products in one command.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from edge_ad import registry  # noqa: E402
from edge_ad.bundle import load_bundle  # noqa: E402
from edge_ad.config import load_settings  # noqa: E402
from edge_ad.errors import EdgeADError  # noqa: E402
from pipelines.train import TrainOptions, TrainRequest, train_one, train_products  # noqa: E402

# Small but not trivial: enough epochs that a kill lands mid-training.
TINY = ["data.max_train_images=32", "autoencoder.epochs=6", "unet.epochs=8", "adapt.epochs=1"]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, Path]:
    """An MLflow sqlite store and a Ray Train storage folder of the test's own."""
    return f"sqlite:///{tmp_path / 'mlruns.db'}", tmp_path / "ray_results"


def _png_bytes(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def _test_frames(root: Path, product: str, size: int, n: int = 6) -> np.ndarray:
    from edge_ad.data import load_dataset, read_image

    samples = load_dataset(root, product).test[:n]
    return np.stack([read_image(s.image_path, size) for s in samples])


def test_two_workers_train_track_register_promote(
    local_ray: None, synth_root: Path, store: tuple[str, Path], tmp_path: Path
) -> None:
    uri, storage = store
    settings = load_settings("tiny", overrides=[*TINY, "runtime.workers=2"])
    opts = TrainOptions(storage_path=storage, tracking_uri=uri)
    good = train_one(
        TrainRequest("synth-pcb", str(synth_root), output=str(tmp_path / "v1")), settings, opts
    )
    assert good.workers == 2 and good.model_version == 1 and good.started_from == "scratch"
    bundle = load_bundle(good.bundle_path)
    assert bundle.detector.is_fitted

    client = mlflow.MlflowClient(uri)
    run = client.get_run(good.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["unet.epochs"] == "8"
    assert run.data.params["runtime.workers"] == "2"
    # Per-epoch losses logged by rank 0 as they happened: one point per epoch.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "unet_loss")] == list(
        range(8)
    )
    assert len(client.get_metric_history(run.info.run_id, "ae_loss")) == 6
    for key in ("image_auroc", "pixel_auroc", "pro", "threshold", "train_minutes"):
        assert key in run.data.metrics, key
    assert 0.0 <= run.data.metrics["image_auroc"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"heatmaps", "plots"} <= artifacts
    heatmaps = [a.path for a in client.list_artifacts(run.info.run_id, "heatmaps")]
    assert any(p.endswith(".png") for p in heatmaps)

    versions = registry.list_versions("synth-pcb", uri=uri)
    assert [v.version for v in versions] == [1] and "staging" in versions[0].aliases
    # The registered version carries the bundle itself, and it scores like the one on disk.
    registered, info = registry.resolve_bundle("models:/edge-ad-synth-pcb/1", uri)
    assert int(info["version"]) == 1
    size = bundle.detector.settings.data.image_size
    frames = torch.from_numpy(_test_frames(synth_root, "synth-pcb", size)).permute(0, 3, 1, 2)
    assert torch.equal(
        load_bundle(registered).detector.predict(frames).scores,
        bundle.detector.predict(frames).scores,
    )

    # A deliberately crippled candidate: hardly trained, no adaptation.
    weak_settings = load_settings(
        "tiny",
        overrides=[*TINY, "autoencoder.epochs=1", "unet.epochs=1", "adapt.epochs=0"],
    )
    weak = train_one(
        TrainRequest("synth-pcb", str(synth_root), output=str(tmp_path / "v2")),
        weak_settings,
        opts,
    )
    assert weak.model_version == 2
    metrics = {r.model_version: (r.report["image_auroc"], r.report["pro"]) for r in (good, weak)}
    # The gate refuses a version worse on I-AUROC or PRO. Order the two by their recorded
    # (I-AUROC, PRO): the lower one is then below the higher on at least one of the two.
    better, worse = (1, 2) if metrics[1] > metrics[2] else (2, 1)
    assert metrics[better] != metrics[worse]
    first = registry.promote("synth-pcb", version=better, uri=uri, reason="first model")
    assert first.previous_version is None
    with pytest.raises(registry.PromotionRefused):
        registry.promote("synth-pcb", version=worse, uri=uri)
    assert registry.alias_version("synth-pcb", "production", uri=uri) == better
    forced = registry.promote("synth-pcb", version=worse, uri=uri, force=True, reason="test")
    assert forced.forced and forced.previous_version == better
    assert registry.alias_version("synth-pcb", "production", uri=uri) == worse
    registry.promote("synth-pcb", version=better, uri=uri, force=True, reason="back")

    # The pyfunc model behind the alias scores frames exactly as the bundle does.
    # load_model reads MLflow's process-wide URIs: set them for this call only (set_tracking_uri
    # also exports MLFLOW_TRACKING_URI, which would leak into later tests).
    with registry._mlflow_globals(uri):
        model = mlflow.pyfunc.load_model("models:/edge-ad-synth-pcb@production")
    prod_bundle = load_bundle(tmp_path / f"v{better}")
    size = prod_bundle.detector.settings.data.image_size
    frames = _test_frames(synth_root, "synth-pcb", size)
    import pandas as pd

    out = model.predict(pd.DataFrame({"image": [_png_bytes(f) for f in frames]}))
    expected = prod_bundle.detector.predict(torch.from_numpy(frames).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(out["score"].to_numpy(np.float32), expected.scores.numpy())
    assert out["timestep"].tolist() == expected.timesteps.tolist()


def _train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray sets their process title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if cmdline.startswith("ray::RayTrainWorker"):
            pids.append(int(entry.name))
    return sorted(pids)


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
def test_killed_worker_resumes_from_checkpoint(
    local_ray: None, synth_root: Path, store: tuple[str, Path], tmp_path: Path
) -> None:
    uri, storage = store
    settings = load_settings(
        "tiny",
        overrides=[
            *TINY,
            "unet.epochs=30",
            "runtime.checkpoint_interval_s=0",
            "runtime.workers=2",
            "runtime.cpus_per_worker=1",
        ],
    )
    opts = TrainOptions(storage_path=storage, tracking_uri=uri, max_failures=2, evaluate=False)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = train_one(
                TrainRequest("synth-pcb", str(synth_root), output=str(tmp_path / "m")),
                settings,
                opts,
            )
        except BaseException as err:  # surfaced by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    # Kill a worker as soon as a UNet checkpoint is on disk (the job is mid-UNet then).
    _wait_for(lambda: list(storage.glob("*/unet-*")), 300, "a UNet checkpoint")
    pids = _wait_for(_train_worker_pids, 30, "the train worker processes")
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    # The restarted worker group began from a checkpoint, not from scratch: the latest one
    # Ray Train had registered when the worker died (the UNet one being written may not be).
    assert result.started_from != "scratch"
    stage, epoch = result.started_from.split(":")
    assert stage in ("autoencoder", "unet") and int(epoch) >= 0
    run = mlflow.MlflowClient(uri).get_run(result.mlflow_run_id)
    assert run.data.tags["started_from"] == result.started_from
    assert load_bundle(result.bundle_path).detector.is_fitted


def test_resume_refuses_without_an_unfinished_run(
    local_ray: None, synth_root: Path, store: tuple[str, Path]
) -> None:
    uri, storage = store
    opts = TrainOptions(storage_path=storage, tracking_uri=uri, resume=True)
    with pytest.raises(EdgeADError, match="nothing to resume"):
        train_products([TrainRequest("synth-pcb", str(synth_root))], load_settings("tiny"), opts)


def test_two_products_one_command(
    synth_root: Path, tmp_path: Path, run_cli: Callable[..., Any], edge_home: Path
) -> None:
    from edge_ad.data.synthetic import SynthSpec, generate_dataset

    data = tmp_path / "data"
    spec = SynthSpec(image_size=64, n_train=40, n_test_good=8, n_test_per_defect=3, seed=1)
    for product in ("board-a", "board-b"):
        generate_dataset(product, data, spec)
    sets = [arg for item in TINY for arg in ("--set", item)]
    result = run_cli(
        "train",
        "-p",
        "board-a",
        "-p",
        "board-b",
        "--data-root",
        str(data),
        "--profile",
        "tiny",
        *sets,
        "--output",
        str(tmp_path / "models"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "models" / "board-a" / "bundle.json").is_file()
    assert (tmp_path / "models" / "board-b" / "bundle.json").is_file()
    uri = f"sqlite:///{edge_home / 'mlruns.db'}"
    client = mlflow.MlflowClient(uri)
    for product in ("board-a", "board-b"):
        experiment = client.get_experiment_by_name(registry.experiment_name(product))
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert [v.version for v in registry.list_versions(product, uri=uri)] == [1]
    listing = run_cli("models")
    assert listing.returncode == 0, listing.stderr
    assert "edge-ad-board-a" in listing.stdout and "edge-ad-board-b" in listing.stdout
    promoted = run_cli("promote", "-p", "board-a", "--reason", "first line-3 model")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert registry.alias_version("board-a", "production", uri=uri) == 1


def test_resume_continues_a_killed_command(
    synth_root: Path, tmp_path: Path, run_cli: Callable[..., Any], edge_home: Path
) -> None:
    """``edge-ad train`` killed outright (driver, local Ray and all), then ``--resume``."""
    import subprocess
    import sys

    sets = [
        arg
        for item in [*TINY, "unet.epochs=30", "runtime.checkpoint_interval_s=0"]
        for arg in ("--set", item)
    ]
    args = ["train", "-p", "synth-pcb", "--data-root", str(synth_root), "--profile", "tiny", *sets]
    env = {**os.environ, "EDGE_AD_HOME": str(edge_home), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from cli import app; app()", *args],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the local Ray dies with it
    )
    storage = edge_home / "ray_results"
    try:
        _wait_for(lambda: list(storage.glob("*/unet-*")), 300, "a UNet checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    _wait_for(lambda: not _train_worker_pids(), 60, "the old workers to exit")
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "continued from checkpoint" in result.stdout
    assert (edge_home / "models" / "synth-pcb" / "bundle.json").is_file()
    again = run_cli(*args, "--resume")  # nothing left to resume now
    assert again.returncode == 1 and "nothing to resume" in again.stderr
