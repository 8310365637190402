"""The Kubernetes files cannot drift from the code: every import path, argument, CLI option,
topic name, endpoint and Secret key they use is checked against the real thing.

(Schema validity of each object is tests/unit/test_k8s_manifests.py's job.)
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p for p in (REPO / "k8s" / "overlays").iterdir() if p.is_dir())
# The base renders on its own too (image placeholders, no Secret): its serveConfigV2 and
# entrypoint are what an overlay inherits unless it replaces them.
RENDERED = [REPO / "k8s" / "base", *OVERLAYS]


def _render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _parse_cli(argv: list[str]) -> Any:
    """Parse ``edge-ad SUB ARGS...`` with the real CLI (nothing runs)."""
    import cli

    assert argv[0] == "edge-ad", argv
    group = typer.main.get_command(cli.app)
    command = group.commands[argv[1]]  # type: ignore[attr-defined]
    try:
        return command.make_context(argv[1], argv[2:])
    except Exception as err:  # typer ships its own click: its UsageError is not click's
        if not hasattr(err, "format_message"):
            raise
        pytest.fail(f"{shlex.join(argv)}: {err.format_message()}")


def _config(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The edge-ad-config ConfigMap's data (the endpoints every pod reads)."""
    return next(
        d["data"] for d in _of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "edge-ad-config"
    )


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def _pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            specs.append(spec["template"]["spec"])
        elif d["kind"] == "RayService":
            cluster = spec["rayClusterConfig"]
            specs += [cluster["headGroupSpec"]["template"]["spec"]]
            specs += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
        elif d["kind"] == "RayJob":
            cluster = spec["rayClusterSpec"]
            specs += [cluster["headGroupSpec"]["template"]["spec"]]
            specs += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
            specs += [spec["submitterPodTemplate"]["spec"]]
    return specs


@pytest.fixture(scope="module", params=RENDERED, ids=[p.name for p in RENDERED])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param.name, _render(request.param)


def test_overlays_exist() -> None:
    assert {p.name for p in OVERLAYS} == {"dev", "prod"}


def test_serve_config_names_real_code_and_options(
    rendered: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve import ServeOptions, options_from_args

    _, docs = rendered
    config = _config(docs)
    for key in ("EDGE_AD_BOOTSTRAP", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, config[key])
    (service,) = _of_kind(docs, "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray's own schema for serve deploy
    for app in serve_config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        assert callable(builder)
        options = options_from_args(app.get("args", {}))
        assert isinstance(options, ServeOptions)
        assert options.bootstrap == config["EDGE_AD_BOOTSTRAP"]
        assert options.scorer_min_replicas <= options.scorer_max_replicas
        assert options.device in ("auto", "cpu", "cuda")
        # GPU scorers only where the worker group has GPUs to give, and no more of them
        # than the largest worker group can hold.
        workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        gpus = [
            (g["maxReplicas"], c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
            for g in workers
            for c in g["template"]["spec"]["containers"]
        ]
        assert (options.scorer_gpus > 0) == any(per_pod for _, per_pod in gpus), gpus
        if options.scorer_gpus:
            room = sum(n * per_pod for n, per_pod in gpus) / options.scorer_gpus
            assert options.scorer_max_replicas <= room, (options.scorer_max_replicas, room)


def test_training_job_runs_a_real_command(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for job in _of_kind(docs, "RayJob"):
        ctx = _parse_cli(shlex.split(job["spec"]["entrypoint"]))
        params = ctx.params
        assert params["product"], "the job must name its product"
        workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        assert params["workers"] == sum(g["replicas"] for g in workers), (
            "--workers must match the worker group's replicas"
        )
        has_gpu = any(
            c["resources"].get("limits", {}).get("nvidia.com/gpu")
            for g in workers
            for c in g["template"]["spec"]["containers"]
        )
        assert bool(params["gpus_per_worker"]) == bool(has_gpu)
        mounts = {
            m["mountPath"]
            for g in workers
            for c in g["template"]["spec"]["containers"]
            for m in c.get("volumeMounts", [])
        }
        assert str(params["data_root"]) in mounts
        assert str(params["storage_path"]).startswith(tuple(mounts))


def test_mlflow_server_command_parses_with_mlflow(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    from mlflow.cli import cli as mlflow_cli

    _, docs = rendered
    (deployment,) = [d for d in _of_kind(docs, "Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    ctx = mlflow_cli.commands["server"].make_context("server", list(container["args"]))
    assert ctx.params["serve_artifacts"] is True
    (service,) = [d for d in _of_kind(docs, "Service") if d["metadata"]["name"] == "mlflow"]
    port = service["spec"]["ports"][0]["port"]
    assert f"--port={port}" in container["args"]


def test_endpoints_topics_and_secret_keys_agree(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    from edge_ad.stream.schema import DLQ_TOPIC, FRAMES_TOPIC, VERDICTS_TOPIC

    name, docs = rendered
    config = _config(docs)
    (kafka,) = _of_kind(docs, "Kafka")
    plain = next(x for x in kafka["spec"]["kafka"]["listeners"] if not x["tls"])
    assert (
        config["EDGE_AD_BOOTSTRAP"]
        == f"{kafka['metadata']['name']}-kafka-bootstrap:{plain['port']}"
    )
    services = {d["metadata"]["name"]: d for d in _of_kind(docs, "Service")}
    host, port = config["MLFLOW_TRACKING_URI"].removeprefix("http://").split(":")
    assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]

    topics = {t["spec"]["topicName"] for t in _of_kind(docs, "KafkaTopic")}
    assert topics == {FRAMES_TOPIC, VERDICTS_TOPIC, DLQ_TOPIC}
    for topic in _of_kind(docs, "KafkaTopic"):
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]

    # Every Secret/ConfigMap key a container reads exists: rendered here, or (prod) the
    # edge-ad-secrets Secret that k8s/README.md tells the operator to create, with these keys.
    readme = (REPO / "k8s" / "README.md").read_text()
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in _of_kind(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"]: d.get("data", {}) for d in _of_kind(docs, "Secret")}
    for spec in _pod_specs(docs):
        for container in _containers(spec):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in maps
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    key = ref["configMapKeyRef"]
                    assert key["key"] in maps[key["name"]]
                if "secretKeyRef" in ref:
                    key = ref["secretKeyRef"]
                    if key["name"] in secrets:
                        assert key["key"] in secrets[key["name"]], (name, key)
                    else:
                        assert name in ("base", "prod") and key["name"] == "edge-ad-secrets"
                        assert key["key"] in readme, f"k8s/README.md must list {key['key']}"


def test_edge_ad_pods_run_as_non_root_with_limits(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    for spec in _pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in _containers(spec):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
