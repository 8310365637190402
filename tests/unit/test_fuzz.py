"""Property-based fuzzing (hypothesis) of everything that parses input from outside: the frame
image decoder, the frame record (headers), the verdict reader and the settings a bundle carries.
The property is always the same: a valid result or the one clear error type, never another
exception, and no lasting memory growth. A bounded number of cases runs in CI."""

from __future__ import annotations

import contextlib
import io
import json
import resource
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edge_ad.config import Settings, load_settings, settings_from_dict
from edge_ad.errors import ConfigError
from edge_ad.stream.schema import FRAME_HEADERS, BadFrame, BadVerdict, Frame, Verdict, decode_frame
from edge_ad.stream.scoring import decode_frame_image

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZE = 32


def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


SEEDS = [_encoded("PNG"), _encoded("JPEG"), _encoded("BMP"), _encoded("TIFF")]


# The decoder imports torch and OpenCV on first use: import them now, so that the memory
# check below measures the fuzzing, not a first import.
import edge_ad.data.untrusted  # noqa: E402, F401


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(autouse=True)
def bounded_memory():
    before = _peak_mb()
    yield
    assert _peak_mb() - before < 300, "fuzzing grew the peak RSS by more than 300 MB"


def _decodes_or_refuses(data: bytes) -> None:
    try:
        out = decode_frame_image(data, SIZE)
    except BadFrame as err:
        assert str(err) and "\n" not in str(err)
        return
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


@FUZZ
@given(st.binary(max_size=2048))
def test_frame_decoder_on_arbitrary_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)


@FUZZ
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
    st.integers(0, 4096),
)
def test_frame_decoder_on_mutated_images(seed: bytes, flips: list, cut: int) -> None:
    """Real PNG/JPEG/BMP/TIFF files with bytes overwritten and tails cut: headers that lie
    about sizes, broken chunks, truncated data."""
    data = bytearray(seed)
    for pos, value in flips:
        data[pos % len(data)] = value
    _decodes_or_refuses(bytes(data[: max(1, len(data) - cut)]))


_header_names = st.one_of(st.sampled_from(FRAME_HEADERS), st.text(max_size=12))
_header_values = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"nan", b"-1e18", b"1e400", b"", b"[/]", b"1796000000.5", b"pcb1\n"]),
)


@FUZZ
@given(
    st.one_of(st.none(), st.binary(max_size=40)),
    st.one_of(st.none(), st.binary(max_size=64)),
    st.lists(st.tuples(_header_names, _header_values), max_size=8),
)
def test_frame_records_decode_or_go_to_the_dlq(key, value, headers) -> None:
    try:
        frame = decode_frame(key, value, headers)
    except BadFrame as err:
        assert str(err)
        return
    assert isinstance(frame, Frame) and frame.image == value


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_GOOD_VERDICT = json.loads(Verdict("f", "p", "c", "l", "1", 4.0, 3.0, True, 40).to_json())


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(_GOOD_VERDICT)), _json, max_size=6))
def test_verdict_reader_on_hostile_fields(changes: dict[str, Any]) -> None:
    data = json.dumps({**_GOOD_VERDICT, **changes}).encode()
    try:
        verdict = Verdict.from_json(data)
    except BadVerdict as err:
        assert str(err)
        return
    assert isinstance(verdict.is_anomalous, bool) and isinstance(verdict.boxes, list)
    assert np.isfinite(verdict.score)


@FUZZ
@given(st.binary(max_size=512))
def test_verdict_reader_on_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(BadVerdict):
        Verdict.from_json(data)


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in tree.items():
        out += _leaves(v, (*prefix, k)) if isinstance(v, dict) else [(*prefix, k)]
    return out


_SAVED = load_settings("tiny").to_dict()
_PATHS = _leaves(_SAVED)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(_PATHS), _json), min_size=1, max_size=3))
def test_bundle_settings_with_hostile_values(edits: list) -> None:
    """The settings in a bundle.json, leaves replaced by arbitrary JSON values."""
    tree = json.loads(json.dumps(_SAVED))
    for path, value in edits:
        node = tree
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    try:
        restored = settings_from_dict(tree)
    except ConfigError as err:
        assert str(err)
        return
    assert isinstance(restored, Settings)
