"""The streaming inspection graph: Kafka frames → Ray Serve → Kafka verdicts.

Three deployments, composed with ``.bind()``::

    ingress (consumer-group member per replica)
      ├─▶ scorer   @serve.multiplexed model per product@version, @serve.batch over frames:
      │            decode ─▶ features φ(x) ─▶ DIC severity → T̂ ─▶ guided DDIM in latent space
      │            ─▶ latent + feature map ─▶ score, boxes, heatmap
      └─▶ publisher  verdict (or DLQ entry) to Kafka, answered once the broker acknowledged it

Severity, reconstruction and map are one batched call of the detector, not three deployments:
they share the frame's features (computed once) and the model, and every frame takes
the same number of DDIM steps whatever its T̂, so one batch mixes T̂ instead of splitting
into groups.

Delivery is at-least-once. The ingress commits a partition's offset only up to the first frame
whose verdict (or DLQ entry) the broker has not acknowledged yet; a replica that dies
mid-stream leaves its frames uncommitted, and whoever owns the partition next scores them
again (verdicts carry ``frame_id``: consumers dedupe). Scorer or publisher failures are retried
until ``retry_deadline_s``; a frame that cannot be scored at all goes to the DLQ with the reason.

Backpressure: each ingress replica keeps at most ``max_in_flight`` frames between poll and
acknowledgement (it stops polling when full), and the scorer accepts ``4 × max_batch_size``
requests so a batch can fill while the previous one computes.

Which model: the ingress asks the registry which version holds the alias (``production``) for
the frame's product, at most every ``alias_poll_s``; the frame goes to the scorer as model id
``<product>/<version>``. When the alias moves, new frames carry the new id and the scorer loads
it next to the old one, so frames already in flight finish on the version they started with.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener
from ray import serve

from edge_ad.errors import EdgeADError
from edge_ad.names import is_product_name

log = logging.getLogger("edge_ad.serve")

APP_NAME = "edge-ad"
GROUP_ID = "edge-ad-serve"
_LATENCY_WINDOW = 10_000


@dataclass(frozen=True)
class ServeOptions:
    """Everything the graph needs; plain data so Ray ships it to every replica."""

    bootstrap: str
    tracking_uri: str
    products: tuple[str, ...] = ()  # empty: any product with a model holding the alias
    alias: str = "production"
    group_id: str = GROUP_ID
    ingress_replicas: int = 1
    scorer_min_replicas: int = 1
    scorer_max_replicas: int = 1
    scorer_cpus: float = 1.0
    scorer_gpus: float = 0.0  # e.g. 1 (or 0.5 to pack two scorers per GPU) on GPU workers
    torch_threads: int = 0  # 0: one per reserved CPU (at least 1)
    device: str = "auto"
    max_batch_size: int = 8
    batch_wait_s: float = 0.02
    max_in_flight: int = 32  # per ingress replica
    alias_poll_s: float = 2.0
    retry_deadline_s: float = 120.0
    commit_interval_s: float = 0.5
    heatmaps: bool = True
    edge_home: str | None = None  # replicas cache downloaded models there

    def scorer_deployment_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.scorer_cpus, "num_gpus": self.scorer_gpus},
            "max_ongoing_requests": 4 * self.max_batch_size,
        }
        if self.scorer_max_replicas > self.scorer_min_replicas:
            opts["autoscaling_config"] = {
                "min_replicas": self.scorer_min_replicas,
                "max_replicas": self.scorer_max_replicas,
                # One full batch computing and one filling per replica.
                "target_ongoing_requests": 2 * self.max_batch_size,
                "upscale_delay_s": 5,
                "downscale_delay_s": 60,
            }
        else:
            opts["num_replicas"] = self.scorer_min_replicas
        return opts


def _adopt_home(options: ServeOptions) -> None:
    if options.edge_home:
        os.environ["EDGE_AD_HOME"] = options.edge_home


def _quiet_logs() -> dict[str, Any]:
    # One access-log line per frame would drown everything else.
    return {"enable_access_log": False, "log_level": "WARNING"}


# ----------------------------------------------------------------------------- scorer


@dataclass
class LoadedModel:
    product: str
    version: int
    detector: Any


@serve.deployment(name="scorer", logging_config=_quiet_logs())
class FrameScorer:
    """Scores encoded frames with the model named by the request's multiplexed model id."""

    def __init__(self, options: ServeOptions) -> None:
        import torch

        _adopt_home(options)
        self.options = options
        threads = options.torch_threads or max(1, round(options.scorer_cpus))
        torch.set_num_threads(threads)
        self._batched.set_max_batch_size(options.max_batch_size)
        self._batched.set_batch_wait_timeout_s(options.batch_wait_s)
        self.batches: collections.Counter[int] = collections.Counter()

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> LoadedModel:
        product, _, version = model_id.rpartition("/")
        return await asyncio.to_thread(self._load, product, int(version))

    def _load(self, product: str, version: int) -> LoadedModel:
        from edge_ad.bundle import load_bundle
        from edge_ad.registry import model_name, resolve_bundle

        path, _ = resolve_bundle(
            f"models:/{model_name(product)}/{version}", self.options.tracking_uri
        )
        bundle = load_bundle(path, device=self.options.device)
        log.warning("scorer loaded %s version %d", product, version)
        return LoadedModel(product, version, bundle.detector)

    async def score(self, image: bytes) -> tuple[str, Any]:
        """("ok", FrameScore) or ("bad", reason) for one encoded frame."""
        return await self._batched(image, serve.get_multiplexed_model_id())

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, images: list[bytes], model_ids: list[str]) -> list[tuple[str, Any]]:
        from edge_ad.stream.schema import BadFrame
        from edge_ad.stream.scoring import score_frames

        self.batches[len(images)] += 1
        out: list[tuple[str, Any] | None] = [None] * len(images)
        for model_id in dict.fromkeys(model_ids):
            members = [i for i, m in enumerate(model_ids) if m == model_id]
            try:
                model = await self.get_model(model_id)
            except EdgeADError as err:  # the version vanished from the registry, bad bundle
                for i in members:
                    out[i] = ("bad", f"model {model_id} cannot be loaded: {err}")
                continue
            results = await asyncio.to_thread(
                score_frames, model.detector, [images[i] for i in members], self.options.heatmaps
            )
            for i, result in zip(members, results, strict=True):
                out[i] = ("bad", str(result)) if isinstance(result, BadFrame) else ("ok", result)
        return [o for o in out if o is not None]

    async def batch_sizes(self) -> dict[int, int]:
        return dict(self.batches)


# ----------------------------------------------------------------------------- publisher


@serve.deployment(name="publisher", logging_config=_quiet_logs(), max_ongoing_requests=256)
class VerdictPublisher:
    """Produces to Kafka and answers only once the broker acknowledged the record."""

    def __init__(self, options: ServeOptions) -> None:
        from edge_ad.stream.kafka_io import make_producer

        self.producer = make_producer(options.bootstrap)

    async def publish(
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
    ) -> int:
        """The record's offset in ``topic``; raises if the broker refused it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(setter: Any, value: Any) -> None:
            if not done.done():
                setter(value)

        future = self.producer.send(topic, value, key=key, headers=headers)
        future.add_callback(lambda md: loop.call_soon_threadsafe(settle, done.set_result, md))
        future.add_errback(
            lambda err: loop.call_soon_threadsafe(
                settle, done.set_exception, EdgeADError(f"broker refused the record: {err}")
            )
        )
        metadata = await asyncio.wait_for(done, timeout=60)
        return int(metadata.offset)

    def __del__(self) -> None:
        producer = getattr(self, "producer", None)
        if producer is not None:
            producer.close(timeout=5)


# ----------------------------------------------------------------------------- ingress


@dataclass
class IngressStats:
    consumed: int = 0
    verdicts: int = 0
    dlq: int = 0
    retries: int = 0
    in_flight: int = 0
    by_version: dict[str, int] = field(default_factory=dict)
    # Seconds summed over frames: where a frame's time goes (registry, scorer, Kafka).
    lookup_s: float = 0.0
    score_s: float = 0.0
    publish_s: float = 0.0


class _Rebalance(ConsumerRebalanceListener):
    """Commits what is safe before partitions move away, then forgets them."""

    def __init__(self, ingress: FrameIngress) -> None:
        self.ingress = ingress

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.ingress._commit(only=set(revoked))
        self.ingress.tracker.forget(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.warning("ingress assigned %s", sorted(tp.partition for tp in assigned))


@serve.deployment(name="ingress", logging_config=_quiet_logs(), health_check_period_s=5)
class FrameIngress:
    """Consumes the frames topic in a consumer group and drives each frame to a verdict."""

    def __init__(self, scorer: Any, publisher: Any, options: ServeOptions) -> None:
        from edge_ad import registry
        from edge_ad.stream.kafka_io import OffsetTracker
        from edge_ad.stream.versions import AliasWatcher

        _adopt_home(options)
        self.scorer, self.publisher, self.options = scorer, publisher, options
        self.tracker = OffsetTracker()
        self.versions = AliasWatcher(
            lambda p: registry.alias_version(p, options.alias, options.tracking_uri),
            options.alias_poll_s,
            known=lambda: registry.registered_products(options.tracking_uri),
        )
        self.stats = IngressStats()
        self._stats_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(options.max_in_flight)
        self._pool = ThreadPoolExecutor(options.max_in_flight, thread_name_prefix="frame")
        self._stop = threading.Event()
        self._fatal: str | None = None
        self._consumer: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consumer", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise EdgeADError(
                f"the ingress could not join the consumer group on {options.bootstrap}"
            )
        if self._fatal:
            raise EdgeADError(self._fatal)

    # -- consumer thread

    def _run(self) -> None:
        from edge_ad.stream.kafka_io import make_consumer
        from edge_ad.stream.schema import FRAMES_TOPIC

        try:
            self._consumer = make_consumer(
                [FRAMES_TOPIC],
                self.options.group_id,
                self.options.bootstrap,
                listener=_Rebalance(self),
                max_poll_records=self.options.max_in_flight,
            )
        except Exception as err:
            self._fatal = f"ingress cannot consume {FRAMES_TOPIC}: {err}"
            self._ready.set()
            return
        self._ready.set()
        last_commit = time.monotonic()
        try:
            while not self._stop.is_set():
                batch = self._consumer.poll(timeout_ms=200)
                for partition, records in batch.items():
                    for record in records:
                        # Blocks while max_in_flight frames are on their way: backpressure.
                        while not self._slots.acquire(timeout=0.5):
                            if self._stop.is_set():
                                return
                        self.tracker.start(partition, record.offset)
                        with self._stats_lock:
                            self.stats.consumed += 1
                        self._pool.submit(self._process, partition, record)
                if time.monotonic() - last_commit >= self.options.commit_interval_s:
                    self._commit()
                    last_commit = time.monotonic()
        except Exception as err:  # the consumer itself broke: let Serve restart the replica
            self._fatal = f"consumer loop failed: {type(err).__name__}: {err}"
            log.error(self._fatal)
        finally:
            if self._fatal is None:
                self._commit()
            self._consumer.close(autocommit=False)

    def _commit(self, only: set[Any] | None = None) -> None:
        from kafka.structs import OffsetAndMetadata

        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        points = {
            tp: off
            for tp, off in self.tracker.committable().items()
            if tp in assigned and (only is None or tp in only)
        }
        if not points:
            return
        try:
            consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in points.items()})
        except Exception as err:  # a rebalance in progress; the next commit catches up
            log.warning("offset commit deferred: %s", err)
            return
        self.tracker.mark_committed(points)

    # -- one frame, on a worker thread

    def _process(self, partition: Any, record: Any) -> None:
        try:
            topic, key, value, headers, version = self._outcome(record)
            started = time.perf_counter()
            self._call(lambda: self.publisher.publish.remote(topic, key, value, headers), 30)
            self._add_time("publish_s", started)
            self.tracker.finish(partition, record.offset)
            self._count(topic, version, value)
        except Exception as err:
            # Not acknowledged, so never committed: the frame is re-read after a restart.
            self._fatal = f"frame at {partition.partition}:{record.offset} failed: {err}"
            log.error(self._fatal)
        finally:
            self._slots.release()

    def _outcome(self, record: Any) -> tuple[str, bytes, bytes, list, int | None]:
        """(topic, key, value, headers, model version) of what to publish for ``record``."""
        from edge_ad.stream.schema import (
            DLQ_TOPIC,
            VERDICTS_TOPIC,
            BadFrame,
            decode_frame,
            dlq_headers,
        )
        from edge_ad.stream.scoring import make_verdict

        def dlq(reason: str) -> tuple[str, bytes, bytes, list, None]:
            return (
                DLQ_TOPIC,
                record.key,
                record.value or b"",
                dlq_headers(record.headers, reason),
                None,
            )

        try:
            frame = decode_frame(record.key, record.value, record.headers)
        except BadFrame as err:
            return dlq(str(err))
        served = self.options.products
        if served and frame.product not in served:
            return dlq(
                f"product {frame.product!r} is not served here (serving {', '.join(served)})"
            )
        if not is_product_name(frame.product):
            return dlq(f"product {frame.product!r} is not a valid product name")
        started = time.perf_counter()
        version = self._call(lambda: self.versions.version(frame.product), None)
        self._add_time("lookup_s", started)
        if version is None:
            return dlq(
                f"no model for product {frame.product!r}: no version of edge-ad-{frame.product} "
                f"holds alias {self.options.alias!r}"
            )
        model_id = f"{frame.product}/{version}"
        started = time.perf_counter()
        try:
            kind, result = self._call(
                lambda: self.scorer.options(multiplexed_model_id=model_id).score.remote(
                    frame.image
                ),
                self.options.retry_deadline_s,
            )
        except Exception as err:  # a bug or a scorer down past the deadline: say so, go on
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
            return dlq(f"scoring failed: {type(err).__name__}: {reason}"[:500])
        finally:
            self._add_time("score_s", started)
        if kind == "bad":
            return dlq(result)
        verdict = make_verdict(frame, result, str(version))
        return (
            VERDICTS_TOPIC,
            verdict.key(),
            verdict.to_json(),
            [
                ("product", frame.product.encode()),
                ("camera", frame.camera.encode()),
            ],
            version,
        )

    def _call(self, make: Any, timeout_s: float | None) -> Any:
        """``make()`` (a Serve call when ``timeout_s`` is set, else a plain call), retried on
        transient failures with backoff until ``retry_deadline_s``."""
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors

        transient = (
            ray_errors.RayActorError,
            ray_errors.ActorUnavailableError,
            ray_errors.GetTimeoutError,
            serve_errors.BackPressureError,
            serve_errors.DeploymentUnavailableError,
            TimeoutError,
            ConnectionError,
            EdgeADError,  # MLflow unreachable for a moment
        )
        deadline = time.monotonic() + self.options.retry_deadline_s
        delay = 0.25
        while True:
            try:
                out = make()
                return out.result(timeout_s=timeout_s) if timeout_s is not None else out
            except transient as err:
                if self._stop.is_set() or time.monotonic() + delay > deadline:
                    raise EdgeADError(
                        f"gave up after retrying: {type(err).__name__}: {err}"
                    ) from None
                with self._stats_lock:
                    self.stats.retries += 1
                time.sleep(delay)
                delay = min(2 * delay, 4.0)

    def _add_time(self, name: str, started: float) -> None:
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + time.perf_counter() - started)

    def _count(self, topic: str, version: int | None, value: bytes) -> None:
        from edge_ad.stream.schema import DLQ_TOPIC

        with self._stats_lock:
            if topic == DLQ_TOPIC:
                self.stats.dlq += 1
                return
            self.stats.verdicts += 1
            key = str(version)
            self.stats.by_version[key] = self.stats.by_version.get(key, 0) + 1

    # -- Serve hooks

    async def get_stats(self) -> dict[str, Any]:
        with self._stats_lock:
            self.stats.in_flight = self.tracker.in_flight()
            out = asdict(self.stats)
        context = serve.get_replica_context()
        out["replica"] = str(getattr(context, "replica_tag", None) or context.replica_id)
        return out

    async def __call__(self, request: Any) -> dict[str, Any]:
        """HTTP GET on the app's route (a RayService's serve Service): this replica's counters."""
        return await self.get_stats()

    def check_health(self) -> None:
        if self._fatal:
            raise RuntimeError(self._fatal)
        if not self._thread.is_alive() and not self._stop.is_set():
            raise RuntimeError("the consumer thread stopped")

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is None:
            return
        stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- app


def build_app(options: ServeOptions) -> Any:
    """The bound graph (what ``serve.run`` and a RayService's import path take)."""
    scorer = FrameScorer.options(**options.scorer_deployment_options()).bind(options)
    publisher = VerdictPublisher.options(ray_actor_options={"num_cpus": 0.1}).bind(options)
    return FrameIngress.options(
        num_replicas=options.ingress_replicas,
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=16,
    ).bind(scorer, publisher, options)


def start_serving(options: ServeOptions) -> Any:
    """Run the graph on the current Ray (local or ``RAY_ADDRESS``); returns the ingress handle."""
    from pipelines.train import ensure_ray

    ensure_ray()
    serve.start(proxy_location="Disabled", logging_config=_quiet_logs())
    return serve.run(build_app(options), name=APP_NAME, route_prefix=None)


def stop_serving() -> None:
    """Delete the app (ingress replicas commit what is acknowledged) and stop Serve."""
    try:
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()


def app_builder(args: dict[str, str]) -> Any:
    """The graph for ``serve run pipelines.serve:app_builder bootstrap=kafka:9092 ...`` and for
    a RayService's ``import_path`` (its ``args``); see :func:`options_from_args`."""
    return build_app(options_from_args(args))


def options_from_args(args: dict[str, Any]) -> ServeOptions:
    """:class:`ServeOptions` from text arguments. Keys are its fields; ``bootstrap`` and
    ``tracking_uri`` default to $EDGE_AD_BOOTSTRAP and $MLFLOW_TRACKING_URI, ``products`` is
    comma-separated."""
    from dataclasses import fields

    from edge_ad import registry
    from edge_ad.stream.kafka_io import bootstrap_servers

    known = {f.name: f for f in fields(ServeOptions)}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise EdgeADError(f"unknown serve option(s): {', '.join(unknown)}")
    values: dict[str, Any] = {
        "bootstrap": bootstrap_servers(args.get("bootstrap")),
        "tracking_uri": registry.tracking_uri(args.get("tracking_uri")),
    }
    for name, raw in args.items():
        if name in ("bootstrap", "tracking_uri"):
            continue
        default = known[name].default
        if name == "products":
            values[name] = tuple(p.strip() for p in str(raw).split(",") if p.strip())
        elif isinstance(default, bool):
            values[name] = str(raw).lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            values[name] = type(default)(raw)
        else:
            values[name] = raw
    return ServeOptions(**values)
