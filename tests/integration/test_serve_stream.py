"""The streaming graph for real: embedded tansu broker, local Ray Serve, MLflow sqlite registry.

One tiny model is trained per module and registered twice (versions 1 and 2, production on 1).
Every test publishes its own frames (unique frame ids) and reads the verdicts and DLQ topics
back, so the tests share the running graph without seeing each other's frames.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_ad import registry
from edge_ad.bundle import load_bundle
from edge_ad.stream.broker import EmbeddedBroker
from edge_ad.stream.camera import Shot, publish_frames, synthetic_images
from edge_ad.stream.kafka_io import make_producer, read_topic
from edge_ad.stream.schema import DLQ_TOPIC, ERROR_HEADER, FRAMES_TOPIC, VERDICTS_TOPIC, Verdict
from edge_ad.stream.scoring import encode_image

pytestmark = pytest.mark.slow

PRODUCT = "synth-pcb"
REPORT = {"image_auroc": 0.9, "pro": 0.7}
ALIAS_POLL_S = 0.5


@dataclass
class Line:
    uri: str
    bootstrap: str
    bundle_path: Path
    image_size: int
    seeds: Iterator[int]


@pytest.fixture(scope="module")
def line(fast_model: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    import ray

    from pipelines.serve import ServeOptions, start_serving, stop_serving

    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root}/mlruns.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_AD_HOME", str(root / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        settings, result = fast_model
        tracker = registry.start_run(PRODUCT, settings.to_dict(), uri=uri)
        for _ in range(2):
            registry.log_trained_model(tracker, result.bundle_path, PRODUCT, REPORT)
        tracker.finish()
        registry.promote(PRODUCT, version=1, uri=uri)

        broker = EmbeddedBroker(port=0, frames_partitions=2).start()
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        options = ServeOptions(
            bootstrap=broker.bootstrap,
            tracking_uri=uri,
            scorer_cpus=0.5,
            torch_threads=1,
            max_batch_size=4,
            alias_poll_s=ALIAS_POLL_S,
            retry_deadline_s=90,
            edge_home=str(root / "home"),
        )
        try:
            start_serving(options)
            yield Line(
                uri,
                broker.bootstrap,
                result.bundle_path,
                settings.data.image_size,
                itertools.count(100),
            )
        finally:
            try:
                stop_serving()
            finally:
                ray.shutdown()
                broker.stop()
                torch.set_num_threads(threads)


def _send(line: Line, count: int, fps: float | None = None) -> list[Shot]:
    producer = make_producer(line.bootstrap)
    try:
        images = synthetic_images(PRODUCT, line.image_size, 0.3, seed=next(line.seeds))
        return publish_frames(producer, images, PRODUCT, count, fps)
    finally:
        producer.close()


def _verdicts(line: Line, frame_ids: set[str], timeout_s: float = 180) -> list[Verdict]:
    """Every verdict (duplicates included) for ``frame_ids``, once all of them have one."""
    deadline = time.monotonic() + timeout_s
    seen: list[Verdict] = []

    def done() -> bool:
        return {v.frame_id for v in seen} >= frame_ids or time.monotonic() > deadline

    for record in read_topic(VERDICTS_TOPIC, line.bootstrap, follow=True, stop=done):
        verdict = Verdict.from_json(record.value)
        if verdict.frame_id in frame_ids:
            seen.append(verdict)
    # Late duplicates of the same frames would still be welcome; none are expected here.
    return seen


def test_every_frame_gets_exactly_one_verdict_scored_like_the_bare_detector(line: Line) -> None:
    shots = _send(line, 24)
    ids = {s.frame_id for s in shots}
    verdicts = _verdicts(line, ids)
    assert {v.frame_id for v in verdicts} == ids
    assert len(verdicts) == len(ids), Counter(v.frame_id for v in verdicts).most_common(3)
    from ray import serve

    # What an HTTP GET on the app's route (a RayService's serve Service) answers.
    stats = serve.get_app_handle("edge-ad").remote(None).result(timeout_s=30)
    assert stats["verdicts"] >= len(ids) and stats["in_flight"] == 0 and stats["dlq"] == 0

    detector = load_bundle(line.bundle_path, device="cpu").detector
    choices = set(detector.timestep_choices())
    by_id = {v.frame_id: v for v in verdicts}
    images = synthetic_images(PRODUCT, line.image_size, 0.3, seed=100)
    frames = np.stack([img for img, _, _ in itertools.islice(images, len(shots))])
    bare = detector.predict(torch.from_numpy(frames).permute(0, 3, 1, 2))
    for i, shot in enumerate(shots):
        v = by_id[shot.frame_id]
        assert v.product == PRODUCT and v.model_version == "1"
        assert v.timestep in choices
        assert v.threshold == pytest.approx(detector.threshold)
        # Same bytes, same model: the streamed score is the detector's (batching aside).
        assert v.score == pytest.approx(float(bare.scores[i]), rel=1e-3, abs=1e-3)
        assert v.is_anomalous == (v.score >= v.threshold)
        assert (v.heatmap is not None) == v.is_anomalous
        assert v.latency_ms > 0


def test_malformed_frames_go_to_the_dlq_with_a_reason_and_the_stream_goes_on(
    line: Line,
) -> None:
    good = np.full((line.image_size, line.image_size, 3), 90, dtype=np.uint8)
    small = np.full((line.image_size // 2, line.image_size // 2, 3), 90, dtype=np.uint8)
    base = {"product": PRODUCT, "line": "l1", "camera": "cam-x", "ts": str(time.time())}

    def headers(frame_id: str, **changes: str | None) -> list[tuple[str, bytes]]:
        fields = base | {"frame_id": frame_id} | changes
        return [(k, v.encode()) for k, v in fields.items() if v is not None]

    bad = {
        "bad-not-image": (b"not an image at all", headers("bad-not-image"), "not a decodable"),
        "bad-no-camera": (encode_image(good), headers("bad-no-camera", camera=None), "camera"),
        "bad-product": (
            encode_image(good),
            headers("bad-product", product="no-such-product"),
            "no model",
        ),
        "bad-small": (encode_image(small), headers("bad-small"), "smaller than"),
        "bad-ts": (encode_image(good), headers("bad-ts", ts="yesterday"), "not a number"),
    }
    producer = make_producer(line.bootstrap)
    for value, hdrs, _ in bad.values():
        producer.send(FRAMES_TOPIC, value, key=b"cam-x", headers=hdrs)
    producer.flush()
    producer.close()
    after = _send(line, 6)
    verdicts = _verdicts(line, {s.frame_id for s in after})
    assert {v.frame_id for v in verdicts} == {s.frame_id for s in after}

    errors: dict[str, str] = {}
    for record in read_topic(DLQ_TOPIC, line.bootstrap):
        hdrs = dict(record.headers)
        frame_id = hdrs.get("frame_id", b"").decode()
        if frame_id in bad:
            errors[frame_id] = hdrs[ERROR_HEADER].decode()
            assert record.value == bad[frame_id][0]  # the original bytes, untouched
    assert set(errors) == set(bad)
    for frame_id, (_, _, reason) in bad.items():
        assert reason in errors[frame_id], (frame_id, errors[frame_id])


def _replica_actor(deployment: str):
    import ray
    from ray.util import list_named_actors

    names = [
        a["name"]
        for a in list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]
    ]
    assert names, f"no {deployment} replica found"
    return ray.get_actor(names[0], namespace="serve")


@pytest.mark.parametrize("deployment", ["scorer", "ingress"])
def test_a_replica_killed_mid_stream_loses_no_frame(line: Line, deployment: str) -> None:
    import ray

    sent: list[Shot] = []
    sender = threading.Thread(target=lambda: sent.extend(_send(line, 40, fps=10)))
    sender.start()
    time.sleep(1.5)
    ray.kill(_replica_actor(deployment), no_restart=True)
    sender.join()
    ids = {s.frame_id for s in sent}
    verdicts = _verdicts(line, ids, timeout_s=240)
    counts = Counter(v.frame_id for v in verdicts)
    assert set(counts) == ids  # every frame has a verdict after recovery
    duplicates = sum(c - 1 for c in counts.values())
    print(f"{deployment} killed: {len(ids)} frames, {len(verdicts)} verdicts, {duplicates} dups")


def test_promoting_a_new_version_mid_stream_switches_without_losing_frames(line: Line) -> None:
    sent: list[Shot] = []
    sender = threading.Thread(target=lambda: sent.extend(_send(line, 40, fps=10)))
    sender.start()
    time.sleep(1.5)
    promoted_at = time.time()
    registry.promote(PRODUCT, version=2, uri=line.uri, reason="test")
    sender.join()
    verdicts = _verdicts(line, {s.frame_id for s in sent})
    by_id = {v.frame_id: v for v in verdicts}
    assert set(by_id) == {s.frame_id for s in sent}  # none missing
    versions = Counter(v.model_version for v in by_id.values())
    assert set(versions) == {"1", "2"}, versions
    # A frame sent after the promotion plus one alias lookup period must be on version 2.
    late = [s for s in sent if s.sent_at > promoted_at + ALIAS_POLL_S + 0.2]
    assert late and all(by_id[s.frame_id].model_version == "2" for s in late)


def _hostile_frames(
    line: Line, run: str, good: bytes, bomb: bytes, count: int
) -> list[tuple[bytes, bytes, list]]:
    """``count`` (key, value, headers) records that must each end in the DLQ: not images,
    decompression bombs, wrong formats, slivers, broken or missing headers, made-up products,
    markup in ids, garbage timestamps. Each key is unique, so the DLQ record is traceable."""
    import io

    from PIL import Image

    gif = io.BytesIO()
    Image.new("RGB", (line.image_size, line.image_size)).save(gif, "GIF")
    sliver = encode_image(np.zeros((4, 4 * line.image_size, 3), dtype=np.uint8))
    kinds = [
        ("not-image", lambda i: (b"%d not an image" % i, {})),
        ("truncated", lambda i: (good[: len(good) // 2], {})),
        ("bomb", lambda i: (bomb, {})),
        ("gif", lambda i: (gif.getvalue(), {})),
        ("sliver", lambda i: (sliver, {})),
        ("empty", lambda i: (b"", {})),
        ("made-up-product", lambda i: (good, {"product": f"ghost-{run}-{i}"})),
        ("bad-product-name", lambda i: (good, {"product": "../../etc"})),
        ("ts", lambda i: (good, {"ts": "-1e18"})),
        ("no-frame-id", lambda i: (good, {"frame_id": None})),
    ]
    records = []
    for i in range(count):
        _, make = kinds[i % len(kinds)]
        value, changes = make(i)
        key = f"hostile-{run}-{i}"
        fields = {
            "product": PRODUCT,
            "frame_id": f"[/][link=https://evil.example]{key}",
            "line": "l1",
            "camera": key,
            "ts": str(time.time()),
        } | changes
        headers = [(k, v.encode()) for k, v in fields.items() if v is not None]
        records.append((key.encode(), value, headers))
    return records


def _vm_hwm_mb(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) / 1024
    return float("nan")


def test_a_thousand_hostile_frames_among_good_ones(line: Line, png_bomb) -> None:
    """1,000 malformed, oversized and hostile frames interleaved with 100 good ones: 100
    verdicts, 1,000 DLQ records each with a reason, the scorer's memory bounded."""
    import ray

    run = str(next(line.seeds))
    images = synthetic_images(PRODUCT, line.image_size, 0.0, seed=int(run))
    good_images = [encode_image(img) for img, _, _ in itertools.islice(images, 100)]
    bomb = png_bomb(6000)  # 72 MB once decoded, ~70 kB on the wire
    hostile = _hostile_frames(line, run, good_images[0], bomb, 1000)
    # One good frame first: the scorer has its model loaded before its memory is measured.
    warm = _send(line, 1)
    _verdicts(line, {s.frame_id for s in warm})
    scorer_pid = ray.get(_replica_actor("scorer").__ray_call__.remote(lambda self: os.getpid()))
    before_mb = _vm_hwm_mb(scorer_pid)
    producer = make_producer(line.bootstrap)
    good_ids = set()
    for i, (key, value, headers) in enumerate(hostile):
        producer.send(FRAMES_TOPIC, value, key=key, headers=headers)
        if i % 10 == 9:
            frame_id = f"good-{run}-{i // 10}"
            good_ids.add(frame_id)
            fields = {"product": PRODUCT, "frame_id": frame_id, "line": "l1", "camera": "cam-g"}
            fields["ts"] = str(time.time())
            producer.send(
                FRAMES_TOPIC,
                good_images[i // 10],
                key=b"cam-g",
                headers=[(k, v.encode()) for k, v in fields.items()],
            )
    producer.flush()
    producer.close()

    verdicts = _verdicts(line, good_ids, timeout_s=300)
    assert {v.frame_id for v in verdicts} == good_ids and len(verdicts) == 100
    keys = {k.decode() for k, _, _ in hostile}
    reasons: dict[str, str] = {}
    deadline = time.monotonic() + 120
    while set(reasons) != keys and time.monotonic() < deadline:
        for record in read_topic(DLQ_TOPIC, line.bootstrap):
            key = (record.key or b"").decode()
            if key in keys:
                reasons[key] = dict(record.headers)[ERROR_HEADER].decode()
    assert set(reasons) == keys, f"{len(keys - set(reasons))} hostile frames have no DLQ record"
    assert all(r.strip() for r in reasons.values())
    peak_mb = _vm_hwm_mb(scorer_pid)
    print(
        f"hostile stream: 100 verdicts, {len(reasons)} DLQ records; scorer peak RSS "
        f"{before_mb:.0f} → {peak_mb:.0f} MB; reasons e.g. "
        + " | ".join(sorted({r[:60] for r in reasons.values()})[:12])
    )
    assert peak_mb - before_mb < 200
