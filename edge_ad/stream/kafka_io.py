"""kafka-python clients configured the way edge-ad needs them, and at-least-once bookkeeping.

* :func:`make_producer`: ``acks=all`` (a verdict counts as delivered only when the broker has
  it), small ``linger_ms`` batching, gzip compression. kafka-python checksums every batch
  with CRC-32C; without the ``crc32c`` package it falls back to pure Python (~30x slower), so a
  missing package is reported instead of silently slowing the line down.
* :func:`make_consumer`: a consumer-group member with auto-commit off (offsets are committed by
  :class:`OffsetTracker`, only up to the first frame whose verdict is not acknowledged yet)
  and the session timeout the embedded broker needs.
* :func:`read_topic`: every record of a topic without joining a group (``edge-ad verdicts``,
  tests). It stops at the highwater mark, which the embedded broker reports reliably (its
  ``end_offsets`` is not).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from edge_ad.errors import EdgeADError

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
SESSION_TIMEOUT_MS = 6000
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # a 4K PNG frame fits; Kafka's own default is 1 MiB


def bootstrap_servers(explicit: str | None = None) -> str:
    """``explicit`` > ``$EDGE_AD_BOOTSTRAP`` > ``127.0.0.1:9092`` (where ``edge-ad broker``
    listens by default)."""
    return explicit or os.environ.get("EDGE_AD_BOOTSTRAP") or DEFAULT_BOOTSTRAP


def crc32c_available() -> bool:
    try:
        import crc32c  # noqa: F401
    except ImportError:
        return False
    return True


def _unreachable(bootstrap: str, err: Exception) -> EdgeADError:
    return EdgeADError(
        f"no Kafka broker answers at {bootstrap} ({type(err).__name__}); start one with "
        "`edge-ad broker` or pass --bootstrap-servers / EDGE_AD_BOOTSTRAP"
    )


def check_reachable(bootstrap: str | None = None, timeout_s: float = 3.0) -> str:
    """The resolved bootstrap string, once one of its ``host:port`` accepts a TCP connection.

    kafka-python takes 30-40 s to give up on an address where nothing listens; this says so
    in a moment, with what to do about it.
    """
    import socket

    servers = bootstrap_servers(bootstrap)
    last: Exception = ConnectionRefusedError("no address given")
    for address in servers.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
                return servers
        except ValueError:
            raise EdgeADError(f"bootstrap address {address!r} is not HOST:PORT") from None
        except OSError as err:
            last = err
    raise _unreachable(servers, last)


def make_producer(bootstrap: str | None = None, **overrides: Any):
    """A ``KafkaProducer`` that waits for full acknowledgement and batches for up to 5 ms."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    if not crc32c_available():
        warnings.warn(
            "the crc32c package is missing: kafka-python falls back to pure-Python CRC-32C "
            "and produces ~30x slower (pip install crc32c)",
            RuntimeWarning,
            stacklevel=2,
        )
    servers = check_reachable(bootstrap)
    config: dict[str, Any] = {
        "bootstrap_servers": servers,
        "acks": "all",
        "linger_ms": 5,
        "compression_type": "gzip",
        "max_request_size": MAX_MESSAGE_BYTES,
        "retries": 5,
        "request_timeout_ms": 15000,
    }
    config.update(overrides)
    try:
        return KafkaProducer(**config)
    except KafkaError as err:  # NoBrokersAvailable and friends
        raise _unreachable(servers, err) from None


def make_consumer(
    topics: Iterable[str],
    group_id: str | None,
    bootstrap: str | None = None,
    listener: Any = None,
    **overrides: Any,
):
    """A ``KafkaConsumer`` subscribed to ``topics`` in ``group_id``, committing by hand.

    ``listener`` (a ``kafka.ConsumerRebalanceListener``) hears about partitions that move."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    servers = check_reachable(bootstrap)
    config: dict[str, Any] = {
        "bootstrap_servers": servers,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": SESSION_TIMEOUT_MS,
        "heartbeat_interval_ms": SESSION_TIMEOUT_MS // 3,
        "max_partition_fetch_bytes": MAX_MESSAGE_BYTES,
        "fetch_max_bytes": 4 * MAX_MESSAGE_BYTES,
    }
    config.update(overrides)
    try:
        consumer = KafkaConsumer(**config)
    except KafkaError as err:
        raise _unreachable(servers, err) from None
    topics = list(topics)
    if topics:
        consumer.subscribe(topics, listener=listener)
    return consumer


def read_topic(
    topic: str,
    bootstrap: str | None = None,
    follow: bool = False,
    idle_timeout_s: float = 2.0,
    stop: Callable[[], bool] | None = None,
) -> Iterator[Any]:
    """Every record of ``topic`` from the beginning, on all partitions, without a group.

    Without ``follow`` it ends once every partition is read up to its highwater mark and
    nothing new came for ``idle_timeout_s``; with ``follow`` it runs until ``stop()`` is true.
    """
    from kafka import TopicPartition

    consumer = make_consumer([], None, bootstrap)
    try:
        deadline = time.monotonic() + 30
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise EdgeADError(f"topic {topic} does not exist on {bootstrap_servers(bootstrap)}")
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        last_record = time.monotonic()
        while True:
            if stop is not None and stop():
                return
            batch = consumer.poll(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    last_record = time.monotonic()
                    yield record
            if follow or batch:
                continue
            caught_up = all(
                (hw := consumer.highwater(tp)) is not None and consumer.position(tp) >= hw
                for tp in assigned
            )
            if caught_up and time.monotonic() - last_record >= idle_timeout_s:
                return
    finally:
        consumer.close()


class OffsetTracker:
    """Which offsets may be committed, per partition, when records finish out of order.

    ``start`` registers a record as in flight, ``finish`` marks its verdict (or DLQ entry) as
    acknowledged. :meth:`committable` gives, per partition, the offset to commit: the first
    offset still in flight, or one past the last finished offset when none is. A frame whose
    verdict was not acknowledged is therefore never covered by a commit (at-least-once).
    Thread-safe: workers finish records while the consumer thread commits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[Any, set[int]] = {}
        self._next: dict[Any, int] = {}  # one past the highest finished offset
        self._committed: dict[Any, int] = {}

    def start(self, partition: Any, offset: int) -> None:
        with self._lock:
            self._in_flight.setdefault(partition, set()).add(offset)

    def finish(self, partition: Any, offset: int) -> None:
        with self._lock:
            pending = self._in_flight.get(partition)
            if pending is None or offset not in pending:
                # Started before a rebalance took the partition (``forget``): moving the commit
                # point for it could cover earlier frames that were never acknowledged.
                return
            pending.discard(offset)
            self._next[partition] = max(self._next.get(partition, 0), offset + 1)

    def in_flight(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._in_flight.values())

    def committable(self) -> dict[Any, int]:
        """Partitions whose commit point moved since :meth:`mark_committed` last saw it."""
        with self._lock:
            out = {}
            for partition in set(self._next) | set(self._in_flight):
                pending = self._in_flight.get(partition)
                if pending:
                    point = min(pending)
                elif partition in self._next:
                    point = self._next[partition]
                else:
                    continue
                if point > self._committed.get(partition, -1):
                    out[partition] = point
            return out

    def mark_committed(self, points: dict[Any, int]) -> None:
        with self._lock:
            for partition, point in points.items():
                self._committed[partition] = max(self._committed.get(partition, -1), point)

    def forget(self, partitions: Iterable[Any]) -> None:
        """Drop partitions taken away by a rebalance (their new owner re-reads from the last
        commit, so frames still in flight here may get a second verdict: at-least-once)."""
        with self._lock:
            for partition in partitions:
                self._in_flight.pop(partition, None)
                self._next.pop(partition, None)
                self._committed.pop(partition, None)
