"""Offline validation of the Kubernetes manifests of k8s/ (kustomize base and overlays).

Every overlay is rendered with ``kubectl kustomize`` and each object is checked against a
schema, with no cluster:

* Kubernetes core kinds: the strict JSON schemas of ``kubernetes-validate`` (unknown fields
  are errors, as with ``kubectl apply --validate=strict``);
* custom resources (KubeRay ``ray.io/v1``, Strimzi ``kafka.strimzi.io/v1beta2``): the CRD
  schemas vendored in k8s/schemas (see SOURCES.md there), made strict the way the API server
  applies a structural schema: unknown fields are errors unless the schema preserves them,
  ``null`` values are dropped first, and ``metadata`` is checked as a core ObjectMeta.

An object whose apiVersion/kind has neither kind of schema is a problem too.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from packaging.version import Version
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = K8S / "schemas"

# The newest Kubernetes release kubernetes-validate ships schemas for, up to 1.33.
K8S_VERSION = max(
    (v for v in kv_utils.all_versions() if Version(v) <= Version("1.33")),
    key=Version,
    default=kv_utils.latest_version(),
)

VENDORED = [
    "ray.io_v1_rayservice.json",
    "ray.io_v1_rayjob.json",
    "ray.io_v1_raycluster.json",
    "kafka.strimzi.io_v1beta2_kafka.json",
    "kafka.strimzi.io_v1beta2_kafkatopic.json",
    "kafka.strimzi.io_v1beta2_kafkanodepool.json",
]

OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
MAX_MESSAGE = 400


# --- rendering ---------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not on PATH: it renders the kustomizations (kubectl kustomize, with its "
            "built-in kustomize). Install kubectl >= 1.27 to run these tests.",
            pytrace=False,
        )
    return path


def render(overlay_dir: Path | str) -> list[dict]:
    """The objects ``kubectl kustomize overlay_dir`` renders (empty YAML documents skipped)."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(overlay_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"kubectl kustomize {overlay_dir} failed (exit {proc.returncode}):\n{proc.stderr}"
        )
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc is not None]


# --- validation --------------------------------------------------------------------------


def _strict(node: Any) -> Any:
    """A copy of a structural schema in which undeclared fields are errors.

    Only the declaring parts are walked (properties, items, additionalProperties): the
    branches of anyOf/oneOf/allOf/not restrict values and must not forbid fields.
    """
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    is_object = "properties" in out or out.get("type") == "object"
    if (
        is_object
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _drop_nulls(value: Any) -> Any:
    """The API server prunes ``null`` fields of custom resources before validating them."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


@functools.cache
def _core_registry() -> Registry:
    ref = importlib.resources.files("kubernetes_validate").joinpath(
        "kubernetes-json-schema", f"v{K8S_VERSION}-local-strict", "_definitions.json"
    )
    definitions = json.loads(ref.read_text(encoding="utf-8"))
    return Resource.from_contents(definitions) @ Registry()


@functools.cache
def _vendored() -> dict[tuple[str, str], Path]:
    """(apiVersion, kind) -> vendored schema file, from each file's group-version-kind."""
    index = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            index[(f"{gvk['group']}/{gvk['version']}", gvk["kind"])] = path
    return index


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    """A validator for a custom resource kind, or None when no schema for it is vendored."""
    path = _vendored().get((api_version, kind))
    if path is None:
        return None
    schema = _strict(json.loads(path.read_text(encoding="utf-8")))
    schema["properties"]["metadata"] = {"$ref": OBJECT_META}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return jsonschema.Draft202012Validator(schema, registry=_core_registry())


def _where(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _message(error: jsonschema.ValidationError) -> str:
    text = error.message
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def problems(obj: Any) -> list[str]:
    """What is wrong with one rendered object, as ``Kind/name: path: message`` lines."""
    if not isinstance(obj, dict):
        return [f"?: (root): not a mapping: {str(obj)[:80]!r}"]
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    metadata = obj.get("metadata")
    name = metadata.get("name", "?") if isinstance(metadata, dict) else "?"
    label = f"{kind}/{name}"
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [f"{label}: (root): apiVersion and kind must be strings"]

    validator = crd_validator(api_version, kind)
    if validator is not None:
        errors = sorted(
            validator.iter_errors(_drop_nulls(obj)),
            key=lambda e: [str(p) for p in e.absolute_path],
        )
        return [f"{label}: {_where(e.absolute_path)}: {_message(e)}" for e in errors]

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"{label}: (root): no schema for {api_version}/{kind} (not a Kubernetes "
            f"{K8S_VERSION} kind, and no CRD schema vendored in k8s/schemas)"
        ]
    except kubernetes_validate.ValidationError as e:
        return [f"{label}: {_where(e.absolute_path)}: {_message(e)}"]
    except Exception as e:  # a broken schema or an object it cannot read
        return [f"{label}: (root): could not validate: {type(e).__name__}: {e}"]
    return []


def all_problems(objects: list[dict]) -> list[str]:
    return [p for obj in objects for p in problems(obj)]


# --- the manifests of k8s/ ---------------------------------------------------------------

KUSTOMIZATIONS = [
    K8S / "base",
    *sorted(p for p in (K8S / "overlays").glob("*") if p.is_dir()),
]


def test_the_documented_overlays_exist() -> None:
    missing = [name for name in ("dev", "prod") if not (K8S / "overlays" / name).is_dir()]
    assert not missing, f"k8s/overlays lacks {missing} (k8s/base/kustomization.yaml names them)"


@pytest.mark.parametrize(
    "kustomization", KUSTOMIZATIONS, ids=[str(p.relative_to(K8S)) for p in KUSTOMIZATIONS]
)
def test_manifests_render_and_validate(kustomization: Path) -> None:
    objects = render(kustomization)
    assert objects, f"{kustomization} renders no objects"
    found = all_problems(objects)
    assert not found, (
        f"{len(found)} problem(s) in kubectl kustomize {kustomization.relative_to(REPO)} "
        f"(Kubernetes {K8S_VERSION} strict, CRDs of k8s/schemas):\n" + "\n".join(found)
    )


@pytest.mark.parametrize("name", VENDORED)
def test_vendored_schema(name: str) -> None:
    path = SCHEMAS / name
    assert path.is_file(), f"{path} is missing: see k8s/schemas/SOURCES.md"
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert schema.get("type") == "object"
    assert schema["properties"]["spec"].get("type") == "object"
    group, version, kind = path.stem.split("_")
    (gvk,) = schema["x-kubernetes-group-version-kind"]
    assert (gvk["group"], gvk["version"], gvk["kind"].lower()) == (group, version, kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert name in (SCHEMAS / "SOURCES.md").read_text(encoding="utf-8")


def test_int_or_string_nodes_accept_both() -> None:
    """The vendoring replaced every int-or-string node's type by integer-or-string."""
    seen = 0

    def walk(node: Any) -> None:
        nonlocal seen
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string") is True:
                seen += 1
                assert "type" not in node
                assert {"type": "integer"} in node["anyOf"]
                assert {"type": "string"} in node["anyOf"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for name in VENDORED:
        walk(json.loads((SCHEMAS / name).read_text(encoding="utf-8")))
    assert seen > 100  # resource quantities, ports, probes... of the pod templates


# --- the validator itself: sample objects ---------------------------------------------------


def rayservice() -> dict:
    return yaml.safe_load(
        textwrap.dedent(
            """
            apiVersion: ray.io/v1
            kind: RayService
            metadata: {name: sample, namespace: edge-ad, labels: {app: sample}}
            spec:
              serveConfigV2: |
                applications:
                  - name: app
                    import_path: pipelines.serve:app_builder
              rayClusterConfig:
                rayVersion: "2.60.0"
                headGroupSpec:
                  rayStartParams: {num-cpus: "1"}
                  template:
                    spec:
                      containers:
                        - name: ray-head
                          image: ghcr.io/edge-ad/edge-ad:0.1.0
                          ports: [{name: serve, containerPort: 8000}]
                          resources:
                            requests: {cpu: 500m, memory: 1Gi}
                            limits: {cpu: 1, memory: 1Gi}
                workerGroupSpecs:
                  - groupName: scorers
                    replicas: 1
                    minReplicas: 1
                    maxReplicas: 2
                    rayStartParams: {}
                    template:
                      spec:
                        containers:
                          - name: ray-worker
                            image: ghcr.io/edge-ad/edge-ad:0.1.0
            """
        )
    )


def kafkatopic() -> dict:
    return {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "KafkaTopic",
        "metadata": {"name": "edge-ad.frames", "labels": {"strimzi.io/cluster": "edge-ad"}},
        "spec": {"partitions": 12, "replicas": 3, "config": {"retention.ms": 21600000}},
    }


def deployment() -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "mlflow"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "mlflow"}},
            "template": {
                "metadata": {"labels": {"app": "mlflow"}},
                "spec": {"containers": [{"name": "mlflow", "image": "mlflow:3"}]},
            },
        },
    }


def service() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "mlflow"},
        "spec": {"selector": {"app": "mlflow"}, "ports": [{"port": 80, "targetPort": 5000}]},
    }


@pytest.mark.parametrize("make", [rayservice, kafkatopic, deployment, service])
def test_valid_samples_have_no_problems(make) -> None:
    assert problems(make()) == []


def test_rayservice_serve_config_must_be_a_string() -> None:
    obj = rayservice()
    obj["spec"]["serveConfigV2"] = yaml.safe_load(obj["spec"]["serveConfigV2"])
    found = problems(obj)
    assert any("RayService/sample: spec.serveConfigV2: " in p for p in found), found
    assert any("is not of type 'string'" in p for p in found), found


def test_rayservice_unknown_and_mistyped_fields() -> None:
    obj = rayservice()
    obj["spec"]["serveConfig"] = obj["spec"].pop("serveConfigV2")  # the removed v1alpha1 name
    worker = obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    worker["replicas"] = "one"
    found = problems(obj)
    assert any("(root)" not in p and "'serveConfig' was unexpected" in p for p in found), found
    assert any("workerGroupSpecs[0].replicas: 'one' is not of type 'integer'" in p for p in found)


def test_rayservice_int_or_string_and_metadata() -> None:
    obj = rayservice()
    head = obj["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["resources"]["limits"]["cpu"] = "1"  # quantity as a string: fine
    head["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/", "port": "serve"}}
    assert problems(obj) == []
    head["containers"][0]["resources"]["limits"]["cpu"] = [1]
    obj["metadata"]["label"] = {"app": "sample"}  # a typo of labels
    found = problems(obj)
    assert any("resources.limits.cpu" in p for p in found), found
    assert any("metadata: " in p and "'label' was unexpected" in p for p in found), found


def test_kafkatopic_partitions_must_be_an_integer() -> None:
    obj = kafkatopic()
    obj["spec"]["partitions"] = "many"
    assert problems(obj) == [
        "KafkaTopic/edge-ad.frames: spec.partitions: 'many' is not of type 'integer'"
    ]


def test_deployment_replicas_must_be_an_integer() -> None:
    obj = deployment()
    obj["spec"]["replicas"] = "two"
    found = problems(obj)
    assert len(found) == 1 and found[0].startswith("Deployment/mlflow: spec.replicas: "), found
    assert "'two' is not of type" in found[0]


def test_service_unknown_field_is_an_error() -> None:
    obj = service()
    obj["spec"]["ports"][0]["tragetPort"] = 5000
    found = problems(obj)
    assert len(found) == 1 and found[0].startswith("Service/mlflow: spec.ports[0]: "), found
    assert "'tragetPort' was unexpected" in found[0]


def test_unknown_kind_is_a_problem() -> None:
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    (found,) = problems(obj)
    assert found.startswith("Widget/w: (root): no schema for example.com/v1/Widget"), found
    # A served CRD version that is not vendored is unknown too, not silently accepted.
    obj = {**kafkatopic(), "apiVersion": "kafka.strimzi.io/v1"}
    assert "no schema for kafka.strimzi.io/v1/KafkaTopic" in problems(obj)[0]


def test_render_a_kustomization(tmp_path: Path) -> None:
    (tmp_path / "topic.yaml").write_text(yaml.safe_dump(kafkatopic()))
    (tmp_path / "rayservice.yaml").write_text(yaml.safe_dump(rayservice()))
    (tmp_path / "kustomization.yaml").write_text(
        textwrap.dedent(
            """
            apiVersion: kustomize.config.k8s.io/v1beta1
            kind: Kustomization
            namespace: smoke
            resources: [topic.yaml, rayservice.yaml]
            configMapGenerator:
              - name: settings
                literals: [A=1]
            """
        )
    )
    objects = render(tmp_path)
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "KafkaTopic", "RayService"]
    assert {o["metadata"]["namespace"] for o in objects} == {"smoke"}
    assert all_problems(objects) == []

    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(AssertionError, match=r"kubectl kustomize .* failed"):
        render(tmp_path)


def test_missing_kubectl_fails_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="kubectl is not on PATH"):
        render(tmp_path)


@pytest.mark.parametrize(
    "kustomization", KUSTOMIZATIONS, ids=[str(p.relative_to(K8S)) for p in KUSTOMIZATIONS]
)
def test_ray_pods_are_reachable_only_from_ray_pods_submitter_and_operator(
    kustomization: Path,
) -> None:
    """Before: RayService/RayJob set dashboard-host 0.0.0.0 and no NetworkPolicy selected the
    Ray pods, so any pod in the cluster could submit a job (run code) on them."""
    objects = render(kustomization)
    ray_node = {"ray.io/is-ray-node": "yes"}
    policies = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and o["spec"]["podSelector"].get("matchLabels") == ray_node
    ]
    assert len(policies) == 1, "one NetworkPolicy must select the Ray pods"
    spec = policies[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    for rule in spec["ingress"]:
        assert rule.get("from"), "an ingress rule without 'from' admits every pod"
        for peer in rule["from"]:
            assert peer.get("podSelector", {}).get("matchLabels"), peer
    submitters = [
        o["spec"]["submitterPodTemplate"]["metadata"]["labels"]
        for o in objects
        if o["kind"] == "RayJob"
    ]
    assert submitters and all(s.get("edge-ad/ray-submitter") == "true" for s in submitters)
