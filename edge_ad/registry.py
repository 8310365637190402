"""MLflow tracking and model registry: runs, registered bundles, aliases and the promotion gate.

One experiment and one registered model per product, both named ``edge-ad-<product>``. A
training run logs the resolved settings as params, its losses as metrics and, at the end, the
bundle as a pyfunc model (:mod:`edge_ad.pyfunc_model`) registered as a new version that carries
its eval metrics as ``metric.<key>`` tags and takes the ``staging`` alias. ``promote`` moves
``production`` only to a version that is not worse than the current holder (unless forced), and
records who did it, when and why on the version.

Storage defaults to ``sqlite:///<EDGE_AD_HOME>/mlruns.db`` with artifacts in
``<EDGE_AD_HOME>/mlartifacts`` (a local sqlite store keeps its artifacts beside the database);
``MLFLOW_TRACKING_URI`` or an explicit ``uri`` points everything at a tracking server instead.

Everything goes through an ``MlflowClient`` bound to one URI. The few MLflow calls that read
the process-wide tracking/registry URIs instead (logging a model, registering a ``models:/``
source, downloading one) run inside :func:`_mlflow_globals`, which sets them and puts them back.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

import edge_ad
from edge_ad.errors import EdgeADError
from edge_ad.names import check_product_name, is_product_name
from edge_ad.paths import edge_home

PREFIX = "edge-ad-"
STAGING, PRODUCTION = "staging", "production"
GATE_METRICS = ("image_auroc", "pro")
"""Promotion refuses a candidate below the current holder on any of these."""
METRIC_TAG = "metric."
MODEL_ARTIFACT = "model"
BUNDLE_ARTIFACT = "bundle"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
_TERMINAL = ("FINISHED", "FAILED", "KILLED")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w\-]+)|/(?P<version>\w+))/?$")
_globals_lock = threading.RLock()


class PromotionRefused(EdgeADError):
    """The candidate version is worse than the one holding the alias (and ``force`` is off)."""


# ----------------------------------------------------------------------------- names and URIs


def tracking_uri(explicit: str | None = None) -> str:
    """``explicit`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<EDGE_AD_HOME>/mlruns.db``."""
    if explicit:
        return explicit
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    return f"sqlite:///{edge_home().resolve()}/mlruns.db"


def model_name(product: str) -> str:
    return f"{PREFIX}{check_product_name(product)}"


def experiment_name(product: str) -> str:
    return f"{PREFIX}{check_product_name(product)}"


def _product_of(name: str) -> str:
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def _client(uri: str | None) -> MlflowClient:
    resolved = tracking_uri(uri)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


def _artifact_root(uri: str) -> Path | None:
    """Where a local sqlite store keeps artifacts: beside the database. MLflow's default for a
    database store is ``./mlruns`` in whatever directory the process happens to run in."""
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server (or file store) decides for itself
    db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if str(db) in ("", ":memory:"):
        return None
    return db.parent.resolve() / "mlartifacts"


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "message", "") or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _not_found(err: MlflowException) -> bool:
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _exists(err: MlflowException) -> bool:
    return err.error_code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


@contextmanager
def _friendly(uri: str) -> Iterator[None]:
    """MLflow failures that are not bugs (server down, database unreadable) as one line."""
    try:
        yield
    except EdgeADError:
        raise
    except MlflowException as err:
        reason = _first_line(err)
        if "API request to" in reason or "failed with exception" in reason:
            raise EdgeADError(
                f"cannot reach the MLflow tracking server at {uri} ({reason}); start it or "
                "point MLFLOW_TRACKING_URI elsewhere"
            ) from None
        raise EdgeADError(f"MLflow at {uri}: {reason}") from None
    except OSError as err:
        raise EdgeADError(f"cannot use the MLflow store at {uri}: {_first_line(err)}") from None


@contextmanager
def _mlflow_globals(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at ``uri`` for one call.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` (and setting it back to
    ``None`` deletes the variable), so the previous values and variables are restored by hand.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _globals_lock:
        env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        old_tracking, old_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            yield
        finally:
            mlflow.set_tracking_uri(old_tracking)
            registry_utils._registry_uri = old_registry
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def ensure_experiment(product: str, uri: str | None = None) -> str:
    """The product's experiment id (created, or restored from the trash, when needed).

    In a local sqlite store the experiment's artifacts go to ``<db dir>/mlartifacts/<name>``
    (for the default store: ``<EDGE_AD_HOME>/mlartifacts/edge-ad-<product>``).
    """
    resolved = tracking_uri(uri)
    client = _client(resolved)
    name = experiment_name(product)
    with _friendly(resolved):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        root = _artifact_root(resolved)
        location = (root / name).as_uri() if root is not None else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as err:
            if not _exists(err):
                raise
            # Another process (a second Ray worker) created it meanwhile.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id


# ----------------------------------------------------------------------------- runs


def _numeric(value: Any) -> float | None:
    """A finite number as float; None for anything else (bools, strings, NaN, containers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _key(key: str) -> str:
    # MLflow accepts letters, digits and _ - . / space : in metric and param names.
    return re.sub(r"[^\w\-. /:]", "_", str(key))[:MAX_ENTITY_KEY_LENGTH]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"unet": {"epochs": 100}}`` → ``{"unet.epochs": 100}`` (already flat dicts pass)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


@dataclass
class RunTracker:
    """Handle on one MLflow run. Holds only the URI and run id, so it pickles cheaply: Ray
    ships it to the training workers and each opens its own client."""

    uri: str
    run_id: str
    _cached: MlflowClient | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, str]:
        return {"uri": self.uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.uri, self.run_id, self._cached = state["uri"], state["run_id"], None

    @property
    def client(self) -> MlflowClient:
        if self._cached is None:
            self._cached = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._cached

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log the finite numeric entries (others are skipped: a NaN loss must not fail a run)."""
        now = int(time.time() * 1000)
        batch = [
            Metric(_key(k), number, now, int(step or 0))
            for k, v in metrics.items()
            if (number := _numeric(v)) is not None
        ]
        with _friendly(self.uri):
            for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=chunk)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log ``str(value)``, truncated to MLflow's length limit."""
        batch = [Param(_key(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        with _friendly(self.uri):
            for chunk in _chunks(batch, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=chunk)

    def set_tags(self, tags: dict[str, str]) -> None:
        batch = [RunTag(str(k), str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        with _friendly(self.uri):
            for chunk in _chunks(batch, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=chunk)

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        """Upload ``folder`` (or a single file) under ``artifact_path`` of the run."""
        folder = Path(folder)
        if not folder.exists():
            raise EdgeADError(f"cannot log artifacts from {folder}: it does not exist")
        with _friendly(self.uri):
            if folder.is_dir():
                self.client.log_artifacts(self.run_id, str(folder), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(folder), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED."""
        if status not in _TERMINAL:
            raise ValueError(f"status must be one of {', '.join(_TERMINAL)}, got {status!r}")
        with _friendly(self.uri):
            self.client.set_terminated(self.run_id, status)


def start_run(
    product: str,
    settings_dict: dict[str, Any],
    uri: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> RunTracker:
    """A RUNNING run in the product's experiment with the resolved settings as params
    (flattened: ``unet.epochs``) and as ``config/settings.json`` (nested, to rebuild them)."""
    from mlflow.tracking.context.registry import resolve_tags

    resolved = tracking_uri(uri)
    experiment_id = ensure_experiment(product, resolved)
    client = _client(resolved)
    # resolve_tags adds what mlflow.start_run would: user, source, git commit.
    run_tags = resolve_tags({"product": product, **(tags or {})})
    with _friendly(resolved):
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
    tracker = RunTracker(resolved, run.info.run_id)
    tracker.log_params(flatten(settings_dict))
    with _friendly(resolved):
        text = json.dumps(settings_dict, indent=2, default=str)
        client.log_text(tracker.run_id, text, "config/settings.json")
    return tracker


def resume_run(uri: str, run_id: str) -> RunTracker:
    """Reopen an existing run (status back to RUNNING), e.g. after a restarted training job."""
    resolved = tracking_uri(uri)
    client = _client(resolved)
    with _friendly(resolved):
        try:
            client.get_run(run_id)
        except MlflowException as err:
            if _not_found(err):
                raise EdgeADError(f"MLflow run {run_id} does not exist in {resolved}") from None
            raise
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    return RunTracker(resolved, run_id)


# ----------------------------------------------------------------------------- models


def report_metrics(report: dict[str, Any] | None) -> dict[str, float]:
    """The scalar numeric entries of an eval report (None, text and nested values left out)."""
    return {
        str(k): number for k, v in (report or {}).items() if (number := _numeric(v)) is not None
    }


def _input_example(bundle_path: Path) -> Any:
    """One mid-grey PNG at the bundle's image size, in the shape ``predict`` takes."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    from edge_ad.bundle import read_meta

    size = int(read_meta(bundle_path)["settings"]["data"]["image_size"])
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, dtype=np.uint8)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def _ensure_registered_model(client: MlflowClient, name: str, product: str) -> None:
    try:
        client.create_registered_model(
            name,
            tags={"product": product},
            description=f"edge-ad detector for product {product!r} (edge-ad bundle inside; "
            "the version tag `method` says which: d3ad, diffusionad or ran).",
        )
    except MlflowException as err:
        if not _exists(err):
            raise


def log_eval(
    tracker: RunTracker,
    eval_report: dict[str, Any] | None,
    extra_artifacts: dict[str, Path] | None = None,
) -> dict[str, float]:
    """Log the eval report (metrics + ``eval/report.json``) and extra artifact folders to the
    run; return the metrics logged."""
    metrics = report_metrics(eval_report)
    if metrics:
        tracker.log_metrics(metrics)
    with tempfile.TemporaryDirectory(prefix="edge-ad-report-") as tmp:
        if eval_report is not None:
            report_file = Path(tmp) / "report.json"
            report_file.write_text(json.dumps(eval_report, indent=2, default=str))
            tracker.log_artifacts(report_file, "eval")
    for artifact_path, local in (extra_artifacts or {}).items():
        tracker.log_artifacts(Path(local), artifact_path)
    return metrics


def log_trained_model(
    tracker: RunTracker,
    bundle_path: Path,
    product: str,
    eval_report: dict[str, Any] | None,
    extra_artifacts: dict[str, Path] | None = None,
) -> int:
    """Log the eval report and the bundle to the run, register the bundle as a new version of
    ``edge-ad-<product>`` (tagged with its metrics), move ``staging`` to it, return its number.
    """
    from mlflow.models import Model

    from edge_ad.bundle import read_meta

    bundle_path = Path(bundle_path)
    meta = read_meta(bundle_path)  # a clear error now, not a broken registered model later
    client, uri, run_id = tracker.client, tracker.uri, tracker.run_id
    metrics = log_eval(tracker, eval_report, extra_artifacts)

    name = model_name(product)
    with _friendly(uri):
        run = client.get_run(run_id)
        # Created here rather than inside Model.log: left to itself, MLflow files the model
        # under the Default experiment when no fluent run is active.
        logged = client.create_logged_model(
            experiment_id=run.info.experiment_id,
            name=MODEL_ARTIFACT,
            source_run_id=run_id,
            params=dict(run.data.params),
            tags={"product": product},
        )
        # Model.log and create_model_version (which resolves the models:/ source) both use
        # MLflow's process-wide URIs; without this they would open ./mlflow.db in the CWD.
        with _mlflow_globals(uri):
            info = Model.log(
                artifact_path=None,
                name=MODEL_ARTIFACT,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(PYFUNC_CODE),
                artifacts={BUNDLE_ARTIFACT: str(bundle_path)},
                input_example=_input_example(bundle_path),
                # No signature (see edge_ad.pyfunc_model); False stops MLflow inferring one.
                signature=False,
                pip_requirements=[f"edge-ad=={edge_ad.__version__}"],
            )
            _ensure_registered_model(client, name, product)
            method = str(meta.get("method", "d3ad"))
            version_tags = {"product": product, "run_id": run_id, "method": method} | {
                f"{METRIC_TAG}{k}": repr(v) for k, v in metrics.items()
            }
            mv = client.create_model_version(
                name,
                source=info.model_uri,
                run_id=run_id,
                tags=version_tags,
                model_id=logged.model_id,
            )
        client.set_registered_model_alias(name, STAGING, mv.version)
        client.set_tag(run_id, "registered_model", f"{name}/{mv.version}")
    return int(mv.version)


# ----------------------------------------------------------------------------- registry views


@dataclass
class VersionInfo:
    """One registered version as ``edge-ad models`` shows it. ``metrics`` come from the
    ``metric.*`` tags; ``tags`` holds the other tags (product, run_id, promotion records)."""

    product: str
    name: str
    version: int
    aliases: list[str]
    created: str
    run_id: str
    metrics: dict[str, float]
    tags: dict[str, str]


@dataclass
class Promotion:
    """What :func:`promote` did (``forced``: the gate refused and ``force`` overrode it)."""

    product: str
    name: str
    version: int
    alias: str
    previous_version: int | None
    forced: bool
    compared: dict[str, tuple[float | None, float | None]]
    """metric → (candidate, previous holder); None where a version did not record it."""


def _version_metrics(mv: ModelVersion) -> dict[str, float]:
    out = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(METRIC_TAG):
            try:
                out[key[len(METRIC_TAG) :]] = float(value)
            except ValueError:
                continue
    return out


def _iso(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _all_pages(search: Callable[[str | None], Any]) -> list[Any]:
    """Every item of a paged MLflow search (``search(page_token)`` returns a PagedList)."""
    found: list[Any] = []
    token = None
    while True:
        page = search(token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    found = _all_pages(lambda t: client.search_model_versions(f"name = '{name}'", page_token=t))
    return sorted(found, key=lambda mv: -int(mv.version))


def _find_registered_model(client: MlflowClient, product: str) -> RegisteredModel | None:
    """The product's registered model, or None when it has none."""
    try:
        return client.get_registered_model(model_name(product))
    except MlflowException as err:
        if _not_found(err):
            return None
        raise


def _registered_model(client: MlflowClient, product: str, uri: str) -> RegisteredModel:
    rm = _find_registered_model(client, product)
    if rm is None:
        name = model_name(product)
        raise EdgeADError(
            f"no registered model {name} in {uri}; train one with `edge-ad train -p {product}`"
        )
    return rm


def _aliases_by_version(rm: RegisteredModel) -> dict[int, list[str]]:
    by_version: dict[int, list[str]] = {}
    for alias, version in sorted((rm.aliases or {}).items()):
        by_version.setdefault(int(version), []).append(alias)
    return by_version


def list_versions(product: str | None = None, uri: str | None = None) -> list[VersionInfo]:
    """Every version of every ``edge-ad-*`` model (or of one product's), newest first.

    A product without a registered model (or an empty store) gives ``[]``.
    """
    resolved = tracking_uri(uri)
    client = _client(resolved)
    with _friendly(resolved):
        if product is not None:
            found = _find_registered_model(client, product)
            models = [found] if found is not None else []
        else:
            models = _edge_models(client)
        out: list[tuple[int, VersionInfo]] = []
        for rm in sorted(models, key=lambda m: m.name):
            aliases = _aliases_by_version(rm)
            for mv in _versions(client, rm.name):
                info = VersionInfo(
                    product=_product_of(rm.name),
                    name=rm.name,
                    version=int(mv.version),
                    aliases=aliases.get(int(mv.version), []),
                    created=_iso(mv.creation_timestamp),
                    run_id=mv.run_id or "",
                    metrics=_version_metrics(mv),
                    tags={k: v for k, v in (mv.tags or {}).items() if not k.startswith(METRIC_TAG)},
                )
                out.append((mv.creation_timestamp or 0, info))
    return [info for _, info in sorted(out, key=lambda p: (-p[0], p[1].name, -p[1].version))]


def registered_products(uri: str | None = None) -> set[str]:
    """Every product with an ``edge-ad-*`` registered model, in one search (names that break
    the product-name rule are left out)."""
    resolved = tracking_uri(uri)
    client = _client(resolved)
    with _friendly(resolved):
        return {_product_of(m.name) for m in _edge_models(client)}


def _edge_models(client: MlflowClient) -> list[RegisteredModel]:
    """Every ``edge-ad-*`` registered model whose product follows the name rule. A model
    registered outside edge-ad under a name it would refuse (a quote breaks the version
    search's filter) is not one of ours: it is skipped, not allowed to break the listing."""
    models = _all_pages(
        lambda t: client.search_registered_models(f"name LIKE '{PREFIX}%'", page_token=t)
    )
    return [m for m in models if is_product_name(_product_of(m.name))]


def alias_version(product: str, alias: str = PRODUCTION, uri: str | None = None) -> int | None:
    """The version number holding ``alias`` (None if no version holds it or no model exists)."""
    resolved = tracking_uri(uri)
    client = _client(resolved)
    with _friendly(resolved):
        rm = _find_registered_model(client, product)
    if rm is None:
        return None
    version = (rm.aliases or {}).get(alias)
    return int(version) if version is not None else None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers)
        return "unknown"


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def _gate(
    candidate: dict[str, float], holder: dict[str, float]
) -> tuple[dict[str, tuple[float | None, float | None]], list[str]]:
    compared: dict[str, tuple[float | None, float | None]] = {}
    problems = []
    for key in GATE_METRICS:
        new, old = candidate.get(key), holder.get(key)
        compared[key] = (new, old)
        if old is None:
            continue
        if new is None:
            problems.append(f"{key} not recorded (the holder has {_fmt(old)})")
        elif new < old:
            problems.append(f"{key} {_fmt(new)} < {_fmt(old)}")
    return compared, problems


def promote(
    product: str,
    version: int | None = None,
    alias: str = PRODUCTION,
    force: bool = False,
    reason: str | None = None,
    uri: str | None = None,
) -> Promotion:
    """Move ``alias`` to ``version`` (default: the newest) unless it is worse than the version
    holding the alias now on image AUROC or PRO; ``force`` overrides the gate.

    Promoting the version that already holds the alias changes nothing. The promoted version
    records ``promoted_by``, ``promoted_at`` (UTC), ``promotion_reason``, ``promotion_forced``
    (true only when the gate refused and ``force`` overrode it) and ``promoted_from_version``.
    """
    resolved = tracking_uri(uri)
    client = _client(resolved)
    name = model_name(product)
    with _friendly(resolved):
        rm = _registered_model(client, product, resolved)
        versions = {int(mv.version): mv for mv in _versions(client, name)}
        if not versions:
            raise EdgeADError(
                f"{name} has no versions yet; train one with `edge-ad train -p {product}`"
            )
        number = max(versions) if version is None else int(version)
        if number not in versions:
            known = ", ".join(str(v) for v in sorted(versions))
            raise EdgeADError(f"{name} has no version {number} (versions: {known})")
        candidate = versions[number]
        held = (rm.aliases or {}).get(alias)
        previous = int(held) if held is not None else None
        holder = versions.get(previous) if previous is not None else None
        compared, problems = _gate(
            _version_metrics(candidate), _version_metrics(holder) if holder else {}
        )
        if previous == number:
            return Promotion(product, name, number, alias, previous, False, compared)
        if problems and not force:
            raise PromotionRefused(
                f"refusing to give {alias!r} of {name} to version {number}: it is worse than "
                f"version {previous}, which holds it now ({'; '.join(problems)}); pass --force "
                "to promote anyway"
            )
        client.set_registered_model_alias(name, alias, str(number))
        for key, value in {
            "promoted_by": _user(),
            "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "promotion_reason": reason or "",
            "promotion_forced": str(bool(problems)).lower(),
            "promoted_from_version": str(previous) if previous is not None else "none",
            "promoted_alias": alias,
        }.items():
            client.set_model_version_tag(name, str(number), key, value)
    return Promotion(product, name, number, alias, previous, bool(problems), compared)


# ----------------------------------------------------------------------------- loading


def parse_model_uri(model_uri: str) -> tuple[str, int | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → (name, version, alias)."""
    match = _MODEL_URI.match(model_uri.strip())
    if match is None or (match["version"] is not None and not match["version"].isdigit()):
        raise EdgeADError(
            f"{model_uri!r} is not a registry model URI; use models:/edge-ad-PRODUCT@production "
            "or models:/edge-ad-PRODUCT/VERSION"
        )
    version = int(match["version"]) if match["version"] is not None else None
    return match["name"], version, match["alias"]


def _cache_dir(uri: str, name: str, mv: ModelVersion) -> Path:
    # Versions are immutable, but every store has its own "edge-ad-P version 1": key on the
    # store and the logged model behind the version (its models:/m-... source) as well.
    key = hashlib.sha256(f"{uri}|{name}|{mv.version}|{mv.source}".encode()).hexdigest()[:16]
    return edge_home() / "cache" / "registry" / name / f"v{mv.version}-{key}"


def _bundle_dir(model_dir: Path) -> Path:
    from mlflow.models import Model

    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get(BUNDLE_ARTIFACT, {}).get("path")
    if relative is None:
        raise EdgeADError(f"{model_dir} is not an edge-ad model (no {BUNDLE_ARTIFACT} artifact)")
    # The MLmodel file came from the store: its artifact path must stay inside the model
    # directory (an absolute path or ../ would load whatever lies there).
    bundle = (model_dir / str(relative)).resolve()
    if not bundle.is_relative_to(model_dir.resolve()):
        raise EdgeADError(
            f"{model_dir}/MLmodel points its {BUNDLE_ARTIFACT} artifact outside the model "
            f"({relative!r}); refusing to load it"
        )
    return bundle


def _download(uri: str, name: str, mv: ModelVersion) -> Path:
    """The version's MLflow model directory, downloaded once into the edge-ad home's cache."""
    target = _cache_dir(uri, name, mv)
    if (target / "MLmodel").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        # Resolving models:/ reads the process-wide URIs despite the arguments below.
        with _mlflow_globals(uri):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{mv.version}",
                dst_path=str(staging),
                tracking_uri=uri,
                registry_uri=uri,
            )
        try:
            staging.rename(target)  # atomic: a concurrent loader sees all or nothing
        except OSError:
            if not (target / "MLmodel").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_bundle(model_uri: str, uri: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Download the bundle behind a registry URI; return (bundle directory, info).

    ``info`` holds ``name``, ``version``, ``alias`` (None for a numbered URI), ``product`` and
    ``run_id``. The directory is what :func:`edge_ad.bundle.load_bundle` takes.
    """
    from edge_ad.bundle import read_meta

    name, version, alias = parse_model_uri(model_uri)
    product = _product_of(name)
    resolved = tracking_uri(uri)
    client = _client(resolved)
    with _friendly(resolved):
        rm = _registered_model(client, product, resolved) if name.startswith(PREFIX) else None
        if rm is None:
            try:
                rm = client.get_registered_model(name)
            except MlflowException as err:
                if _not_found(err):
                    raise EdgeADError(f"no registered model {name} in {resolved}") from None
                raise
        if alias is not None:
            held = (rm.aliases or {}).get(alias)
            if held is None:
                known = ", ".join(f"{a}=v{v}" for a, v in sorted((rm.aliases or {}).items()))
                raise EdgeADError(
                    f"no version of {name} has alias {alias!r} (aliases: {known or 'none'}); "
                    f"promote one with `edge-ad promote -p {product}`"
                )
            version = int(held)
        try:
            mv = client.get_model_version(name, str(version))
        except MlflowException as err:
            if _not_found(err):
                raise EdgeADError(f"{name} has no version {version}") from None
            raise
        bundle = _bundle_dir(_download(resolved, name, mv))
    read_meta(bundle)
    info = {
        "name": name,
        "version": int(mv.version),
        "alias": alias,
        "product": product,
        "run_id": mv.run_id,
    }
    return bundle, info
