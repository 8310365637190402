"""From frames on the wire to verdicts: image decoding, batched scoring, verdict building.

Pure functions over a loaded detector, so the Serve graph (pipelines/serve.py), the benchmark
and the tests all score frames the same way. A frame that cannot be scored (bytes that are not
an image, the wrong size) is a :class:`~edge_ad.stream.schema.BadFrame` in the result list, not
an exception: one bad frame must not fail the batch it shares with good ones.
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from edge_ad.stream.schema import BadFrame, Frame, Verdict
from edge_ad.visualize import defect_regions, scaled_map

if TYPE_CHECKING:  # the detector pulls in torch and diffusers; the camera side needs neither
    from edge_ad.detector import LatentDiffusionDetector

HEATMAP_MAX_SIDE = 128  # verdict heatmaps are thumbnails: a few kB on the topic


def encode_image(image: np.ndarray, fmt: str = ".png") -> bytes:
    """RGB uint8 (H, W, 3) → PNG (default) or JPEG bytes."""
    ok, buf = cv2.imencode(fmt, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"OpenCV could not encode an image as {fmt}")
    return buf.tobytes()


def decode_frame_image(data: bytes, size: int) -> np.ndarray:
    """PNG/JPEG bytes → RGB uint8 (size, size, 3), or :class:`BadFrame` saying why not.

    The checks of :func:`edge_ad.data.untrusted.decode_untrusted` (bytes, format, pixel count,
    sides, aspect) run on the header before anything is decoded. Colour conversion and
    resizing are those of training, so a camera may send its native resolution.
    """
    from edge_ad.data.untrusted import UntrustedImageError, decode_untrusted

    try:
        return decode_untrusted(data, size, name="frame")
    except UntrustedImageError as err:
        raise BadFrame(str(err)) from None


def heatmap_png(amap: np.ndarray, threshold: float) -> bytes:
    """The anomaly map as a grey PNG thumbnail: 0 → black, 2×threshold and above → white
    (the same fixed scale as :func:`edge_ad.visualize.heatmap_overlay`)."""
    grey = (scaled_map(amap, threshold) * 255).astype(np.uint8)
    side = max(grey.shape)
    if side > HEATMAP_MAX_SIDE:
        scale = HEATMAP_MAX_SIDE / side
        grey = cv2.resize(
            grey,
            (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale))),
            interpolation=cv2.INTER_AREA,
        )
    ok, buf = cv2.imencode(".png", grey)
    assert ok
    return buf.tobytes()


def heatmap_from_b64(text: str) -> np.ndarray:
    """A verdict's ``heatmap`` field back to a grey uint8 array (0..255 = 0..2×threshold)."""
    data = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError("verdict heatmap is not a PNG")
    return image


@dataclass(frozen=True)
class FrameScore:
    """What the detector said about one frame (before it becomes a :class:`Verdict`)."""

    score: float
    threshold: float
    is_anomalous: bool
    timestep: int
    severity_distance: float | None  # D3AD's DIC distance; None for other methods
    boxes: list[dict]
    heatmap: str | None  # base64 PNG thumbnail, for anomalous frames only


def score_frames(
    detector: LatentDiffusionDetector, images: Sequence[bytes], heatmaps: bool = True
) -> list[FrameScore | BadFrame]:
    """Score encoded frames in one detector batch (frames of mixed T̂ share it: each takes the
    same number of DDIM steps)."""
    size = detector.settings.data.image_size
    results: list[FrameScore | BadFrame | None] = [None] * len(images)
    good: list[tuple[int, np.ndarray]] = []
    for i, data in enumerate(images):
        try:
            good.append((i, decode_frame_image(data, size)))
        except BadFrame as err:
            results[i] = err
    if good:
        import torch

        from edge_ad.detector import finite_or_none

        batch = torch.from_numpy(np.stack([img for _, img in good])).permute(0, 3, 1, 2)
        pred = detector.predict(batch)
        for j, (i, _) in enumerate(good):
            if not math.isfinite(float(pred.scores[j])):
                # Never "ok": a NaN compares false with the threshold and would pass as normal.
                results[i] = BadFrame(
                    f"the model gave a non-finite score ({float(pred.scores[j])}): its bundle "
                    "is broken; retrain or roll back the alias"
                )
                continue
            amap = pred.maps[j].numpy()
            anomalous = bool(pred.is_anomalous[j])
            results[i] = FrameScore(
                score=float(pred.scores[j]),
                threshold=float(detector.threshold),
                is_anomalous=anomalous,
                timestep=int(pred.timesteps[j]),
                severity_distance=finite_or_none(pred.distances[j]),
                boxes=defect_regions(amap, detector.threshold),
                heatmap=(
                    base64.b64encode(heatmap_png(amap, detector.threshold)).decode()
                    if heatmaps and anomalous
                    else None
                ),
            )
    return [r for r in results if r is not None]


def make_verdict(frame: Frame, result: FrameScore, model_version: str) -> Verdict:
    """The verdict for ``frame``; ``latency_ms`` runs from the frame's capture time (``ts``)."""
    return Verdict(
        frame_id=frame.frame_id,
        product=frame.product,
        camera=frame.camera,
        line=frame.line,
        model_version=model_version,
        score=result.score,
        threshold=result.threshold,
        is_anomalous=result.is_anomalous,
        timestep=result.timestep,
        boxes=result.boxes,
        latency_ms=max(0.0, 1000.0 * (time.time() - frame.ts)),
        ts=frame.ts,
        severity_distance=result.severity_distance,
        heatmap=result.heatmap,
    )
