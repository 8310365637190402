"""The streaming commands as a user runs them, in separate processes: `edge-ad serve` in the
foreground, `edge-ad replay` as the camera, `edge-ad verdicts` as the consumer; and the
one-command `edge-ad demo`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edge_ad import registry
from edge_ad.stream.broker import EmbeddedBroker

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PRODUCT = "synth-pcb"
RunCli = Callable[..., subprocess.CompletedProcess[str]]


def _wait_for(proc: subprocess.Popen, text: str, timeout_s: float) -> str:
    """Read ``proc``'s stdout until a line holds ``text``; return everything read."""
    seen = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            seen.append(line)
            if text in line:
                return "".join(seen)
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.2)
    err = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"{text!r} never appeared; stdout: {''.join(seen)} stderr: {err}")


@contextmanager
def serving(edge_home: Path, products: str, bootstrap: str) -> Iterator[dict[str, str]]:
    """`edge-ad serve` in the foreground of a real process until the block ends; then Ctrl-C,
    which must stop it cleanly. The dict receives the process's stdout and stderr."""
    env = {**os.environ, "EDGE_AD_HOME": str(edge_home), "COLUMNS": "200"}
    serve = subprocess.Popen(
        [sys.executable, "-c", "from cli import app; app()", "serve", "--products", products,
         "--bootstrap-servers", bootstrap, "--scorer-cpus", "0.5"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    output: dict[str, str] = {}
    try:
        _wait_for(serve, "serving", timeout_s=180)
        yield output
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            output["out"], output["err"] = serve.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            serve.kill()
            raise
    assert serve.returncode == 0, output["err"]
    assert "serve stopped" in output["out"] and "Traceback" not in output["err"]


def test_serve_replay_verdicts_from_the_command_line(
    fast_model: tuple[Any, Any], edge_home: Path, run_cli: RunCli, tmp_path: Path
) -> None:
    settings, result = fast_model
    tracker = registry.start_run(PRODUCT, settings.to_dict())  # the default store of the home
    version = registry.log_trained_model(tracker, result.bundle_path, PRODUCT, {"pro": 0.5})
    tracker.finish()
    registry.promote(PRODUCT, version)

    with EmbeddedBroker(port=0) as broker, serving(edge_home, PRODUCT, broker.bootstrap):
        truth = tmp_path / "truth.jsonl"
        sent = run_cli(
            "replay", "-p", PRODUCT, "--count", "8", "--fps", "0", "--defect-rate", "0.5",
            "--cameras", "2", "--truth", str(truth), "--bootstrap-servers", broker.bootstrap,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert f"sent 8 frames of {PRODUCT}" in sent.stdout
        rows = [json.loads(line) for line in truth.read_text().splitlines()]
        assert len(rows) == 8 and {r["frame_id"][:5] for r in rows} == {"cam-1", "cam-2"}

        deadline = time.monotonic() + 120
        while True:
            shown = run_cli("verdicts", "--bootstrap-servers", broker.bootstrap)
            assert shown.returncode == 0, shown.stderr
            if "8 frames" in shown.stdout or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert "8 frames" in shown.stdout, shown.stdout
        for row in rows:
            assert row["frame_id"] in shown.stdout
        dlq = run_cli("verdicts", "--dlq", "--bootstrap-servers", broker.bootstrap)
        assert dlq.returncode == 0 and "0 frame(s) in edge-ad.frames.dlq" in dlq.stdout


def test_demo_runs_end_to_end(run_cli: RunCli, tmp_path: Path) -> None:
    work = tmp_path / "demo"
    result = run_cli("demo", "--workdir", str(work), "--frames", "40", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo finished" in result.stdout
    summary = json.loads((work / "summary.json").read_text())
    assert summary["frames_sent"] == 40 and summary["verdicts"] == 40
    assert summary["missing_verdicts"] == 0
    assert summary["dlq"] == 3  # the three malformed frames the demo sends on purpose
    assert summary["stream_image_auroc"] is not None and summary["p99_ms"] > 0
    report = (work / "report.html").read_text()
    assert report.count("<figure>") >= 2
    assert list((work / "heatmaps").glob("*.png"))
