"""Streaming overhead: frames/s through Kafka + Ray Serve vs the bare detector, and T̂-mixed
batching vs one frame per call, all on the same frames in one run.

    python benchmarks/stream.py                   # trains a tiny model on generated data
    python benchmarks/stream.py --model DIR       # a trained bundle (e.g. the cpu profile)

* bare: ``score_frames`` (decode, detector, boxes, heatmap) in batches of ``--batch`` in this
  process, with the scorer's thread count: what the scorer does without Kafka and Serve.
* serve: the graph of pipelines/serve.py on a local Ray and the embedded broker; ``--frames``
  frames published flat out, timed from the first send to the last verdict read back.
  Run twice: ``max_batch_size=--batch`` (batched) and ``1`` (unbatched).
* latency: a third, paced run at half the batched rate: p50/p99 from capture to verdict read.

The last line printed is one JSON object: {"bare_fps", "serve_fps", "overhead_ratio"
(serve/bare), "unbatched_fps", "batched_fps", "batching_gain", "p50_ms", "p99_ms", ...}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detector import tiny_bundle

from edge_ad import registry
from edge_ad.bundle import load_bundle, read_meta
from edge_ad.config import settings_from_dict
from edge_ad.stream.camera import publish_frames, synthetic_images
from edge_ad.stream.kafka_io import make_producer, read_topic
from edge_ad.stream.schema import VERDICTS_TOPIC, Verdict
from edge_ad.stream.scoring import encode_image, score_frames

PRODUCT = "bench-pcb"


def bare_fps(bundle: Path, images: list[np.ndarray], batch: int, threads: int) -> float:
    torch.set_num_threads(threads)
    detector = load_bundle(bundle, device="cpu").detector
    data = [encode_image(img) for img in images]
    score_frames(detector, data[:batch])  # burn-in
    start = time.perf_counter()
    for i in range(0, len(data), batch):
        score_frames(detector, data[i : i + batch])
    return len(data) / (time.perf_counter() - start)


def stream_run(
    bootstrap: str, size: int, frames: int, fps: float | None, seed: int
) -> tuple[float, list[float]]:
    """(frames/s from first send to last verdict, latencies in ms) for one replay."""
    producer = make_producer(bootstrap)
    images = synthetic_images(PRODUCT, size, 0.25, seed=seed)
    t0 = time.time()
    shots = publish_frames(producer, images, PRODUCT, frames, fps)
    producer.close()
    wanted = {s.frame_id for s in shots}
    got: dict[str, Verdict] = {}
    last = t0
    deadline = time.monotonic() + 600

    def done() -> bool:
        return len(got) == len(wanted) or time.monotonic() > deadline

    for record in read_topic(VERDICTS_TOPIC, bootstrap, follow=True, stop=done):
        verdict = Verdict.from_json(record.value)
        if verdict.frame_id in wanted and verdict.frame_id not in got:
            got[verdict.frame_id] = verdict
            last = time.time()
    if len(got) < len(wanted):
        raise SystemExit(f"only {len(got)} of {len(wanted)} verdicts arrived")
    return len(wanted) / (last - t0), [v.latency_ms for v in got.values()]


def main() -> None:
    import ray

    from edge_ad.stream.broker import EmbeddedBroker
    from pipelines.serve import ServeOptions, start_serving, stop_serving

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="bundle directory (default: train tiny)")
    parser.add_argument("--method", default="d3ad", help="method of the tiny model trained")
    parser.add_argument("--frames", type=int, default=160)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--scorer-cpus", type=float, default=1.0)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["EDGE_AD_HOME"] = str(root / "home")
        bundle = args.model or tiny_bundle(root, args.method)
        meta = read_meta(bundle)
        size = int(meta["settings"]["data"]["image_size"])
        uri = f"sqlite:///{root / 'mlruns.db'}"
        settings = settings_from_dict(meta["settings"])
        tracker = registry.start_run(PRODUCT, settings.to_dict(), uri=uri)
        registry.log_trained_model(tracker, bundle, PRODUCT, meta.get("metrics") or {})
        tracker.finish()
        registry.promote(PRODUCT, 1, uri=uri)

        images = [
            img for img, _, _ in itertools.islice(synthetic_images(PRODUCT, size), args.frames)
        ]
        bare = bare_fps(bundle, images, args.batch, args.torch_threads)
        print(f"bare detector: {bare:.2f} frames/s (batch {args.batch})", flush=True)

        results: dict[str, float] = {}
        latencies: list[float] = []
        ray.init(include_dashboard=False, log_to_driver=False)
        with EmbeddedBroker(port=0, log_file=root / "broker.log") as broker:
            for label, batch in (("batched", args.batch), ("unbatched", 1)):
                options = ServeOptions(
                    bootstrap=broker.bootstrap,
                    tracking_uri=uri,
                    scorer_cpus=args.scorer_cpus,
                    torch_threads=args.torch_threads,
                    max_batch_size=batch,
                    max_in_flight=max(32, 4 * batch),
                    edge_home=os.environ["EDGE_AD_HOME"],
                )
                start_serving(options)
                try:
                    stream_run(broker.bootstrap, size, 2 * args.batch, None, seed=1)  # warm-up
                    fps, _ = stream_run(broker.bootstrap, size, args.frames, None, seed=2)
                    results[label] = fps
                    print(f"serve {label}: {fps:.2f} frames/s", flush=True)
                    if label == "batched":
                        paced = max(0.5, fps / 2)
                        _, latencies = stream_run(
                            broker.bootstrap, size, max(40, args.frames // 2), paced, seed=3
                        )
                        print(
                            f"latency at {paced:.1f} frames/s: p50 "
                            f"{np.quantile(latencies, 0.5):.0f} ms",
                            flush=True,
                        )
                finally:
                    stop_serving()
        ray.shutdown()

    out = {
        "bare_fps": round(bare, 3),
        "serve_fps": round(results["batched"], 3),
        "overhead_ratio": round(results["batched"] / bare, 3),
        "unbatched_fps": round(results["unbatched"], 3),
        "batched_fps": round(results["batched"], 3),
        "batching_gain": round(results["batched"] / results["unbatched"], 3),
        "p50_ms": round(float(np.quantile(latencies, 0.5)), 1),
        "p99_ms": round(float(np.quantile(latencies, 0.99)), 1),
        "latency_fps": round(max(0.5, results["batched"] / 2), 2),
        "frames": args.frames,
        "batch": args.batch,
        "torch_threads": args.torch_threads,
        "image_size": size,
        "profile": settings.profile,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
