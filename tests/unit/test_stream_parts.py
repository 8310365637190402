"""Stream building blocks without a broker: offset bookkeeping, bootstrap resolution, the
alias cache, frame decoding, heatmap thumbnails and verdict building."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from edge_ad.errors import EdgeADError
from edge_ad.stream.broker import free_port
from edge_ad.stream.kafka_io import (
    DEFAULT_BOOTSTRAP,
    OffsetTracker,
    bootstrap_servers,
    make_producer,
)
from edge_ad.stream.schema import BadFrame, Frame, Verdict
from edge_ad.stream.scoring import (
    HEATMAP_MAX_SIDE,
    FrameScore,
    decode_frame_image,
    encode_image,
    heatmap_from_b64,
    heatmap_png,
    make_verdict,
)
from edge_ad.stream.versions import AliasWatcher

# --------------------------------------------------------------------------- OffsetTracker


def _started(partition: object, offsets: range) -> OffsetTracker:
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.start(partition, offset)
    return tracker


def test_offsets_finished_out_of_order_commit_only_below_first_in_flight() -> None:
    """The commit point never passes an offset whose verdict is not acknowledged yet."""
    tracker = _started("p0", range(5))
    assert tracker.committable() == {"p0": 0}
    for offset in (2, 0, 1):
        tracker.finish("p0", offset)
    assert tracker.committable() == {"p0": 3}  # 3 and 4 still in flight
    assert tracker.in_flight() == 2
    tracker.finish("p0", 4)
    assert tracker.committable() == {"p0": 3}  # 4 is done, but 3 is not
    assert tracker.in_flight() == 1
    tracker.finish("p0", 3)
    assert tracker.committable() == {"p0": 5}  # one past the last finished offset
    assert tracker.in_flight() == 0


def test_mark_committed_suppresses_reporting_the_same_point_again() -> None:
    """Once a point is committed it is not offered again until it moves forward."""
    tracker = _started("p0", range(3))
    tracker.finish("p0", 0)
    points = tracker.committable()
    assert points == {"p0": 1}
    tracker.mark_committed(points)
    assert tracker.committable() == {}
    tracker.finish("p0", 2)  # 1 still in flight: the point stays at 1
    assert tracker.committable() == {}
    tracker.finish("p0", 1)
    assert tracker.committable() == {"p0": 3}
    tracker.mark_committed({"p0": 3})
    tracker.mark_committed({"p0": 2})  # an older point never moves the mark back
    assert tracker.committable() == {}


def test_partitions_are_tracked_independently() -> None:
    """A slow record on one partition does not hold back another partition's commit."""
    a, b = ("frames", 0), ("frames", 1)
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.start(a, offset)
        tracker.start(b, 10 + offset)
    assert tracker.in_flight() == 6
    for offset in (1, 2):
        tracker.finish(a, offset)
    for offset in (10, 11, 12):
        tracker.finish(b, offset)
    assert tracker.committable() == {a: 0, b: 13}
    tracker.mark_committed({b: 13})
    assert tracker.committable() == {a: 0}
    assert tracker.in_flight() == 1


def test_forget_drops_a_partition_and_its_in_flight_records() -> None:
    """After a rebalance the revoked partition is neither counted nor offered for commit."""
    tracker = OffsetTracker()
    tracker.start("p0", 0)
    tracker.start("p0", 1)
    tracker.start("p1", 7)
    tracker.finish("p1", 7)
    tracker.mark_committed({"p1": 8})
    tracker.forget(["p0", "p1"])
    assert tracker.in_flight() == 0
    assert tracker.committable() == {}
    # A re-assigned partition starts from scratch: the old committed mark is gone too.
    tracker.start("p1", 3)
    tracker.finish("p1", 3)
    assert tracker.committable() == {"p1": 4}


# --------------------------------------------------------------------------- Kafka clients


def test_bootstrap_servers_explicit_beats_env_beats_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Resolution order: the explicit argument, then $EDGE_AD_BOOTSTRAP, then the default."""
    monkeypatch.delenv("EDGE_AD_BOOTSTRAP", raising=False)
    assert bootstrap_servers() == DEFAULT_BOOTSTRAP == "127.0.0.1:9092"
    monkeypatch.setenv("EDGE_AD_BOOTSTRAP", "kafka.local:9093")
    assert bootstrap_servers() == "kafka.local:9093"
    assert bootstrap_servers("10.0.0.5:19092") == "10.0.0.5:19092"
    monkeypatch.setenv("EDGE_AD_BOOTSTRAP", "")  # an empty variable counts as unset
    assert bootstrap_servers() == DEFAULT_BOOTSTRAP


def test_make_producer_without_a_broker_says_how_to_start_one() -> None:
    """A refused connection becomes an EdgeADError naming the address and `edge-ad broker`."""
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(EdgeADError, match="edge-ad broker") as info:
        make_producer(address, bootstrap_timeout_ms=1000)
    assert address in str(info.value)
    assert time.monotonic() - t0 < 5.0


# --------------------------------------------------------------------------- AliasWatcher


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Registry:
    """A lookup that counts calls per product and answers from a mutable table."""

    def __init__(self, versions: dict[str, int | None]) -> None:
        self.versions = versions
        self.calls: dict[str, int] = {}
        self.fail = False

    def __call__(self, product: str) -> int | None:
        self.calls[product] = self.calls.get(product, 0) + 1
        if self.fail:
            raise ConnectionError("registry down")
        return self.versions[product]


def test_alias_is_cached_within_ttl_and_looked_up_again_after() -> None:
    """The registry is asked once per ttl; a moved alias shows up after the ttl runs out."""
    clock, registry = _Clock(), _Registry({"pcb1": 3})
    watcher = AliasWatcher(registry, ttl_s=2.0, clock=clock)
    assert watcher.version("pcb1") == 3
    registry.versions["pcb1"] = 4  # the alias moves
    clock.now += 1.9
    assert watcher.version("pcb1") == 3  # still the cached answer
    assert registry.calls == {"pcb1": 1}
    clock.now += 0.1  # exactly ttl after the lookup: expired
    assert watcher.version("pcb1") == 4
    assert registry.calls == {"pcb1": 2}


def test_alias_caches_are_per_product_and_cache_none() -> None:
    """Each product has its own entry; 'no version holds the alias' is cached like a version."""
    clock, registry = _Clock(), _Registry({"pcb1": 3, "bottle": None})
    watcher = AliasWatcher(registry, ttl_s=2.0, clock=clock)
    assert watcher.version("pcb1") == 3
    clock.now += 1.5
    assert watcher.version("bottle") is None
    assert watcher.version("bottle") is None
    clock.now += 1.0  # pcb1's entry is 2.5 s old, bottle's 1.0 s
    assert watcher.version("pcb1") == 3
    assert watcher.version("bottle") is None
    assert registry.calls == {"pcb1": 2, "bottle": 1}


def test_alias_lookup_errors_propagate_and_are_not_cached() -> None:
    """A failing registry raises to the caller, and the next call asks again."""
    clock, registry = _Clock(), _Registry({"pcb1": 5})
    watcher = AliasWatcher(registry, ttl_s=2.0, clock=clock)
    registry.fail = True
    with pytest.raises(ConnectionError, match="registry down"):
        watcher.version("pcb1")
    with pytest.raises(ConnectionError):
        watcher.version("pcb1")
    registry.fail = False
    assert watcher.version("pcb1") == 5
    assert registry.calls == {"pcb1": 3}


def test_alias_forget_one_product_or_all() -> None:
    """forget(product) drops that entry only; forget() drops every entry."""
    clock, registry = _Clock(), _Registry({"pcb1": 1, "bottle": 2})
    watcher = AliasWatcher(registry, ttl_s=60.0, clock=clock)
    watcher.version("pcb1")
    watcher.version("bottle")
    watcher.forget("pcb1")
    watcher.version("pcb1")
    watcher.version("bottle")
    assert registry.calls == {"pcb1": 2, "bottle": 1}
    watcher.forget()
    watcher.version("pcb1")
    watcher.version("bottle")
    assert registry.calls == {"pcb1": 3, "bottle": 2}
    watcher.forget("never-seen")  # unknown products are fine


# --------------------------------------------------------------------------- decode_frame_image


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_png_at_model_size_decodes_to_the_same_pixels() -> None:
    """PNG is lossless and no resize happens at the exact size: pixels and channel order hold."""
    image = _rgb(32, 32)
    image[0, 0] = (255, 0, 0)  # pure red stays red (RGB, not BGR)
    out = decode_frame_image(encode_image(image), 32)
    assert out.dtype == np.uint8
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, image)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_larger_frame_is_resized_to_the_model_size() -> None:
    """A camera may send its native resolution (here 48x64, under 4:1)."""
    out = decode_frame_image(encode_image(_rgb(48, 64)), 32)
    assert out.shape == (32, 32, 3)
    assert out.dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "word"),
    [
        (encode_image(_rgb(16, 40)), "smaller"),
        (b"definitely not an image", "not a decodable image"),
        (b"", "empty"),
        (encode_image(_rgb(32, 160)), "aspect ratio"),
    ],
    ids=["too-small", "not-an-image", "empty", "aspect-5to1"],
)
def test_unusable_frames_are_bad_frames_that_say_why(data: bytes, word: str) -> None:
    """Each refusal is a BadFrame whose message (the DLQ reason) names the problem."""
    with pytest.raises(BadFrame, match=word):
        decode_frame_image(data, 32)


def test_greyscale_png_decodes_to_three_channels() -> None:
    """A mono camera's L-mode PNG becomes RGB with the grey value in every channel."""
    grey = np.random.default_rng(1).integers(0, 256, size=(32, 32), dtype=np.uint8)
    buf = io.BytesIO()
    mono = Image.fromarray(grey)
    assert mono.mode == "L"
    mono.save(buf, format="PNG")
    out = decode_frame_image(buf.getvalue(), 32)
    assert out.shape == (32, 32, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], grey)


# --------------------------------------------------------------------------- heatmaps


def _round_trip(amap: np.ndarray, threshold: float) -> np.ndarray:
    return heatmap_from_b64(base64.b64encode(heatmap_png(amap, threshold)).decode())


def test_heatmap_grey_scale_is_fixed_to_twice_the_threshold() -> None:
    """0 → black, threshold → mid grey, anything from 2×threshold up → white."""
    threshold = 0.4
    amap = np.zeros((8, 24), dtype=np.float32)
    amap[:, 8:16] = threshold
    amap[:, 16:] = 3 * threshold
    grey = _round_trip(amap, threshold)
    assert grey.shape == (8, 24)
    assert grey.dtype == np.uint8
    assert int(grey[:, :8].max()) <= 1
    assert 126 <= int(grey[:, 8:16].min()) <= int(grey[:, 8:16].max()) <= 129
    assert int(grey[:, 16:].min()) == 255


def test_large_heatmap_becomes_a_thumbnail() -> None:
    """A 256×256 map travels as a thumbnail of at most HEATMAP_MAX_SIDE px."""
    amap = np.random.default_rng(2).random((256, 256)).astype(np.float32)
    grey = _round_trip(amap, 0.5)
    assert max(grey.shape) <= HEATMAP_MAX_SIDE == 128
    assert grey.shape == (128, 128)  # square stays square


def test_heatmap_from_b64_refuses_non_png() -> None:
    """A heatmap field that is base64 of something else is a clear error, not garbage."""
    with pytest.raises(ValueError, match="not a PNG"):
        heatmap_from_b64(base64.b64encode(b"hello").decode())


# --------------------------------------------------------------------------- make_verdict


def test_make_verdict_copies_frame_and_score_and_measures_latency() -> None:
    """The verdict carries the frame's identity and the score, with latency from capture."""
    ts = time.time() - 0.5
    frame = Frame("f-9", "pcb1", "line-2", "cam-b", ts, b"png")
    score = FrameScore(
        score=1.25,
        threshold=0.8,
        is_anomalous=True,
        timestep=7,
        severity_distance=0.33,
        boxes=[{"x": 1, "y": 2, "w": 3, "h": 4}],
        heatmap="aGVhdA==",
    )
    verdict = make_verdict(frame, score, "7")
    assert isinstance(verdict, Verdict)
    assert (verdict.frame_id, verdict.product, verdict.camera, verdict.line) == (
        "f-9",
        "pcb1",
        "cam-b",
        "line-2",
    )
    assert verdict.ts == ts
    assert verdict.model_version == "7"
    assert (verdict.score, verdict.threshold, verdict.is_anomalous) == (1.25, 0.8, True)
    assert verdict.timestep == 7
    assert verdict.severity_distance == 0.33
    assert verdict.boxes == [{"x": 1, "y": 2, "w": 3, "h": 4}]
    assert verdict.heatmap == "aGVhdA=="
    assert 300.0 <= verdict.latency_ms <= 700.0


def test_make_verdict_latency_is_never_negative() -> None:
    """A camera clock ahead of ours gives latency 0, not a negative number."""
    frame = Frame("f-1", "pcb1", "line-1", "cam-a", time.time() + 60.0, b"png")
    score = FrameScore(0.1, 0.8, False, 3, 0.0, [], None)
    verdict = make_verdict(frame, score, "1")
    assert verdict.latency_ms == 0.0
    assert verdict.heatmap is None


def test_a_finish_from_before_a_rebalance_does_not_move_the_commit_point() -> None:
    """Offsets 0..4 in flight, the partition is revoked (forget), then the old worker for 4
    finishes: committing 5 would cover 0..3, whose verdicts were never acknowledged."""
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.start("p", offset)
    tracker.forget(["p"])
    tracker.finish("p", 4)
    assert tracker.committable() == {}
    tracker.start("p", 0)  # re-read from the last commit after the partition came back
    tracker.finish("p", 0)
    assert tracker.committable() == {"p": 1}


def test_serve_options_from_text_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a RayService's ``args`` (all text) become; unknown keys are an error."""
    from pipelines.serve import options_from_args

    monkeypatch.setenv("EDGE_AD_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    opts = options_from_args(
        {"products": "pcb1, pcb2", "max_batch_size": "4", "scorer_cpus": "0.5", "heatmaps": "no"}
    )
    assert (opts.bootstrap, opts.tracking_uri) == ("kafka:9092", "http://mlflow:5000")
    assert opts.products == ("pcb1", "pcb2")
    assert (opts.max_batch_size, opts.scorer_cpus, opts.heatmaps) == (4, 0.5, False)
    assert options_from_args({"bootstrap": "b:1"}).bootstrap == "b:1"
    with pytest.raises(EdgeADError, match="unknown serve option"):
        options_from_args({"batch": "4"})


def test_alias_watcher_asks_the_registry_once_when_many_frames_find_it_expired() -> None:
    """Frames that arrive while a product's lookup runs wait for it instead of each asking
    the registry (the first lookup of a store takes ~1 s)."""
    import threading

    from edge_ad.stream.versions import AliasWatcher

    calls: list[str] = []
    release = threading.Event()

    def lookup(product: str) -> int:
        calls.append(product)
        release.wait(5)
        return 7

    watcher = AliasWatcher(lookup, ttl_s=60)
    answers: list[int | None] = []
    threads = [
        threading.Thread(target=lambda: answers.append(watcher.version("pcb1"))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(5)
    assert answers == [7] * 8
    assert calls == ["pcb1"]


def test_alias_cache_is_bounded_and_unknown_products_are_not_looked_up() -> None:
    """Before: every product name seen in a header stayed cached and cost a registry query
    (a flood of made-up names = unbounded memory and a query each)."""
    clock = _Clock()
    registry = _Registry({f"p{i}": i for i in range(10)})
    listings = []

    def known() -> set[str]:
        listings.append(clock.now)
        return set(registry.versions)

    watcher = AliasWatcher(registry, ttl_s=2.0, clock=clock, max_products=4, known=known)
    for i in range(10):
        assert watcher.version(f"p{i}") == i
    assert len(watcher._cache) == 4 and len(watcher._lookups) <= 5
    for i in range(1000):
        assert watcher.version(f"made-up-{i}") is None
    assert set(registry.calls) == {f"p{i}" for i in range(10)}  # no lookup for made-up names
    assert len(listings) == 1  # one listing per ttl for all of them
    clock.now += 2.0
    registry.versions["new"] = 7  # registered meanwhile: seen after the next listing
    assert watcher.version("new") == 7 and len(listings) == 2
