"""The command line: help texts, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from edge_ad.errors import EdgeADError

runner = CliRunner()
RunCli = Callable[..., subprocess.CompletedProcess[str]]
TOP_LEVEL = ("train", "eval", "infer", "promote", "serve", "replay", "broker", "demo", "data")


def test_help_lists_the_command_tree() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for command in TOP_LEVEL:
        assert f" {command} " in result.output, command


@pytest.mark.parametrize("command", [*TOP_LEVEL[:-1], "data synth", "data info", "data download"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_unknown_product_is_one_clear_line(tmp_path: Path, run_cli: RunCli) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("train", "--product", "nope", "--data-root", str(empty))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "nope" in lines[0] and "not found" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_data_root_and_bad_layout(tmp_path: Path, run_cli: RunCli) -> None:
    result = run_cli("train", "-p", "x", "--data-root", str(tmp_path / "nowhere"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "nowhere" in result.stderr
    result = run_cli("data", "info", "-p", "x", "--layout", "coco")
    assert result.returncode != 0 and "unknown layout" in result.stderr


def test_bad_setting_is_a_clear_error(synth_root: Path, run_cli: RunCli) -> None:
    result = run_cli(
        "train",
        "-p",
        "synth-pcb",
        "--data-root",
        str(synth_root),
        "--set",
        "unet.epoch=3",
    )
    assert result.returncode != 0
    assert "unet.epoch" in result.stderr and "Traceback" not in result.stderr


def test_compare_and_train_reject_unknown_methods_in_one_line(
    run_cli: RunCli, synth_root: Path
) -> None:
    root = ["--data-root", str(synth_root)]
    result = run_cli("compare", "-p", "synth-pcb", *root, "--methods", "d3ad,patchcore")
    assert result.returncode == 1
    assert "unknown method(s) patchcore" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("compare", "-p", "synth-pcb", *root, "--methods", "ran,ran")
    assert result.returncode == 1 and "listed twice" in result.stderr
    result = run_cli("train", "-p", "synth-pcb", *root, "--method", "draem")
    assert result.returncode == 1
    assert "unknown method 'draem'" in result.stderr and "Traceback" not in result.stderr
    # A setting that is wrong for one method fails before any training starts.
    result = run_cli(
        "compare",
        "-p",
        "synth-pcb",
        *root,
        "--methods",
        "d3ad,diffusionad",
        "--set",
        "diffusionad.t_small=500",
    )
    assert result.returncode == 1 and "t_small (500) must be below t_big" in result.stderr
    # An entry's own setting is checked the same way, and only for that entry.
    result = run_cli(
        "compare", "-p", "synth-pcb", *root, "--methods", "knn,ran@latent.space=features"
    )
    assert result.returncode == 1 and "latent.space=features is D3AD's" in result.stderr
    assert "Traceback" not in result.stderr


def test_compare_entries_carry_their_own_settings() -> None:
    from pipelines.compare import entry_folder, parse_methods, split_entry

    entries = parse_methods("d3ad@latent.space=vae, d3ad@latent.space=features@unet.epochs=3,knn")
    assert entries == ["d3ad@latent.space=vae", "d3ad@latent.space=features@unet.epochs=3", "knn"]
    assert split_entry(entries[1]) == ("d3ad", ["latent.space=features", "unet.epochs=3"])
    assert split_entry("knn") == ("knn", [])
    assert entry_folder(entries[1]) == "d3ad_latent.space_features_unet.epochs_3"
    with pytest.raises(EdgeADError, match="unknown method"):
        parse_methods("patchcore@memory.layers=[1]")


def test_streaming_commands_without_a_broker_say_so_at_once(run_cli: RunCli) -> None:
    from edge_ad.stream.broker import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    for args in (
        ["serve", "--bootstrap-servers", address],
        ["replay", "-p", "x", "--image-size", "64", "--bootstrap-servers", address],
        ["verdicts", "--bootstrap-servers", address],
        ["verdicts", "--dlq", "--bootstrap-servers", address],
    ):
        result = run_cli(*args, timeout=60)
        assert result.returncode == 1, args
        assert f"no Kafka broker answers at {address}" in result.stderr, result.stderr
        assert "edge-ad broker" in result.stderr and "Traceback" not in result.stderr


def test_streaming_commands_reject_bad_options(run_cli: RunCli, tmp_path: Path) -> None:
    cases = {
        ("serve", "--scorer-replicas", "3:1"): "1 <= MIN <= MAX",
        ("serve", "--scorer-replicas", "many"): "use N or MIN:MAX",
        ("replay", "-p", "x", "--source", str(tmp_path / "nope")): "neither a folder",
        ("verdicts", "--bootstrap-servers", "no-port"): "is not HOST:PORT",
    }
    for args, message in cases.items():
        result = run_cli(*args, timeout=60)
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_registry_commands_on_an_empty_store(run_cli: RunCli) -> None:
    result = run_cli("promote", "-p", "nothing-here")
    assert result.returncode == 1
    assert "nothing-here" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("models")
    assert result.returncode == 0 and "no registered models" in result.stdout


def test_train_needs_a_product_and_rejects_duplicates(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli("train")
    assert result.returncode != 0 and "--product" in result.stderr
    result = run_cli("train", "-p", "a", "-p", "a", "--data-root", str(tmp_path))
    assert result.returncode != 0 and "listed twice: a" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_and_images(tmp_path: Path, run_cli: RunCli) -> None:
    result = run_cli(
        "infer",
        "--model",
        str(tmp_path),
        str(tmp_path / "a.png"),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode != 0 and "image not found" in result.stderr
    img = tmp_path / "a.png"
    img.write_bytes(b"not really a png")
    result = run_cli(
        "infer",
        "--model",
        str(tmp_path / "m"),
        str(img),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode != 0 and "does not exist" in result.stderr
    # Before: --out the images' own folder overwrote them; --out a file gave a traceback.
    result = run_cli("infer", "--model", str(tmp_path / "m"), str(img), "--out", str(tmp_path))
    assert result.returncode == 1 and "no input is overwritten" in result.stderr
    assert img.read_bytes() == b"not really a png"
    result = run_cli("infer", "--model", str(tmp_path / "m"), str(img), "--out", str(img))
    assert result.returncode == 1 and "is a file" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_synth_then_info_reads_it_back(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = runner.invoke(
        app,
        [
            "data",
            "synth",
            "-p",
            "widget",
            "--out",
            str(out),
            "--image-size",
            "64",
            "--train",
            "4",
            "--test-good",
            "2",
            "--per-defect",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "info", "-p", "widget", "--data-root", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["layout"] == "mvtec"
    assert summary["n_train"] == 4 and summary["n_test_normal"] == 2
    assert summary["n_test_anomalous"] == 5 and summary["n_test_masks"] == 5
    # A second run refuses to overwrite, with one line.
    result = runner.invoke(app, ["data", "synth", "-p", "widget", "--out", str(out)])
    assert result.exit_code != 0 and "overwrite" in result.output


def test_download_offline_is_a_clear_error(tmp_path: Path, run_cli: RunCli) -> None:
    result = run_cli(
        "data",
        "download",
        "visa",
        "--to",
        str(tmp_path / "visa"),
        "--url",
        "http://127.0.0.1:9/VisA_20220922.tar",
    )
    assert result.returncode != 0
    assert "could not download" in result.stderr and "Traceback" not in result.stderr


def test_untrusted_text_is_printed_as_text_not_markup(run_cli: RunCli, tmp_path: Path) -> None:
    """Before: a frame_id ``[/]`` crashed ``edge-ad verdicts`` on every re-read, ``[link=…]``
    rendered a link, and an error naming a path with ``[/]`` ended in a traceback."""
    from rich.console import Console

    from cli import _verdict_row
    from edge_ad.stream.schema import Verdict

    shown = Console(record=True, width=200, color_system="truecolor")
    for frame_id in ("[/]", "[link=https://evil.example]click[/link]"):
        shown.print(_verdict_row(Verdict(frame_id, "p", "c", "l", "1", 1.0, 2.0, False, 20)))
    text = shown.export_text()
    assert "[/]" in text and "[link=https://evil.example]click[/link]" in text
    assert 'href="https://evil.example' not in shown.export_html()
    result = run_cli(
        "infer", "--model", str(tmp_path), str(tmp_path / "[/]frame.png"), "--out", str(tmp_path)
    )
    assert result.returncode == 1, result.stderr
    assert "[/]frame.png" in result.stderr and "Traceback" not in result.stderr
