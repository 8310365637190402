"""``edge-ad demo``: from nothing to a live inspection line on one machine.

The same pieces as a cluster, only local: a generated product, a Ray Train job that logs to
MLflow and registers the model, promotion to ``production``, the embedded Kafka-protocol
broker, the Ray Serve graph, and a camera replaying frames (a few of them malformed on
purpose, to show the dead-letter queue). Verdicts are read back from Kafka like any consumer
would, compared with the truth, and summarised in the terminal and in an HTML report.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from edge_ad.errors import EdgeADError


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    profile: str = "tiny"
    product: str = "synth-pcb"
    seed: int = 0
    frames: int = 200
    fps: float = 5.0
    defect_rate: float = 0.25
    timeout_s: float = 300.0


def _bad_frames(product: str, size: int) -> list[tuple[bytes, list[tuple[str, bytes]], str]]:
    """Three frames the DLQ must catch: (value, headers, what is wrong)."""
    from edge_ad.stream.scoring import encode_image

    ok = encode_image(np.zeros((size, size, 3), dtype=np.uint8))

    def headers(frame_id: str, **changes: str | None) -> list[tuple[str, bytes]]:
        fields = {"product": product, "frame_id": frame_id, "line": "line-1", "camera": "cam-1"}
        fields |= {"ts": str(time.time())} | changes
        return [(k, v.encode()) for k, v in fields.items() if v is not None]

    return [
        (b"\xff\xd8 truncated jpeg", headers("demo-bad-bytes"), "undecodable bytes"),
        (ok, headers("demo-no-camera", camera=None), "missing header"),
        (ok, headers("demo-unknown", product="unknown-product"), "unknown product"),
    ]


def _live_table(tally: Any, recent: list[Any], total: int) -> Table:
    table = Table(
        title=f"verdicts {tally.frames}/{total} · flagged {tally.flagged} · dups {tally.duplicates}"
    )
    for column in ("frame", "call", "score", "thr", "T̂", "boxes", "ms", "version"):
        table.add_column(column, justify="left" if column in ("frame", "call") else "right")
    for v in recent[-10:]:
        table.add_row(
            v.frame_id,
            "[bold red]DEFECT[/]" if v.is_anomalous else "[green]ok[/]",
            f"{v.score:.2f}",
            f"{v.threshold:.2f}",
            str(v.timestep),
            str(len(v.boxes)),
            f"{v.latency_ms:.0f}",
            v.model_version,
        )
    return table


def run_demo(opts: DemoOptions, console: Console) -> dict[str, Any]:
    """Run every step; return the summary (also written to ``workdir/summary.json``)."""
    import ray

    from edge_ad import registry
    from edge_ad.config import load_settings
    from edge_ad.data.synthetic import SynthSpec, generate_dataset
    from edge_ad.progress import RichFitObserver, make_progress, progress_callback
    from edge_ad.stream.broker import EmbeddedBroker
    from edge_ad.stream.report import write_stream_report
    from pipelines.serve import ServeOptions, start_serving, stop_serving
    from pipelines.train import TrainOptions, TrainRequest, train_products

    started = time.monotonic()
    work = opts.workdir.expanduser().resolve()
    settings = load_settings(opts.profile)
    size = settings.data.image_size
    # The demo's own MLflow store: a rerun starts from version 1 instead of meeting the
    # promotion gate of an earlier demo's model.
    for stale in ("mlruns.db", "mlartifacts", "ray_results", "heatmaps"):
        target = work / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlruns.db'}"
    data_root = work / "data"

    console.rule(f"[bold]1/6 generate[/] a synthetic product '{opts.product}' ({size}px)")
    spec = SynthSpec(
        image_size=size, n_train=80, n_test_good=20, n_test_per_defect=6, seed=opts.seed
    )
    with progress_callback("synthesising") as callback:
        generate_dataset(opts.product, data_root, spec, progress=callback, overwrite=True)

    console.rule(f"[bold]2/6 train[/] D3AD on Ray Train (profile {opts.profile}), log to MLflow")
    with make_progress() as progress:
        (job,) = train_products(
            [
                TrainRequest(
                    opts.product, str(data_root), "mvtec", str(work / "models" / opts.product)
                )
            ],
            settings,
            TrainOptions(
                storage_path=work / "ray_results",
                tracking_uri=uri,
                observer_factory=lambda _: RichFitObserver(progress),
            ),
        )
    if job.model_version is None:
        raise EdgeADError("training finished but registered no model version")
    rep = job.report or {}
    console.print(
        f"trained in {job.wall_seconds / 60:.1f} min: test I-AUROC {rep.get('image_auroc', 0):.3f}"
        f", PRO {rep.get('pro', 0):.3f}; registered edge-ad-{opts.product} v{job.model_version}"
    )

    console.rule("[bold]3/6 promote[/] to production in the MLflow registry")
    promotion = registry.promote(opts.product, job.model_version, uri=uri, reason="edge-ad demo")
    console.print(f"edge-ad-{opts.product} v{promotion.version} holds 'production'")

    console.rule("[bold]4/6 start[/] the embedded Kafka broker and the Ray Serve graph")
    broker = EmbeddedBroker(port=0, log_file=work / "broker.log").start()
    try:
        cpus = os.cpu_count() or 2
        options = ServeOptions(
            bootstrap=broker.bootstrap,
            tracking_uri=uri,
            products=(opts.product,),
            scorer_cpus=1.0,
            # One core stays free for Kafka, the ingress and this process: with every core
            # in torch's thread pool, OpenMP spins against them and throughput drops ~3x
            # (benchmarks/stream.py on 2 cores: 14.5 frames/s with 1 thread, ~4 with 2).
            torch_threads=max(1, min(4, cpus - 1)),
            edge_home=str(Path(os.environ.get("EDGE_AD_HOME", "~/.edge-ad")).expanduser()),
        )
        start_serving(options)
        console.print(
            f"broker {broker.bootstrap}; Serve app 'edge-ad': ingress → scorer → publisher"
        )
        summary = _stream(opts, console, broker.bootstrap, size)
    finally:
        try:
            stop_serving()
        except Exception as err:  # shutting down: report, keep going
            console.print(f"[yellow]warning:[/] stopping Serve: {err}")
        ray.shutdown()
        broker.stop()
    summary["demo_minutes"] = round((time.monotonic() - started) / 60, 2)
    summary["train_image_auroc"] = rep.get("image_auroc")
    tally, images, kinds = summary.pop("_tally"), summary.pop("_images"), summary.pop("_kinds")
    report = write_stream_report(work, summary, tally, images, kinds)

    console.rule("[bold]6/6 summary[/]")
    _print_summary(console, summary)
    console.print(f"[bold green]demo finished[/] in {summary['demo_minutes']:.1f} min: {report}")
    console.print(f"browse the runs: mlflow ui --backend-store-uri {uri}")
    return summary


def _stream(opts: DemoOptions, console: Console, bootstrap: str, size: int) -> dict[str, Any]:
    from edge_ad.stream.camera import publish_frames, synthetic_images
    from edge_ad.stream.kafka_io import make_producer, read_topic
    from edge_ad.stream.schema import DLQ_TOPIC, ERROR_HEADER, FRAMES_TOPIC, VERDICTS_TOPIC, Verdict
    from edge_ad.stream.tally import VerdictTally

    console.rule(
        f"[bold]5/6 replay[/] {opts.frames} frames at {opts.fps:g} fps "
        f"({100 * opts.defect_rate:.0f} % with defects) + 3 malformed ones"
    )
    images: list[np.ndarray] = []

    def recorded() -> Iterator[tuple[np.ndarray, int, str]]:
        for item in synthetic_images(opts.product, size, opts.defect_rate, opts.seed + 1):
            images.append(item[0])
            yield item

    tally = VerdictTally()
    kinds: dict[str, str] = {}
    by_id: dict[str, np.ndarray] = {}
    sent_ids: list[str] = []
    errors: list[BaseException] = []
    producer = make_producer(bootstrap)

    def on_sent(shot: Any) -> None:
        tally.truth[shot.frame_id] = shot.label
        kinds[shot.frame_id] = shot.defect_type
        by_id[shot.frame_id] = images[len(sent_ids)]
        sent_ids.append(shot.frame_id)
        if len(sent_ids) == opts.frames // 2:  # mid-stream: the DLQ examples
            for value, headers, _ in _bad_frames(opts.product, size):
                producer.send(FRAMES_TOPIC, value, key=b"cam-1", headers=headers)

    def camera() -> None:
        try:
            publish_frames(
                producer, recorded(), opts.product, opts.frames, opts.fps, on_sent=on_sent
            )
        except BaseException as err:
            errors.append(err)

    first_sent = time.time()
    sender = threading.Thread(target=camera, name="camera", daemon=True)
    sender.start()
    deadline = time.monotonic() + opts.timeout_s
    recent: list[Verdict] = []
    last_verdict = first_sent

    def finished() -> bool:
        if errors or time.monotonic() > deadline:
            return True
        return not sender.is_alive() and set(sent_ids) <= set(tally.verdicts)

    with Live(
        _live_table(tally, recent, opts.frames), console=console, refresh_per_second=4
    ) as live:
        for record in read_topic(VERDICTS_TOPIC, bootstrap, follow=True, stop=finished):
            verdict = Verdict.from_json(record.value)
            if verdict.frame_id not in tally.truth:
                continue
            if tally.add(verdict):
                recent.append(verdict)
                last_verdict = time.time()
            live.update(_live_table(tally, recent, opts.frames))
    sender.join(timeout=10)
    producer.close()
    if errors:
        raise EdgeADError(f"the camera stopped: {errors[0]}")
    missing = len(set(sent_ids) - set(tally.verdicts))
    dlq = [
        dict(record.headers).get(ERROR_HEADER, b"").decode()
        for record in read_topic(DLQ_TOPIC, bootstrap)
        if dict(record.headers).get("frame_id", b"").decode().startswith("demo-")
    ]
    stats = tally.summary()
    span = max(last_verdict - first_sent, 1e-9)
    return {
        "frames_sent": len(sent_ids),
        "verdicts": stats["frames"],
        "missing_verdicts": missing,
        "duplicate_verdicts": stats["duplicates"],
        "true_defects": sum(tally.truth[i] == 1 for i in sent_ids),
        "flagged_defective": stats["flagged_defective"],
        "confusion": stats["confusion"],
        "stream_image_auroc": stats["image_auroc"],
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "frames_per_s": round(stats["frames"] / span, 2),
        "offered_fps": opts.fps,
        "dlq": len(dlq),
        "dlq_reasons": dlq,
        "_tally": tally,
        "_images": by_id,
        "_kinds": kinds,
    }


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    table = Table(show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    c = summary.get("confusion") or {}
    auroc = summary.get("stream_image_auroc")
    rows = [
        ("frames sent / verdicts", f"{summary['frames_sent']} / {summary['verdicts']}"),
        (
            "missing / duplicate verdicts",
            f"{summary['missing_verdicts']} / {summary['duplicate_verdicts']}",
        ),
        ("true defects / flagged", f"{summary['true_defects']} / {summary['flagged_defective']}"),
        ("hits · misses · false alarms", f"{c.get('tp', 0)} · {c.get('fn', 0)} · {c.get('fp', 0)}"),
        ("image AUROC of the streamed verdicts", "n/a" if auroc is None else f"{auroc:.3f}"),
        (
            "latency p50 / p99 (capture → verdict)",
            f"{summary['p50_ms']:.0f} / {summary['p99_ms']:.0f} ms" if summary["p50_ms"] else "n/a",
        ),
        ("frames/s (offered)", f"{summary['frames_per_s']:.1f} ({summary['offered_fps']:g})"),
        ("dead-letter queue", f"{summary['dlq']} frame(s)"),
    ]
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    for reason in summary["dlq_reasons"]:
        console.print(f"  DLQ: {reason}", highlight=False)
