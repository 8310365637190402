"""A camera simulator: frames with the edge-ad headers, published at a steady rate.

``edge-ad replay`` and ``edge-ad demo`` use it to stand in for a line camera. Frames come from
the synthetic product generator (normal boards with a share of defects drawn on them) or from
an image folder (an MVTec-style ``test/`` tree gives ground truth: ``good/`` is normal, any
other folder a defect). Each published frame is remembered as a :class:`Shot` so the caller
can compare verdicts with the truth.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_ad.errors import EdgeADError
from edge_ad.stream.schema import FRAMES_TOPIC, Frame
from edge_ad.stream.scoring import encode_image


@dataclass(frozen=True)
class Shot:
    """One published frame and what is really in it (label -1: unknown)."""

    frame_id: str
    label: int
    defect_type: str
    sent_at: float


def synthetic_images(
    product: str, image_size: int, defect_rate: float = 0.2, seed: int = 0
) -> Iterator[tuple[np.ndarray, int, str]]:
    """Endless ``(image, label, defect type)`` of the synthetic product, fresh poses each."""
    from edge_ad.data.synthetic import DEFECT_TYPES, TEST_INDEX_OFFSET, SyntheticProduct

    if not 0.0 <= defect_rate <= 1.0:
        raise EdgeADError(f"defect rate must be in [0, 1], got {defect_rate}")
    generator = SyntheticProduct(product, image_size, seed=seed)
    rng = np.random.default_rng(seed + 7)
    # Indices past the dataset's test range: frames the model has never seen.
    for index in itertools.count(2 * TEST_INDEX_OFFSET):
        defect = str(rng.choice(DEFECT_TYPES)) if rng.random() < defect_rate else None
        image, _ = generator.render(index, defect)
        yield image, int(defect is not None), defect or "good"


def _label_of(path: Path) -> tuple[int, str]:
    parts = [p.lower() for p in path.parts]
    if "good" in parts:
        return 0, "good"
    if "test" in parts and parts.index("test") < len(parts) - 2:
        return 1, path.parent.name
    return -1, "unknown"


def folder_images(folder: Path, image_size: int | None) -> Iterator[tuple[np.ndarray, int, str]]:
    """The folder's images (recursively, sorted), cycled; resized when ``image_size`` is set."""
    from edge_ad.data.layout import is_image
    from edge_ad.data.transforms import decode_rgb, read_image

    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image(p))
    paths = [p for p in paths if "ground_truth" not in p.parts]  # MVTec masks are not frames
    if not paths:
        raise EdgeADError(f"--source {folder} holds no images (.png, .jpg, ...)")
    for path in itertools.cycle(paths):
        image = read_image(path, image_size) if image_size else decode_rgb(path.read_bytes())
        yield (image, *_label_of(path))


def publish_frames(
    producer,
    images: Iterator[tuple[np.ndarray, int, str]],
    product: str,
    count: int,
    fps: float | None,
    line: str = "line-1",
    cameras: tuple[str, ...] = ("cam-1",),
    on_sent: Callable[[Shot], None] | None = None,
) -> list[Shot]:
    """Publish ``count`` frames at ``fps`` (None: as fast as possible); return what was sent.

    Frames go round-robin over ``cameras`` (the record key, so each camera keeps its order).
    Raises after the last frame if the broker did not acknowledge all of them.
    """
    run = uuid.uuid4().hex[:8]
    shots: list[Shot] = []
    futures = []
    start = time.monotonic()
    for i, (image, label, defect_type) in enumerate(itertools.islice(images, count)):
        if fps:
            delay = start + i / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        camera = cameras[i % len(cameras)]
        frame = Frame(
            frame_id=f"{camera}-{run}-{i:06d}",
            product=product,
            line=line,
            camera=camera,
            ts=time.time(),
            image=encode_image(image),
        )
        futures.append(
            producer.send(FRAMES_TOPIC, frame.image, key=frame.key(), headers=frame.headers())
        )
        shot = Shot(frame.frame_id, label, defect_type, frame.ts)
        shots.append(shot)
        if on_sent:
            on_sent(shot)
    producer.flush()
    failed = [f for f in futures if f.failed()]
    if failed:
        raise EdgeADError(
            f"the broker refused {len(failed)} of {len(futures)} frames: {failed[0].exception}"
        )
    return shots
