"""The Kafka contract: frames in, verdicts out, bad frames to the DLQ.

* ``edge-ad.frames``: key = camera id (Kafka keeps order per key, so per camera), value = the
  encoded image (PNG/JPEG bytes), headers ``product``, ``frame_id``, ``line``, ``camera``, ``ts``.
* ``edge-ad.verdicts``: key = frame_id, value = UTF-8 JSON with at least the fields of
  :class:`Verdict`. Delivery is at-least-once, so consumers dedupe on ``frame_id``.
* ``edge-ad.frames.dlq``: the original key, value and headers, plus an ``error`` header that says
  why the frame could not be scored.

Decoding never trusts the bytes: every problem is a :class:`BadFrame` with a one-line reason,
which is what goes into the DLQ's ``error`` header. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from edge_ad.errors import EdgeADError

FRAMES_TOPIC = "edge-ad.frames"
VERDICTS_TOPIC = "edge-ad.verdicts"
DLQ_TOPIC = "edge-ad.frames.dlq"
#: How far a camera's clock may run ahead of the scorer's before its ts is refused.
MAX_CLOCK_AHEAD_S = 86_400.0
FRAME_HEADERS = ("product", "frame_id", "line", "camera", "ts")
ERROR_HEADER = "error"
MAX_HEADER_CHARS = 256

Headers = Sequence[tuple[str, bytes]]


class BadFrame(EdgeADError):
    """A frame that cannot be scored; its message is the DLQ ``error`` header."""


class BadVerdict(EdgeADError):
    """A verdict message that does not follow the schema."""


@dataclass(frozen=True)
class Frame:
    """One camera frame as it travels on the frames topic."""

    frame_id: str
    product: str
    line: str
    camera: str
    ts: float  # capture time, seconds since the epoch
    image: bytes  # encoded PNG/JPEG

    def key(self) -> bytes:
        return self.camera.encode()

    def headers(self) -> list[tuple[str, bytes]]:
        return [(name, str(getattr(self, name)).encode()) for name in FRAME_HEADERS]


def _header_map(headers: Headers | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in headers or ():
        try:
            name, raw = item
        except (TypeError, ValueError):
            raise BadFrame(f"malformed header entry {item!r:.60}") from None
        try:
            text = bytes(raw or b"").decode("utf-8")
        except (UnicodeDecodeError, TypeError):
            raise BadFrame(f"header {name!r} is not UTF-8 text") from None
        out[str(name)] = text
    return out


def decode_frame(key: bytes | None, value: bytes | None, headers: Headers | None) -> Frame:
    """A Kafka record of the frames topic → :class:`Frame`, or :class:`BadFrame` saying why not.

    Checks the contract only (headers, types, a non-empty value); whether the bytes are an image
    of the right size, and whether the product has a model, is for the stage that knows.
    """
    found = _header_map(headers)
    missing = [h for h in FRAME_HEADERS if not found.get(h, "").strip()]
    if missing:
        raise BadFrame(f"missing header(s): {', '.join(missing)}")
    too_long = [h for h in FRAME_HEADERS if len(found[h]) > MAX_HEADER_CHARS]
    if too_long:
        raise BadFrame(
            f"header(s) longer than {MAX_HEADER_CHARS} characters: {', '.join(too_long)}"
        )
    try:
        ts = float(found["ts"])
    except ValueError:
        raise BadFrame(
            f"header ts={found['ts']!r:.40} is not a number (seconds since epoch)"
        ) from None
    if not math.isfinite(ts):
        raise BadFrame(f"header ts={found['ts']!r:.40} is not a finite time")
    if not 0 < ts <= time.time() + MAX_CLOCK_AHEAD_S:
        # A latency measured from it would be meaningless (1e21 ms from ts=-1e18); a value
        # in milliseconds lands here too.
        raise BadFrame(
            f"header ts={found['ts']!r:.40} is not a capture time (seconds since the epoch, "
            "not in the future)"
        )
    if not value:
        raise BadFrame("empty value: the frame carries no image")
    camera = found["camera"]
    if key is not None and key != camera.encode():
        raise BadFrame(f"record key {key[:40]!r} differs from header camera={camera!r}")
    return Frame(
        frame_id=found["frame_id"],
        product=found["product"],
        line=found["line"],
        camera=camera,
        ts=ts,
        image=bytes(value),
    )


def dlq_headers(headers: Headers | None, error: str) -> list[tuple[str, bytes]]:
    """The original headers (an earlier ``error`` replaced) plus ``error`` = one-line reason."""
    reason = " ".join(str(error).split())[:1000] or "unknown error"
    kept = [(n, bytes(v or b"")) for n, v in (headers or ()) if n != ERROR_HEADER]
    return [*kept, (ERROR_HEADER, reason.encode())]


@dataclass
class Verdict:
    """What edge-ad says about one frame (the verdicts topic's JSON)."""

    frame_id: str
    product: str
    camera: str
    line: str
    model_version: str
    score: float
    threshold: float
    is_anomalous: bool
    timestep: int
    boxes: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: float = 0.0
    ts: float = 0.0  # the frame's capture time, copied through
    severity_distance: float | None = None  # DIC's mean KNN distance (why this T̂)
    heatmap: str | None = None  # base64 PNG thumbnail of the map (anomalous frames)

    def key(self) -> bytes:
        return self.frame_id.encode()

    def to_json(self) -> bytes:
        # allow_nan=False: bare NaN/Infinity is not JSON, and a consumer must never read one.
        return json.dumps(asdict(self), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Verdict:
        """Parse a verdict read from the topic, which anyone with write access can fill:
        strict types (``"false"`` is not a bool, ``"abc"`` not a list of boxes), finite
        numbers, bounded sizes; anything else is a :class:`BadVerdict` saying why."""
        if len(data) > MAX_VERDICT_BYTES:
            raise BadVerdict(f"verdict is {len(data):,} bytes, over {MAX_VERDICT_BYTES:,}")
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadVerdict(f"verdict is not JSON: {err}") from None
        except RecursionError:
            raise BadVerdict("verdict JSON is nested too deeply") from None
        if not isinstance(raw, dict):
            raise BadVerdict("verdict JSON is not an object")
        try:
            wire = _VerdictWire.model_validate(raw)
        except ValidationError as err:
            errors = err.errors()
            missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing"]
            if missing:
                raise BadVerdict(f"verdict lacks field(s): {', '.join(missing)}") from None
            where = ".".join(str(p) for p in errors[0]["loc"])
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise BadVerdict(
                f"verdict field {where} has the wrong type or value: {errors[0]['msg']}{more}"
            ) from None
        return cls(**wire.model_dump())


#: A verdict with its heatmap thumbnail is a few kB; anything this large is not one.
MAX_VERDICT_BYTES = 1_000_000
_Text = Annotated[str, StringConstraints(max_length=MAX_HEADER_CHARS)]
_Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Box(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(ge=0)
    h: int = Field(ge=0)


class _VerdictWire(BaseModel):
    """The verdict JSON as validated on read (the fields of :class:`Verdict`)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    frame_id: _Text
    product: _Text
    camera: _Text
    line: _Text
    model_version: _Text
    score: _Finite
    threshold: _Finite
    is_anomalous: bool
    timestep: int = Field(ge=0, le=100_000)
    boxes: list[_Box] = Field(default_factory=list, max_length=1000)
    latency_ms: _Finite = 0.0
    ts: _Finite = 0.0
    severity_distance: _Finite | None = None
    heatmap: Annotated[str, StringConstraints(max_length=MAX_VERDICT_BYTES)] | None = None

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        out = super().model_dump(**kwargs)
        # Boxes go back to plain dicts, as the scorer wrote them (extra keys kept).
        out["boxes"] = [box.model_dump() for box in self.boxes]
        return out
