"""The embedded tansu broker, for real: start, topics, a frame through Kafka and back, stop."""

from __future__ import annotations

import pytest

from edge_ad.errors import EdgeADError
from edge_ad.stream.broker import EmbeddedBroker
from edge_ad.stream.schema import (
    DLQ_TOPIC,
    FRAMES_TOPIC,
    VERDICTS_TOPIC,
    Frame,
    decode_frame,
)

pytestmark = pytest.mark.slow


def test_broker_creates_topics_carries_a_frame_and_stops() -> None:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    frame = Frame("f-1", "pcb1", "line-3", "cam-a", 1796000000.5, b"\x89PNG fake bytes")
    with EmbeddedBroker(port=0, frames_partitions=3) as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        topics = set(admin.list_topics())
        assert {FRAMES_TOPIC, VERDICTS_TOPIC, DLQ_TOPIC} <= topics
        described = admin.describe_topics([FRAMES_TOPIC])[0]
        assert len(described["partitions"]) == 3
        admin.close()
        assert broker.create_topics()  # a second call keeps the existing topics

        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        producer.send(FRAMES_TOPIC, frame.image, key=frame.key(), headers=frame.headers()).get(
            timeout=30
        )
        producer.close()
        consumer = KafkaConsumer(
            FRAMES_TOPIC,
            bootstrap_servers=broker.bootstrap,
            group_id="test",
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            consumer_timeout_ms=20000,
        )
        records = []
        for record in consumer:
            records.append(record)
            break
        consumer.close()
        assert len(records) == 1
        got = records[0]
        assert decode_frame(got.key, got.value, got.headers) == frame
        process = broker.process
    assert process is not None and process.poll() is not None  # stopped on exit


def test_a_taken_port_is_a_clear_error() -> None:
    with EmbeddedBroker(port=0) as first, pytest.raises(EdgeADError, match="already in use"):
        EmbeddedBroker(port=first.port).start()


def test_broker_command_runs_until_interrupted(edge_home: object) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from edge_ad.stream.broker import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from cli import app; app()", "broker", "--port", str(port)],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        from kafka.admin import KafkaAdminClient

        while True:
            try:
                admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
                topics = set(admin.list_topics())
                admin.close()
                if FRAMES_TOPIC in topics:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "the broker command did not come up"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"127.0.0.1:{port}" in out and "broker stopped" in out
