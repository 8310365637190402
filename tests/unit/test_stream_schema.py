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


def _verdict_json(**changes: object) -> bytes:
    base = json.loads(Verdict("f-1", "pcb1", "cam-a", "line-3", "2", 4.2, 3.9, True, 40).to_json())
    return json.dumps({**base, **changes}).encode()


@pytest.mark.parametrize(
    ("data", "word"),
    [
        (_verdict_json(is_anomalous="false"), "is_anomalous has the wrong type"),
        (_verdict_json(boxes="abc"), "boxes has the wrong type"),
        (_verdict_json(score=1).replace(b'"score": 1,', b'"score": 1e400,'), "score"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (_verdict_json(frame_id="x" * 10_000), "frame_id has the wrong type or value"),
        (_verdict_json(heatmap="A" * 2_000_000), "over 1,000,000"),
        (_verdict_json(timestep=-5), "timestep"),
    ],
    ids=["bool-as-text", "boxes-as-text", "1e400", "deep-nesting", "long-id", "huge", "t<0"],
)
def test_verdict_reader_is_strict_and_never_crashes(data: bytes, word: str) -> None:
    """Before: "false" became True, "abc" three boxes, and 1e400 or deep nesting crashed."""
    with pytest.raises(BadVerdict, match=word):
        Verdict.from_json(data)


def test_verdict_reader_keeps_what_the_scorer_writes() -> None:
    """Box extras (area, score) and int-valued floats read back as written."""
    box = {"x": 1, "y": 2, "w": 3, "h": 4, "area": 12, "score": 5.5}
    verdict = Verdict.from_json(_verdict_json(boxes=[box], score=4, severity_distance=None))
    assert verdict.boxes == [box] and verdict.score == 4.0
