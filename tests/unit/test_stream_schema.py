"""The Kafka contract: frame headers, DLQ reasons, verdict JSON."""

from __future__ import annotations

import json
import re

import pytest

from edge_ad.stream.schema import (
    ERROR_HEADER,
    FRAME_HEADERS,
    BadFrame,
    BadVerdict,
    Frame,
    Verdict,
    decode_frame,
    dlq_headers,
)

FRAME = Frame("f-1", "pcb1", "line-3", "cam-a", 1796000000.25, b"\x89PNG...")


def test_frame_round_trips_through_key_value_headers() -> None:
    back = decode_frame(FRAME.key(), FRAME.image, FRAME.headers())
    assert back == FRAME
    assert [name for name, _ in FRAME.headers()] == list(FRAME_HEADERS)
    assert FRAME.key() == b"cam-a"  # Kafka orders per key: per camera


@pytest.mark.parametrize(
    ("drop", "reason"),
    [("product", "missing header(s): product"), ("ts", "missing header(s): ts")],
)
def test_missing_headers_are_named(drop: str, reason: str) -> None:
    headers = [(n, v) for n, v in FRAME.headers() if n != drop]
    with pytest.raises(BadFrame, match=re.escape(reason)):
        decode_frame(FRAME.key(), FRAME.image, headers)


@pytest.mark.parametrize(
    ("headers", "value", "key", "reason"),
    [
        (None, b"x", None, "missing header"),
        ([("product", b"\xff\xfe")], b"x", None, "not UTF-8"),
        ([*FRAME.headers()[:4], ("ts", b"yesterday")], b"x", None, "not a number"),
        ([*FRAME.headers()[:4], ("ts", b"nan")], b"x", None, "not a finite time"),
        # Before: ts=-1e18 was accepted and gave a latency of 1e21 ms.
        ([*FRAME.headers()[:4], ("ts", b"-1e18")], b"x", None, "not a capture time"),
        ([*FRAME.headers()[:4], ("ts", b"1796000000250")], b"x", None, "not a capture time"),
        (FRAME.headers(), b"", None, "empty value"),
        (FRAME.headers(), b"x", b"cam-b", "differs from header camera"),
        ([("product",)], b"x", None, "malformed header"),
    ],
)
def test_bad_records_get_a_one_line_reason(
    headers: list | None, value: bytes, key: bytes | None, reason: str
) -> None:
    with pytest.raises(BadFrame, match=reason) as info:
        decode_frame(key, value, headers)
    assert "\n" not in str(info.value)


def test_dlq_keeps_the_original_headers_and_adds_one_error() -> None:
    first = dlq_headers(FRAME.headers(), "cannot decode image:\n  truncated")
    assert first[:-1] == FRAME.headers()
    assert first[-1] == (ERROR_HEADER, b"cannot decode image: truncated")
    again = dlq_headers(first, "unknown product")  # re-routed: one error header, the newest
    assert [n for n, _ in again].count(ERROR_HEADER) == 1 and again[-1][1] == b"unknown product"


def test_verdict_json_round_trip_and_validation() -> None:
    verdict = Verdict(
        "f-1",
        "pcb1",
        "cam-a",
        "line-3",
        "3",
        4.2,
        3.9,
        True,
        40,
        boxes=[{"x": 1, "y": 2, "w": 3, "h": 4, "score": 5.0}],
        latency_ms=12.5,
        ts=1.0,
    )
    assert Verdict.from_json(verdict.to_json()) == verdict
    assert verdict.key() == b"f-1"
    data = json.loads(verdict.to_json())
    for field in (
        "frame_id",
        "product",
        "camera",
        "model_version",
        "score",
        "threshold",
        "is_anomalous",
        "timestep",
        "boxes",
        "latency_ms",
    ):
        assert field in data  # the fields the verdict schema promises consumers
    with pytest.raises(BadVerdict, match="lacks field"):
        Verdict.from_json(b'{"frame_id": "f-1"}')
    with pytest.raises(BadVerdict, match="not JSON"):
        Verdict.from_json(b"\x00garbage")
    bad = {**data, "score": "high"}
    with pytest.raises(BadVerdict, match="wrong type"):
        Verdict.from_json(json.dumps(bad).encode())
