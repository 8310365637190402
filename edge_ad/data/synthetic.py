"""Procedural "product on a line" images with exact defect masks.

:class:`SyntheticProduct` draws a PCB-like board (solder-mask substrate with a fixed texture,
copper traces, pads, vias, ICs, an electrolytic capacitor, a connector, small passives,
silkscreen) lying on a conveyor belt. The board *layout* is a pure function of the product
name (``zlib.crc32`` of it, so it is stable across processes and machines), and is rendered
once per :class:`SyntheticProduct`. Every frame then only applies what a real camera sees
change: pose jitter (rotation within 2 degrees, translation within 3 % of the image side),
lighting jitter (gain, contrast, a linear illumination gradient, a slight colour cast), lens
blur and sensor noise. All of that is drawn from ``(product, seed, index)`` only, so
``render(i)`` and ``render(i, defect)`` share pose, lighting and noise: they differ exactly on
the defect mask and are identical everywhere else.

Defects (``DEFECT_TYPES``) are drawn on the unwarped board and warped with the same affine
transform as the image, so masks align to the pixel:

``scratch``        thin bright (scuffed / exposed copper) or dark line, ~0.1-0.5 % of the image
``crack``          thin jagged dark line with branches across bare substrate, ~0.2-1 %
``stain``          semi-transparent blob with a darker rim (flux, oil, water mark), ~1-4.5 %
``missing_part``   one large component absent: bare pads, traces and silkscreen, ~5-10 %
``contamination``  large irregular foreign-coloured area (tape, glue, dust), ~6-22 %

A mask is the set of pixels the defect changed (coverage >= 0.15 after warping); the defective
image equals the normal one everywhere else. ``render`` keeps no state between calls, so one
:class:`SyntheticProduct` can serve several threads.

:func:`generate_dataset` writes a product in MVTec layout (see ``edge_ad.data.layout``).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from edge_ad.errors import DatasetError, EdgeADError
from edge_ad.names import check_product_name

__all__ = [
    "DEFECT_TYPES",
    "MIN_DEFECT_PIXELS",
    "TEST_INDEX_OFFSET",
    "SynthSpec",
    "SyntheticProduct",
    "generate_dataset",
    "preview_grid",
    "product_seed",
    "read_synth_json",
]

DEFECT_TYPES: tuple[str, ...] = ("scratch", "missing_part", "stain", "crack", "contamination")

TEST_INDEX_OFFSET = 1_000_000
"""Test frames use indices from here on; training frames use ``0 .. n_train - 1``."""

MIN_DEFECT_PIXELS = 20
"""A defect smaller than this (mask pixels, or pixels that visibly change) is redrawn."""

SYNTH_JSON = "synth.json"
_FORMAT_VERSION = 1
_MASK_THRESHOLD = 0.15  # coverage above which a pixel belongs to the mask
_MAX_ATTEMPTS = 32
_MIN_AREA = {"crack": 0.0015, "scratch": 0.0006}  # fraction of the image; smaller is redrawn

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 in board units (0..1 of the image)
Color = tuple[float, float, float]  # RGB in 0..1
F32 = np.float32


# ----------------------------------------------------------------------------- validation


def product_seed(product: str) -> int:
    """The layout seed of ``product``: CRC-32 of its UTF-8 name (stable across runs)."""
    return zlib.crc32(product.encode("utf-8"))


def _check_product(product: str) -> str:
    try:
        return check_product_name(product)
    except EdgeADError as err:
        raise DatasetError(str(err)) from None


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DatasetError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_image_size(image_size: object) -> int:
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int | np.integer)
        or image_size < 64
        or image_size % 32
    ):
        raise DatasetError(
            f"image_size must be an integer >= 64 and a multiple of 32, got {image_size!r}"
        )
    return int(image_size)


def _check_defect(defect: str | None) -> str | None:
    if defect is not None and defect not in DEFECT_TYPES:
        raise DatasetError(
            f"unknown defect type {defect!r}; valid types: {', '.join(DEFECT_TYPES)}"
        )
    return defect


# ----------------------------------------------------------------------------- layout


@dataclass
class _Part:
    """One component, in board units. ``pads``/``holes`` belong to the bare board."""

    kind: str
    ref: str
    body: Rect
    extent: Rect  # body + pins + pads: the footprint that placement keeps apart
    large: bool = False
    vertical: bool = False
    pads: list[Rect] = field(default_factory=list)
    pins: list[Rect] = field(default_factory=list)
    holes: list[tuple[float, float, float]] = field(default_factory=list)  # cx, cy, pitch
    color: Color = (0.1, 0.1, 0.1)
    text: tuple[str, ...] = ()
    angle: float = 0.0  # for the capacitor's polarity segment


_SUBSTRATES: tuple[tuple[Color, float], ...] = (
    ((0.07, 0.33, 0.15), 0.45),  # classic green solder mask
    ((0.04, 0.23, 0.11), 0.25),  # dark green
    ((0.05, 0.11, 0.23), 0.18),  # dark blue
    ((0.08, 0.08, 0.09), 0.12),  # matte black
)
_FINISHES: tuple[Color, ...] = ((0.86, 0.70, 0.38), (0.80, 0.80, 0.78))  # ENIG gold, HASL
_SILK: Color = (0.92, 0.92, 0.88)
_HOLE: Color = (0.10, 0.10, 0.10)
_PIN: Color = (0.74, 0.74, 0.72)
_IC_BODY: Color = (0.10, 0.10, 0.11)

_BOARD: Rect = (0.07, 0.07, 0.93, 0.93)


def _overlaps(a: Rect, b: Rect, margin: float) -> bool:
    return not (
        a[2] + margin <= b[0]
        or b[2] + margin <= a[0]
        or a[3] + margin <= b[1]
        or b[3] + margin <= a[1]
    )


def _area(r: Rect) -> float:
    return (r[2] - r[0]) * (r[3] - r[1])


def _chamfered_outline(box: tuple[float, ...], chamfer: float) -> list[tuple[float, float]]:
    """Corners of a box with its two left corners cut (an electrolytic capacitor's footprint)."""
    x0, y0, x1, y1 = box[:4]
    return [
        (x0 + chamfer, y0),
        (x1, y0),
        (x1, y1),
        (x0 + chamfer, y1),
        (x0, y1 - chamfer),
        (x0, y0 + chamfer),
    ]


def _grow(r: Rect, d: float) -> Rect:
    return (r[0] - d, r[1] - d, r[2] + d, r[3] + d)


def _rand_text(rng: np.random.Generator, n: int) -> str:
    chars = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
    return "".join(chars[int(i)] for i in rng.integers(0, len(chars), n))


class _Layout:
    """Parts, traces and vias of one product, in board units; built from the product seed."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        weights = np.array([w for _, w in _SUBSTRATES])
        self.substrate: Color = _SUBSTRATES[
            int(rng.choice(len(_SUBSTRATES), p=weights / weights.sum()))
        ][0]
        self.finish: Color = _FINISHES[int(rng.integers(0, 2))]
        self.texture_seed = int(rng.integers(0, 2**31))
        self.parts: list[_Part] = []
        self.occupied: list[Rect] = []
        self.counts: dict[str, int] = {}
        bx0, by0, bx1, by1 = _BOARD
        self.mount_holes = [
            (bx0 + 0.045, by0 + 0.045),
            (bx1 - 0.045, by0 + 0.045),
            (bx0 + 0.045, by1 - 0.045),
            (bx1 - 0.045, by1 - 0.045),
        ]
        for cx, cy in self.mount_holes:
            self.occupied.append((cx - 0.04, cy - 0.04, cx + 0.04, cy + 0.04))

        # Large parts first (these are what ``missing_part`` removes).
        self._place(rng, self._qfp, large=True, margin=0.045)
        self._place(rng, self._elcap, large=True, margin=0.04)
        extras = [self._soic, self._header, self._elcap]
        order = rng.permutation(len(extras))
        n_extra = 1 + int(rng.random() < 0.6)
        for i in order[:n_extra]:
            self._place(rng, extras[int(i)], large=True, margin=0.04)
        # Small parts fill the rest.
        small = [self._chip_r, self._chip_c, self._chip_c, self._sot23, self._crystal]
        for _ in range(int(rng.integers(16, 26))):
            self._place(rng, small[int(rng.integers(0, len(small)))], large=False, margin=0.022)
        self.fiducials = []
        for _ in range(2):
            for _try in range(50):
                cx, cy = rng.uniform(0.12, 0.88, 2)
                r = (cx - 0.02, cy - 0.02, cx + 0.02, cy + 0.02)
                if not any(_overlaps(r, o, 0.01) for o in self.occupied):
                    self.fiducials.append((float(cx), float(cy)))
                    self.occupied.append(r)
                    break
        code, rev = int(rng.integers(100, 999)), "ABC"[int(rng.integers(0, 3))]
        self.label = f"{_rand_text(rng, 3)}-{code} REV {rev}"
        self.label_pos: tuple[float, float] | None = None
        for _try in range(80):
            x, y = float(rng.uniform(0.1, 0.6)), float(rng.uniform(0.12, 0.9))
            r = (x, y - 0.025, x + 0.3, y + 0.005)
            if r[2] < 0.9 and not any(_overlaps(r, o, 0.008) for o in self.occupied):
                self.label_pos = (x, y)
                self.occupied.append(r)
                break
        if not any(p.large for p in self.parts):  # cannot happen with today's sizes; be safe
            max(self.parts, key=lambda p: _area(p.extent)).large = True
        self._route(rng)

    # -- placement

    def _ref(self, prefix: str) -> str:
        self.counts[prefix] = self.counts.get(prefix, 0) + 1
        return f"{prefix}{self.counts[prefix]}"

    def _place(self, rng: np.random.Generator, maker: Callable, large: bool, margin: float) -> None:
        size_rng = np.random.default_rng(rng.integers(0, 2**63))
        w, h, build = maker(size_rng)
        bx0, by0, bx1, by1 = _BOARD
        pad = 0.02
        if w + 2 * pad > bx1 - bx0 or h + 2 * pad > by1 - by0:
            return
        for _try in range(200):
            cx = float(rng.uniform(bx0 + pad + w / 2, bx1 - pad - w / 2))
            cy = float(rng.uniform(by0 + pad + h / 2, by1 - pad - h / 2))
            ext = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            if not any(_overlaps(ext, o, margin) for o in self.occupied):
                part = build(cx, cy)
                part.large = large
                self.parts.append(part)
                self.occupied.append(part.extent)
                return

    def _qfp(self, rng: np.random.Generator):
        side = float(rng.uniform(0.2, 0.26))
        pitch = float(rng.uniform(0.0115, 0.0145))
        pl, pe = 0.024, 0.006
        ext = side + 2 * (pl + pe)
        text = (_rand_text(rng, 6), f"{int(rng.integers(1800, 2499))} {_rand_text(rng, 2)}")

        def build(cx: float, cy: float) -> _Part:
            x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
            n = int((side - 0.035) / pitch)
            offs = [(i - (n - 1) / 2) * pitch for i in range(n)]
            pw, padw = pitch * 0.48, pitch * 0.66
            part = _Part("qfp", self._ref("U"), (x0, y0, x1, y1), _grow((x0, y0, x1, y1), pl + pe))
            part.color, part.text = _IC_BODY, text
            for t in offs:
                for horiz, e, sgn in (
                    (True, x0, -1),
                    (True, x1, 1),
                    (False, y0, -1),
                    (False, y1, 1),
                ):
                    a, b = sorted((e, e + sgn * pl))
                    pa, pb = sorted((e - sgn * 0.003, e + sgn * (pl + pe)))
                    c = (cy if horiz else cx) + t
                    if horiz:
                        part.pins.append((a, c - pw / 2, b, c + pw / 2))
                        part.pads.append((pa, c - padw / 2, pb, c + padw / 2))
                    else:
                        part.pins.append((c - pw / 2, a, c + pw / 2, b))
                        part.pads.append((c - padw / 2, pa, c + padw / 2, pb))
            return part

        return ext, ext, build

    def _soic(self, rng: np.random.Generator):
        bw, bh = float(rng.uniform(0.12, 0.15)), float(rng.uniform(0.22, 0.29))
        pitch = float(rng.uniform(0.019, 0.024))
        pl, pe = 0.03, 0.008
        vertical = bool(rng.random() < 0.5)
        text = (_rand_text(rng, 5), _rand_text(rng, 4))
        w, h = bw + 2 * (pl + pe), bh
        if not vertical:
            w, h = h, w

        def build(cx: float, cy: float) -> _Part:
            hw, hh = (bw / 2, bh / 2) if vertical else (bh / 2, bw / 2)
            body = (cx - hw, cy - hh, cx + hw, cy + hh)
            length = bh
            n = int((length - 0.02) / pitch)
            offs = [(i - (n - 1) / 2) * pitch for i in range(n)]
            pw, padw = pitch * 0.42, pitch * 0.6
            ext = (body[0] - pl - pe, body[1], body[2] + pl + pe, body[3])
            if not vertical:
                ext = (body[0], body[1] - pl - pe, body[2], body[3] + pl + pe)
            part = _Part("soic", self._ref("U"), body, ext, vertical=vertical)
            part.color, part.text = _IC_BODY, text
            for t in offs:
                for sgn in (-1, 1):
                    if vertical:
                        e = body[2] if sgn > 0 else body[0]
                        a, b = sorted((e, e + sgn * pl))
                        pa, pb = sorted((e - sgn * 0.004, e + sgn * (pl + pe)))
                        part.pins.append((a, cy + t - pw / 2, b, cy + t + pw / 2))
                        part.pads.append((pa, cy + t - padw / 2, pb, cy + t + padw / 2))
                    else:
                        e = body[3] if sgn > 0 else body[1]
                        a, b = sorted((e, e + sgn * pl))
                        pa, pb = sorted((e - sgn * 0.004, e + sgn * (pl + pe)))
                        part.pins.append((cx + t - pw / 2, a, cx + t + pw / 2, b))
                        part.pads.append((cx + t - padw / 2, pa, cx + t + padw / 2, pb))
            return part

        return w, h, build

    def _elcap(self, rng: np.random.Generator):
        d = float(rng.uniform(0.23, 0.29))
        vertical = bool(rng.random() < 0.5)
        angle = float(rng.uniform(0, 360))
        sleeve = ((0.12, 0.12, 0.14), (0.10, 0.16, 0.36), (0.34, 0.10, 0.12))[
            int(rng.integers(0, 3))
        ]
        pe = 0.05 * d
        w, h = (d, d + 2 * pe) if vertical else (d + 2 * pe, d)
        text = (
            f"{int(rng.choice([10, 22, 47, 100, 220]))}",
            f"{int(rng.choice([6, 10, 16, 25]))}V",
        )

        def build(cx: float, cy: float) -> _Part:
            body = (cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2)
            ext = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            part = _Part("elcap", self._ref("C"), body, ext, vertical=vertical, angle=angle)
            part.color, part.text = sleeve, text
            pl_, pw_ = 0.2 * d, 0.22 * d
            for sgn in (-1, 1):
                if vertical:
                    e = cy + sgn * (d / 2 + pe)
                    a, b = sorted((e, e - sgn * pl_))
                    part.pads.append((cx - pw_ / 2, a, cx + pw_ / 2, b))
                    part.pins.append(
                        (cx - pw_ / 4, min(a, b) + 0.004, cx + pw_ / 4, max(a, b) - 0.004)
                    )
                else:
                    e = cx + sgn * (d / 2 + pe)
                    a, b = sorted((e, e - sgn * pl_))
                    part.pads.append((a, cy - pw_ / 2, b, cy + pw_ / 2))
                    part.pins.append(
                        (min(a, b) + 0.004, cy - pw_ / 4, max(a, b) - 0.004, cy + pw_ / 4)
                    )
            return part

        return w, h, build

    def _header(self, rng: np.random.Generator):
        k = int(rng.integers(6, 11))
        pitch = float(rng.uniform(0.036, 0.044))
        vertical = bool(rng.random() < 0.5)
        color = ((0.11, 0.11, 0.12), (0.86, 0.84, 0.76))[int(rng.integers(0, 2))]
        length, width = k * pitch + 0.014, 2 * pitch + 0.014
        w, h = (width, length) if vertical else (length, width)

        def build(cx: float, cy: float) -> _Part:
            body = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            part = _Part("header", self._ref("J"), body, body, vertical=vertical)
            part.color = color
            for i in range(k):
                t = (i - (k - 1) / 2) * pitch
                for s in (-0.5, 0.5):
                    u = s * pitch
                    px, py = (cx + u, cy + t) if vertical else (cx + t, cy + u)
                    part.holes.append((px, py, pitch))
                    q = 0.14 * pitch
                    part.pins.append((px - q, py - q, px + q, py + q))
            return part

        return w, h, build

    def _chip(self, rng: np.random.Generator, kind: str, prefix: str, color: Color):
        bw = float(rng.uniform(0.038, 0.054))
        bh = bw * 0.5
        vertical = bool(rng.random() < 0.4)
        pe = 0.12 * bw
        w, h = bw + 2 * pe, bh * 1.25
        if vertical:
            w, h = h, w

        def build(cx: float, cy: float) -> _Part:
            hw, hh = (bh / 2, bw / 2) if vertical else (bw / 2, bh / 2)
            body = (cx - hw, cy - hh, cx + hw, cy + hh)
            ext = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            part = _Part(kind, self._ref(prefix), body, ext, vertical=vertical, color=color)
            end = 0.24 * bw
            if vertical:
                part.pins = [
                    (body[0], body[1], body[2], body[1] + end),
                    (body[0], body[3] - end, body[2], body[3]),
                ]
                part.pads = [
                    (ext[0], ext[1], ext[2], body[1] + end * 1.2),
                    (ext[0], body[3] - end * 1.2, ext[2], ext[3]),
                ]
            else:
                part.pins = [
                    (body[0], body[1], body[0] + end, body[3]),
                    (body[2] - end, body[1], body[2], body[3]),
                ]
                part.pads = [
                    (ext[0], ext[1], body[0] + end * 1.2, ext[3]),
                    (body[2] - end * 1.2, ext[1], ext[2], ext[3]),
                ]
            return part

        return w, h, build

    def _chip_r(self, rng: np.random.Generator):
        return self._chip(rng, "chip_r", "R", (0.08, 0.08, 0.08))

    def _chip_c(self, rng: np.random.Generator):
        tone = float(rng.uniform(0.85, 1.1))
        return self._chip(rng, "chip_c", "C", (0.62 * tone, 0.50 * tone, 0.36 * tone))

    def _sot23(self, rng: np.random.Generator):
        bw, bh, ll = 0.036, 0.02, 0.012
        flip = bool(rng.random() < 0.5)

        def build(cx: float, cy: float) -> _Part:
            body = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
            ext = (body[0], body[1] - ll - 0.003, body[2], body[3] + ll + 0.003)
            part = _Part("sot23", self._ref("Q"), body, ext, color=(0.13, 0.13, 0.14))
            leads = [(-0.012, 1), (0.012, 1), (0.0, -1)]
            for dx, side in leads:
                side = -side if flip else side
                e = body[3] if side > 0 else body[1]
                a, b = sorted((e, e + side * ll))
                pa, pb = sorted((e - side * 0.002, e + side * (ll + 0.003)))
                part.pins.append((cx + dx - 0.003, a, cx + dx + 0.003, b))
                part.pads.append((cx + dx - 0.0045, pa, cx + dx + 0.0045, pb))
            return part

        return bw, bh + 2 * (ll + 0.003), build

    def _crystal(self, rng: np.random.Generator):
        bw, bh = float(rng.uniform(0.075, 0.095)), 0.034
        vertical = bool(rng.random() < 0.5)
        w, h = (bh, bw + 0.02) if vertical else (bw + 0.02, bh)

        def build(cx: float, cy: float) -> _Part:
            hw, hh = (bh / 2, bw / 2) if vertical else (bw / 2, bh / 2)
            body = (cx - hw, cy - hh, cx + hw, cy + hh)
            ext = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            part = _Part(
                "crystal", self._ref("Y"), body, ext, vertical=vertical, color=(0.70, 0.71, 0.72)
            )
            if vertical:
                part.pads = [
                    (ext[0] + 0.006, ext[1], ext[2] - 0.006, ext[1] + 0.022),
                    (ext[0] + 0.006, ext[3] - 0.022, ext[2] - 0.006, ext[3]),
                ]
            else:
                part.pads = [
                    (ext[0], ext[1] + 0.006, ext[0] + 0.022, ext[3] - 0.006),
                    (ext[2] - 0.022, ext[1] + 0.006, ext[2], ext[3] - 0.006),
                ]
            return part

        return w, h, build

    # -- traces

    def _route(self, rng: np.random.Generator) -> None:
        """Traces between pads of nearby parts (horizontal/vertical plus one 45-degree leg),
        fan-out stubs with vias from the QFP, a few thicker power traces."""
        self.traces: list[tuple[list[tuple[float, float]], float]] = []
        self.vias: list[tuple[float, float]] = []
        pads = [
            [((p[0] + p[2]) / 2, (p[1] + p[3]) / 2) for p in part.pads]
            + [(h[0], h[1]) for h in part.holes]
            for part in self.parts
        ]
        centres = np.array(
            [((p.body[0] + p.body[2]) / 2, (p.body[1] + p.body[3]) / 2) for p in self.parts]
        )
        usable = [i for i, pl in enumerate(pads) if pl]
        if len(usable) >= 2:
            for t in range(int(rng.integers(16, 26))):
                a = usable[int(rng.integers(0, len(usable)))]
                others = [i for i in usable if i != a]
                dist = np.linalg.norm(centres[others] - centres[a], axis=1)
                near = [others[int(j)] for j in np.argsort(dist)[:3]]
                b = near[int(rng.integers(0, len(near)))]
                p = pads[a][int(rng.integers(0, len(pads[a])))]
                q = pads[b][int(rng.integers(0, len(pads[b])))]
                width = 0.0065 if t % 6 else 0.013
                self.traces.append((self._path(p, q, bool(rng.random() < 0.5)), width))
        for part in self.parts:
            if part.kind != "qfp":
                continue
            cx, cy = (part.body[0] + part.body[2]) / 2, (part.body[1] + part.body[3]) / 2
            for pad in part.pads:
                if rng.random() > 0.35:
                    continue
                px, py = (pad[0] + pad[2]) / 2, (pad[1] + pad[3]) / 2
                dx, dy = px - cx, py - cy
                horiz = abs(dx) > abs(dy)
                ux, uy = (math.copysign(1, dx), 0.0) if horiz else (0.0, math.copysign(1, dy))
                start = (
                    (pad[2] if ux > 0 else pad[0], py)
                    if horiz
                    else (px, pad[3] if uy > 0 else pad[1])
                )
                ln = float(rng.uniform(0.012, 0.04))
                end = (start[0] + ux * ln, start[1] + uy * ln)
                if (
                    _BOARD[0] + 0.02 < end[0] < _BOARD[2] - 0.02
                    and _BOARD[1] + 0.02 < end[1] < _BOARD[3] - 0.02
                ):
                    self.traces.append(([start, end], 0.005))
                    self.vias.append(end)
        for _ in range(int(rng.integers(6, 14))):
            self.vias.append((float(rng.uniform(0.12, 0.88)), float(rng.uniform(0.12, 0.88))))

    @staticmethod
    def _path(
        p: tuple[float, float], q: tuple[float, float], straight_first: bool
    ) -> list[tuple[float, float]]:
        """p -> q as one axis-parallel leg and one 45-degree leg (in either order)."""
        dx, dy = q[0] - p[0], q[1] - p[1]
        if abs(dx) >= abs(dy):
            diag = math.copysign(abs(dy), dx)
            mid = (q[0] - diag, p[1]) if straight_first else (p[0] + diag, q[1])
        else:
            diag = math.copysign(abs(dx), dy)
            mid = (p[0], q[1] - diag) if straight_first else (q[0], p[1] + diag)
        return [p, mid, q]


# ----------------------------------------------------------------------------- board drawing


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise with about ``cells`` blobs across."""
    cells = max(2, int(cells))
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(F32)
    out = cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return out / max(float(out[::4, ::4].std()), 1e-6)


def _bbox(a: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of ``a > 0`` as slices (empty slices when ``a`` is all zero)."""
    x, y, w, h = cv2.boundingRect((a > 0).astype(np.uint8))
    return slice(y, y + h), slice(x, x + w)


def _scale(c: Color, k: float, add: float = 0.0) -> Color:
    return tuple(float(min(1.0, max(0.0, v * k + add))) for v in c)  # type: ignore[return-value]


class _Painter:
    """Draws board-unit geometry onto a supersampled float canvas of side ``P``."""

    def __init__(self, side: int) -> None:
        self.P = side

    def px(self, v: float) -> int:
        return round(v * self.P)

    def pt(self, x: float, y: float) -> tuple[int, int]:
        return (self.px(x), self.px(y))

    def th(self, t: float) -> int:
        return max(1, self.px(t))

    def rect(self, img: np.ndarray, r: Rect, color: Color | float) -> None:
        x0, y0, x1, y1 = (self.px(v) for v in r)
        cv2.rectangle(img, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), color, -1)

    def outline(self, img: np.ndarray, r: Rect, color: Color, t: float) -> None:
        cv2.rectangle(img, self.pt(r[0], r[1]), self.pt(r[2], r[3]), color, self.th(t))

    def circle(
        self, img: np.ndarray, c: tuple[float, float], r: float, color, t: float = -1
    ) -> None:
        cv2.circle(img, self.pt(*c), max(1, self.px(r)), color, -1 if t < 0 else self.th(t))

    def line(self, img: np.ndarray, pts: list[tuple[float, float]], color: Color, t: float) -> None:
        arr = np.array([self.pt(x, y) for x, y in pts], dtype=np.int32)
        cv2.polylines(img, [arr], False, color, self.th(t))

    def text(
        self,
        img: np.ndarray,
        s: str,
        org: tuple[float, float],
        h: float,
        color: Color,
        centered: bool = False,
    ) -> None:
        """Hershey text of cap height ``h``; ``org`` is the baseline start, or the centre."""
        font = cv2.FONT_HERSHEY_SIMPLEX
        scale = h * self.P / 22.0
        thick = max(1, round(scale * 1.6))
        (tw, th), base = cv2.getTextSize(s, font, scale, thick)
        x, y = self.pt(*org)
        if centered:
            x, y = x - tw // 2, y + th // 2
        pad = thick + 2
        x0, y0 = x - pad, y - th - pad
        stamp = np.zeros((th + base + 2 * pad, tw + 2 * pad), np.uint8)
        cv2.putText(stamp, s, (pad, pad + th), font, scale, 255, thick)
        # clip the stamp to the canvas
        cx0, cy0 = max(0, x0), max(0, y0)
        cx1, cy1 = min(img.shape[1], x0 + stamp.shape[1]), min(img.shape[0], y0 + stamp.shape[0])
        if cx1 <= cx0 or cy1 <= cy0:
            return
        a = stamp[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].astype(F32)[..., None] / 255.0
        roi = img[cy0:cy1, cx0:cx1]
        roi[:] = roi * (1.0 - a) + np.array(color, F32) * a

    def roi(self, r: Rect) -> tuple[slice, slice]:
        x0, y0 = max(0, self.px(r[0])), max(0, self.px(r[1]))
        x1, y1 = min(self.P, self.px(r[2]) + 1), min(self.P, self.px(r[3]) + 1)
        return slice(y0, y1), slice(x0, x1)


def _draw_bare(lay: _Layout, pa: _Painter, rng: np.random.Generator) -> np.ndarray:
    """Substrate, traces, vias, pads, holes and silkscreen: the board without components."""
    P = pa.P
    sub = lay.substrate
    img = np.empty((P, P, 3), F32)
    img[:] = sub
    mottle = 1.0 + 0.05 * _smooth_noise(rng, (P, P), 7)
    img *= mottle[..., None]
    trace = _scale(sub, 1.45, 0.03)
    fin = lay.finish
    for pts, width in lay.traces:
        pa.line(img, pts, trace, width)
    for v in lay.vias:
        pa.circle(img, v, 0.0085, trace)
        pa.circle(img, v, 0.0045, _scale(sub, 0.45))
    for part in lay.parts:
        for pad in part.pads:
            pa.rect(img, pad, fin)
        for hx, hy, pitch in part.holes:
            pa.circle(img, (hx, hy), 0.36 * pitch, fin)
            pa.circle(img, (hx, hy), 0.17 * pitch, _HOLE)
    for cx, cy in lay.mount_holes:
        pa.circle(img, (cx, cy), 0.03, fin)
        pa.circle(img, (cx, cy), 0.018, _HOLE)
        pa.circle(img, (cx, cy), 0.037, _SILK, 0.0035)
    for c in lay.fiducials:
        pa.circle(img, c, 0.017, _scale(sub, 0.55, 0.04))
        pa.circle(img, c, 0.0075, fin)
    silk_t = 0.0035
    for part in lay.parts:
        e = part.extent
        big = part.large
        if part.kind == "qfp":
            g = _grow(e, 0.008)
            arm = 0.035
            for (x, y), (sx, sy) in zip(
                ((g[0], g[1]), (g[2], g[1]), (g[0], g[3]), (g[2], g[3])),
                ((1, 1), (-1, 1), (1, -1), (-1, -1)),
                strict=True,
            ):
                pa.line(img, [(x + sx * arm, y), (x, y), (x, y + sy * arm)], _SILK, silk_t)
            pa.circle(img, (g[0] - 0.008, g[1] - 0.008), 0.005, _SILK)
        elif part.kind == "elcap":
            g = _grow(part.body, 0.01)
            ch = 0.035
            poly = _chamfered_outline(g, ch)
            pa.line(img, [*poly, poly[0]], _SILK, silk_t)
            px_, py_ = g[0] - 0.018, g[1] + 0.01
            pa.line(img, [(px_ - 0.01, py_), (px_ + 0.01, py_)], _SILK, silk_t)
            pa.line(img, [(px_, py_ - 0.01), (px_, py_ + 0.01)], _SILK, silk_t)
        elif part.kind == "soic":
            g = _grow(part.body, 0.006)
            if part.vertical:
                pa.line(img, [(g[0], g[1]), (g[2], g[1])], _SILK, silk_t)
                pa.line(img, [(g[0], g[3]), (g[2], g[3])], _SILK, silk_t)
            else:
                pa.line(img, [(g[0], g[1]), (g[0], g[3])], _SILK, silk_t)
                pa.line(img, [(g[2], g[1]), (g[2], g[3])], _SILK, silk_t)
            pa.circle(img, (e[0] - 0.008, e[1] - 0.008), 0.005, _SILK)
        else:
            pa.outline(img, _grow(e, 0.006 if not big else 0.01), _SILK, silk_t)
        h = 0.024 if big else 0.017
        y = e[1] - 0.012 if e[1] > 0.14 else e[3] + 0.012 + h
        pa.text(img, part.ref, (e[0], y), h, _SILK)
    if lay.label_pos is not None:
        pa.text(img, lay.label, lay.label_pos, 0.022, _SILK)
    bevel = _scale(sub, 1.3, 0.03)
    pa.outline(img, _grow(_BOARD, -0.002), bevel, 0.004)
    return img


def _shadow(img: np.ndarray, pa: _Painter, part: _Part, round_body: bool) -> None:
    """Soft contact shadow of a component, offset towards the lower right."""
    sl = pa.roi(_grow(part.extent, 0.03))
    sub = img[sl]
    m = np.zeros(sub.shape[:2], F32)
    oy, ox = sl[0].start, sl[1].start
    b = part.body
    off = (0.005, 0.007)
    x0, y0 = pa.px(b[0] + off[0]) - ox, pa.px(b[1] + off[1]) - oy
    x1, y1 = pa.px(b[2] + off[0]) - ox, pa.px(b[3] + off[1]) - oy
    if round_body:
        cv2.circle(m, ((x0 + x1) // 2, (y0 + y1) // 2), (x1 - x0) * 47 // 100, 1.0, -1)
    else:
        cv2.rectangle(m, (x0, y0), (x1, y1), 1.0, -1)
    m = cv2.GaussianBlur(m, (0, 0), 0.006 * pa.P)
    sub *= (1.0 - 0.45 * m)[..., None]


def _draw_part(img: np.ndarray, pa: _Painter, part: _Part) -> None:
    b = part.body
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    if part.kind in ("qfp", "soic"):
        _shadow(img, pa, part, False)
        for pin in part.pins:
            pa.rect(img, pin, _PIN)
        pa.rect(img, b, part.color)
        pa.rect(img, _grow(b, -0.005), _scale(part.color, 1.0, 0.035))
        corner = (b[0] + 0.028, b[1] + 0.028)
        pa.circle(img, corner, 0.011, _scale(part.color, 0.6))
        h = 0.022 if part.kind == "qfp" else 0.017
        if part.kind == "soic" and part.vertical:
            h = 0.014
        for i, line in enumerate(part.text):
            pa.text(img, line, (cx, cy + (i - 0.5) * h * 1.8), h, (0.52, 0.52, 0.52), True)
    elif part.kind == "elcap":
        _shadow(img, pa, part, True)
        for pin in part.pins:
            pa.rect(img, pin, _PIN)
        g = _grow(b, 0.0)
        ch = 0.03
        poly = np.array([pa.pt(*p) for p in _chamfered_outline(g, ch)], dtype=np.int32)
        cv2.fillPoly(img, [poly], (0.16, 0.15, 0.14))
        r = 0.47 * (b[2] - b[0])
        sl = pa.roi((cx - r, cy - r, cx + r, cy + r))
        sub = img[sl]
        yy, xx = np.mgrid[sl[0], sl[1]].astype(F32) / pa.P
        dx, dy = xx - cx, yy - cy
        dist = np.sqrt(dx * dx + dy * dy)
        inside = dist <= r
        hl = np.sqrt((dx + 0.35 * r) ** 2 + (dy + 0.35 * r) ** 2) / (2 * r)
        shade = (0.56 + 0.26 * (1 - hl)).astype(F32)
        alu = np.stack([shade * 0.97, shade * 0.98, shade], axis=-1)
        rim = (dist > r * 0.9) & inside
        alu[rim] *= 0.78
        ang = math.radians(part.angle)
        seg = inside & ((dx * math.cos(ang) + dy * math.sin(ang)) > 0.55 * r)
        sub[inside] = alu[inside]
        sub[seg] = np.array(part.color, F32) * shade[seg][:, None] * 1.3
        vent = _scale((0.6, 0.6, 0.62), 0.7)
        k = 0.32 * r
        pa.line(img, [(cx - k, cy), (cx + k, cy)], vent, 0.004)
        pa.line(img, [(cx, cy - k), (cx, cy + k)], vent, 0.004)
    elif part.kind == "header":
        _shadow(img, pa, part, False)
        pa.rect(img, b, part.color)
        pa.outline(img, _grow(b, -0.004), _scale(part.color, 0.8), 0.003)
        gold = (0.85, 0.70, 0.36)
        for (hx, hy, pitch), pin in zip(part.holes, part.pins, strict=True):
            q = 0.22 * pitch
            pa.rect(img, (hx - q, hy - q, hx + q, hy + q), _scale(part.color, 0.45))
            pa.rect(img, pin, gold)
            pa.rect(img, _grow(pin, -0.25 * (pin[2] - pin[0])), _scale(gold, 1.12))
    elif part.kind in ("chip_r", "chip_c"):
        _shadow(img, pa, part, False)
        pa.rect(img, b, part.color)
        for pin in part.pins:
            pa.rect(img, pin, _PIN)
    elif part.kind == "sot23":
        _shadow(img, pa, part, False)
        for pin in part.pins:
            pa.rect(img, pin, _PIN)
        pa.rect(img, b, part.color)
    elif part.kind == "crystal":
        _shadow(img, pa, part, False)
        pa.rect(img, b, _scale(part.color, 0.8))
        pa.rect(img, _grow(b, -0.004), part.color)
        pa.rect(img, _grow(b, -0.009), _scale(part.color, 1.08))


# ----------------------------------------------------------------------------- product


class SyntheticProduct:
    """A seeded PCB-like product; ``render(index, defect)`` draws one camera frame.

    The board layout depends on ``product`` only; ``seed`` selects a different (but equally
    normal) stream of frames and defects. Frames are deterministic in
    ``(product, image_size, seed, index, defect)``.
    """

    def __init__(self, product: str = "synth-pcb", image_size: int = 256, seed: int = 0) -> None:
        self.product = _check_product(product)
        self.image_size = S = _check_image_size(image_size)
        self.seed = _check_int("seed", seed, 0)
        self.layout_seed = product_seed(product)
        lay = self._layout = _Layout(self.layout_seed)
        tex_rng = np.random.default_rng(lay.texture_seed)

        pa = _Painter(max(2 * S, 512))
        bare = _draw_bare(lay, pa, tex_rng)
        full = bare.copy()
        footprint = np.zeros(full.shape[:2], bool)
        large: list[tuple[tuple[slice, slice], np.ndarray]] = []
        for part in lay.parts:
            sl = pa.roi(_grow(part.extent, 0.035))
            before = full[sl].copy()
            _draw_part(full, pa, part)
            changed = np.abs(full[sl] - before).max(axis=-1) > 1.5 / 255
            footprint[sl] |= changed
            if part.large:
                large.append((sl, changed))

        def down(a: np.ndarray) -> np.ndarray:
            return cv2.resize(a, (S, S), interpolation=cv2.INTER_AREA)

        fine = (1.0 + 0.025 * tex_rng.standard_normal((S, S)).astype(F32))[..., None]
        self._board = np.ascontiguousarray(down(full) * fine, dtype=F32)
        self._missing: list[tuple[np.ndarray, np.ndarray]] = []
        for sl, changed in large:
            variant = full.copy()
            region = variant[sl]
            region[changed] = bare[sl][changed]
            cover = np.zeros(full.shape[:2], F32)
            cover[sl][changed] = 1.0
            self._missing.append((down(variant) * fine, down(cover)))

        alpha_hi = np.zeros(full.shape[:2], F32)
        x0, y0, x1, y1 = (pa.px(v) for v in _BOARD)
        rad = pa.px(0.015)
        cv2.rectangle(alpha_hi, (x0 + rad, y0), (x1 - rad, y1), 1.0, -1)
        cv2.rectangle(alpha_hi, (x0, y0 + rad), (x1, y1 - rad), 1.0, -1)
        for cx_, cy_ in (
            (x0 + rad, y0 + rad),
            (x1 - rad, y0 + rad),
            (x0 + rad, y1 - rad),
            (x1 - rad, y1 - rad),
        ):
            cv2.circle(alpha_hi, (cx_, cy_), rad, 1.0, -1)
        alpha = down(alpha_hi)
        shift = np.float32([[1, 0, 0.008 * S], [0, 1, 0.012 * S]])
        shadow = cv2.warpAffine(alpha, shift, (S, S))
        shadow = cv2.GaussianBlur(shadow, (0, 0), 0.012 * S)
        self._aux = np.ascontiguousarray(np.stack([alpha, shadow, np.zeros_like(alpha)], -1))

        k = max(1, S // 64)
        on_board = (alpha > 0.999).astype(np.uint8)
        self._interior = cv2.erode(on_board, np.ones((2 * k + 1, 2 * k + 1), np.uint8)) > 0
        parts_lo = down(footprint.astype(F32)) > 0.01
        parts_lo = cv2.dilate(parts_lo.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        self._free = self._interior & ~parts_lo
        self._interior_yx = np.argwhere(
            cv2.erode(on_board, np.ones((S // 8, S // 8), np.uint8)) > 0
        )
        self._free_yx = np.argwhere(self._free)

        brng = np.random.default_rng([self.layout_seed, 7])
        yy = np.arange(S, dtype=F32)[:, None]
        belt = (
            0.2 + 0.025 * _smooth_noise(brng, (S, S), 5) + 0.012 * np.sin(yy * (2 * np.pi * 24 / S))
        )
        belt = belt + 0.015 * brng.standard_normal((S, S)).astype(F32)
        self._belt = np.ascontiguousarray(belt[..., None] * np.array([0.97, 1.0, 1.04], F32), F32)
        g = (np.arange(S, dtype=F32) + 0.5) / S - 0.5
        self._gx = np.broadcast_to(g[None, :], (S, S))
        self._gy = np.broadcast_to(g[:, None], (S, S))
        self._yy, self._xx = np.mgrid[0:S, 0:S].astype(F32)

    @property
    def n_removable_parts(self) -> int:
        """How many large components ``missing_part`` can remove."""
        return len(self._missing)

    # -- frames

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.layout_seed, self.seed, index, stream])

    def render(self, index: int, defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Frame number ``index`` (deterministic for (product, seed, index, defect)): RGB uint8
        (H, W, 3) and mask uint8 (H, W) {0, 255} (all zero when ``defect`` is None).

        ``render(i)`` and ``render(i, d)`` share pose, lighting and noise: the two images are
        identical outside the mask.
        """
        index = _check_int("index", index, 0)
        defect = _check_defect(defect)
        S = self.image_size
        rng = self._rng(index, 0)
        angle = float(rng.uniform(-2.0, 2.0))
        tx, ty = rng.uniform(-0.03, 0.03, 2) * S
        M = cv2.getRotationMatrix2D((S / 2 - 0.5, S / 2 - 0.5), angle, 1.0)
        M[:, 2] += (tx, ty)
        gain = 1.0 + float(rng.uniform(-0.08, 0.08))
        contrast = 1.0 + float(rng.uniform(-0.08, 0.08))
        grad = float(rng.uniform(0.0, 0.08))
        theta = float(rng.uniform(0, 2 * np.pi))
        cast = (1.0 + rng.uniform(-0.02, 0.02, 3)).astype(F32)
        blur = float(rng.uniform(0.3, 0.7)) * S / 256
        sigma = float(rng.uniform(0.006, 0.014))
        # Sensor noise: sum of two uniform bytes (triangular, std 255/sqrt(6)), several times
        # cheaper than Gaussian samples and indistinguishable at this amplitude.
        raw = np.frombuffer(rng.bytes(2 * S * S * 3), np.uint8).reshape(2, S, S, 3)
        noise = raw[0].astype(F32)
        noise += raw[1]
        noise -= 255.0
        noise *= sigma * math.sqrt(6.0) / 255.0

        illum = self._gx * (2 * grad * math.cos(theta)) + self._gy * (2 * grad * math.sin(theta))
        illum += 1.0
        illum *= gain

        def finish(board: np.ndarray, aux_w: np.ndarray) -> np.ndarray:
            rgb = cv2.warpAffine(
                board, M, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            )
            a = aux_w[..., 0:1]
            bg = self._belt * (1.0 - 0.5 * aux_w[..., 1:2])
            img = rgb * a + bg * (1.0 - a)
            img -= 0.4
            img *= contrast
            img += 0.4
            img *= illum[..., None]
            img *= cast
            if blur > 0.2:
                img = cv2.GaussianBlur(img, (0, 0), blur)
            img += noise
            img *= 255.0
            img += 0.5
            np.clip(img, 0, 255, out=img)
            return img.astype(np.uint8)

        if defect is None:
            aux_w = cv2.warpAffine(self._aux, M, (S, S), flags=cv2.INTER_LINEAR)
            return finish(self._board, aux_w), np.zeros((S, S), np.uint8)

        drng = self._rng(index, 1 + DEFECT_TYPES.index(defect))
        clean = None
        for _attempt in range(_MAX_ATTEMPTS):
            board, cover = self._draw_defect(defect, drng)
            aux = self._aux.copy()
            aux[..., 2] = cover
            aux_w = cv2.warpAffine(aux, M, (S, S), flags=cv2.INTER_LINEAR)
            mask = (aux_w[..., 2] >= _MASK_THRESHOLD) & (aux_w[..., 0] > 0.5)
            if int(mask.sum()) < max(MIN_DEFECT_PIXELS, _MIN_AREA.get(defect, 0.0) * S * S):
                continue
            if clean is None:
                clean = finish(self._board, aux_w)
            bad = finish(board, aux_w)
            changed = np.abs(bad[mask].astype(np.int16) - clean[mask]).max(axis=-1) >= 3
            if int(changed.sum()) < MIN_DEFECT_PIXELS:
                continue
            out = clean.copy()
            out[mask] = bad[mask]
            return out, mask.astype(np.uint8) * 255
        raise RuntimeError(f"could not draw a visible {defect} for frame {index}")  # a bug

    # -- defects (drawn on the unwarped board; ``cover`` is each pixel's defect coverage 0..1)

    def _draw_defect(self, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if defect == "missing_part":
            board, cover = self._missing[int(rng.integers(0, len(self._missing)))]
            return board, cover
        draw = {
            "scratch": self._scratch,
            "stain": self._stain,
            "crack": self._crack,
            "contamination": self._contamination,
        }[defect]
        return draw(rng)

    def _overlay(
        self, alpha: np.ndarray, layer: Color | np.ndarray, box: tuple[slice, slice] | None = None
    ) -> np.ndarray:
        """The clean board with ``layer`` (a colour, or an array of the ``box`` region) blended
        in with opacity ``alpha``; only the bounding box of ``alpha > 0`` is touched."""
        box = _bbox(alpha) if box is None else box
        board = self._board.copy()
        region = board[box]
        a = alpha[box][..., None]
        region *= 1.0 - a
        region += np.asarray(layer, F32) * a
        return board

    def _pick(self, rng: np.random.Generator, yx: np.ndarray) -> tuple[float, float]:
        y, x = yx[int(rng.integers(0, len(yx)))]
        return float(x) + float(rng.uniform(-0.5, 0.5)), float(y) + float(rng.uniform(-0.5, 0.5))

    def _scratch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        S = self.image_size
        x, y = self._pick(rng, self._interior_yx)
        length = max(float(rng.uniform(0.08, 0.3)) * S, 16.0)
        theta = float(rng.uniform(0, np.pi))
        bend = float(rng.uniform(-0.08, 0.08)) * length
        n = 6
        t = np.linspace(-0.5, 0.5, n)
        px = x + t * length * math.cos(theta) - (1 - 4 * t * t) * bend * math.sin(theta)
        py = y + t * length * math.sin(theta) + (1 - 4 * t * t) * bend * math.cos(theta)
        canvas = np.zeros((S, S), np.uint8)
        thick = max(1, round(S / 256 * float(rng.uniform(0.8, 2.0))))
        pts = np.round(np.stack([px, py], -1) * 16).astype(np.int32)
        cv2.polylines(canvas, [pts], False, 255, thick, cv2.LINE_AA, shift=4)
        cover = canvas.astype(F32) / 255 * self._interior
        kind = rng.random()
        if kind < 0.45:
            color = (0.92, 0.93, 0.90)  # scuffed, whitish
        elif kind < 0.8:
            color = (0.90, 0.62, 0.38)  # solder mask scraped to copper
        else:
            color = (0.03, 0.03, 0.03)
        fade = 0.75 + 0.25 * _smooth_noise(rng, (S, S), 6).clip(-1, 1)
        alpha = cover * float(rng.uniform(0.75, 0.95)) * fade
        return self._overlay(alpha, color), cover

    def _crack(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        S = self.image_size
        x, y = self._pick(rng, self._free_yx if len(self._free_yx) else self._interior_yx)
        total = float(rng.uniform(0.3, 0.6)) * S
        step = max(2.0, 0.02 * S)
        theta = float(rng.uniform(0, 2 * np.pi))
        canvas = np.zeros((S, S), np.uint8)

        def walk(x: float, y: float, heading: float, length: float, thick: int) -> list:
            pts = [(x, y)]
            ang = heading
            for _ in range(max(2, int(length / step))):
                ang = heading + 0.6 * (ang - heading) + float(rng.normal(0, 0.45))
                seg = step * float(rng.uniform(0.6, 1.4))
                x, y = x + seg * math.cos(ang), y + seg * math.sin(ang)
                pts.append((x, y))
            arr = np.round(np.array(pts) * 16).astype(np.int32)
            cv2.polylines(canvas, [arr], False, 255, thick, cv2.LINE_AA, shift=4)
            return pts

        main_thick = max(1, round(S / 256 * float(rng.uniform(1.2, 2.6))))
        pts = walk(x, y, theta, total, main_thick)
        for _ in range(int(rng.integers(0, 3))):
            bx, by = pts[int(rng.integers(1, len(pts)))]
            walk(
                bx,
                by,
                theta + float(rng.choice([-1, 1])) * float(rng.uniform(0.5, 1.1)),
                total * float(rng.uniform(0.15, 0.4)),
                max(1, S // 256),
            )
        cover = canvas.astype(F32) / 255 * self._free
        return self._overlay(cover * float(rng.uniform(0.85, 1.0)), (0.035, 0.03, 0.025)), cover

    def _blob(
        self, rng: np.random.Generator, area: float, rough: float, cells: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """An irregular blob of ``area`` (fraction of the image) on the board interior.
        Returns (coverage 0..1 with a ~1 px soft edge, depth 0 at the rim .. 1 inside)."""
        S = self.image_size
        x, y = self._pick(rng, self._interior_yx)
        r = math.sqrt(area * S * S / math.pi)
        d2 = ((self._xx - x) ** 2 + (self._yy - y) ** 2) / (r * r)
        n = _smooth_noise(rng, (S, S), S / r * cells)
        n += 0.5 * _smooth_noise(rng, (S, S), 2.5 * S / r * cells)
        fld = rough * n - d2
        fld[~self._interior] = -1e9
        k = max(MIN_DEFECT_PIXELS, min(int(area * S * S), int(self._interior.sum()) - 1))
        thr = float(np.partition(fld.ravel(), -k)[-k])
        edge = 2.0 / r  # field change over ~1 px near the rim
        cover = np.clip((fld - thr) / edge + 0.5, 0.0, 1.0).astype(F32)
        depth = np.clip((fld - thr) / (0.35 + rough * 0.3), 0.0, 1.0).astype(F32)
        return cover, depth

    def _stain(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        cover, depth = self._blob(rng, float(rng.uniform(0.01, 0.045)), 0.35, 0.6)
        colors = ((0.62, 0.46, 0.14), (0.88, 0.88, 0.82), (0.13, 0.10, 0.06), (0.45, 0.32, 0.20))
        color = colors[int(rng.integers(0, len(colors)))]
        opacity = float(rng.uniform(0.35, 0.6))
        alpha = cover * opacity * (1.0 - 0.4 * depth)  # darker rim, like a dried drop
        return self._overlay(alpha, color), cover

    def _contamination(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        S = self.image_size
        cover, depth = self._blob(rng, float(rng.uniform(0.06, 0.22)), 0.9, 0.9)
        colors = (
            (0.22, 0.42, 0.85),  # blue glue / plastic
            (0.92, 0.55, 0.12),  # kapton tape
            (0.72, 0.70, 0.66),  # dust
            (0.82, 0.22, 0.32),  # red sealant
            (0.90, 0.86, 0.55),  # yellowish adhesive
            (0.20, 0.17, 0.15),  # grease
        )
        color = np.array(colors[int(rng.integers(0, len(colors)))], F32)
        alpha = cover * float(rng.uniform(0.78, 0.95))
        box = _bbox(alpha)
        h, w = depth[box].shape
        tex = 0.12 * _smooth_noise(rng, (h, w), 24 * max(h, w) / S + 1)
        tex += 0.05 * rng.standard_normal((h, w), dtype=F32)
        tex += 1.0
        tex *= 0.9 + 0.1 * depth[box]
        return self._overlay(alpha, color * tex[..., None], box), cover


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class SynthSpec:
    """What :func:`generate_dataset` writes (recorded in ``<product>/synth.json``)."""

    image_size: int = 256
    n_train: int = 200
    n_test_good: int = 40
    n_test_per_defect: int = 12
    defect_types: tuple[str, ...] = DEFECT_TYPES
    seed: int = 0


def _check_spec(spec: SynthSpec) -> None:
    _check_image_size(spec.image_size)
    _check_int("n_train", spec.n_train, 1)
    _check_int("n_test_good", spec.n_test_good, 0)
    _check_int("n_test_per_defect", spec.n_test_per_defect, 0)
    _check_int("seed", spec.seed, 0)
    if spec.n_train > TEST_INDEX_OFFSET:
        raise DatasetError(f"n_train must be at most {TEST_INDEX_OFFSET}, got {spec.n_train}")
    if isinstance(spec.defect_types, str):
        raise DatasetError("defect_types must be a sequence of names, not a string")
    for d in spec.defect_types:
        _check_defect(d)
    if len(set(spec.defect_types)) != len(spec.defect_types):
        raise DatasetError(f"duplicate defect types in {list(spec.defect_types)}")


def _frame_plan(spec: SynthSpec) -> list[tuple[str, str | None, int, int]]:
    """``(folder, defect, file number, frame index)`` for every image, in writing order.
    Training frames are ``0 .. n_train-1``; every test frame has its own index from
    ``TEST_INDEX_OFFSET`` on, so no test image shares a frame with any other image."""
    plan: list[tuple[str, str | None, int, int]] = [
        ("train/good", None, i, i) for i in range(spec.n_train)
    ]
    nxt = TEST_INDEX_OFFSET
    for i in range(spec.n_test_good):
        plan.append(("test/good", None, i, nxt))
        nxt += 1
    for d in spec.defect_types:
        for i in range(spec.n_test_per_defect):
            plan.append((f"test/{d}", d, i, nxt))
            nxt += 1
    return plan


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, compress_level=3)


def generate_dataset(
    product: str,
    out_root: str | Path,
    spec: SynthSpec = SynthSpec(),
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write out_root/product/ in MVTec layout and return that directory.

    ``train/good/000.png ...``, ``test/good/*.png``, ``test/<defect>/*.png``,
    ``ground_truth/<defect>/<nnn>_mask.png`` (single channel, 0/255) and ``synth.json``
    (product, spec, frame indices). Images are written to a temporary folder beside the
    target and moved into place at the end, so an interrupted run leaves no half product.
    ``progress(done, total)`` is called after each image.
    """
    _check_product(product)
    _check_spec(spec)
    root = Path(out_root).expanduser()
    target = root / product
    if target.exists() and not target.is_dir():
        raise DatasetError(f"{target} exists and is not a folder; remove it or choose --out")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise DatasetError(
            f"{target} already exists and is not empty; pass overwrite=True (--overwrite) "
            "to replace it"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create {root}: {exc.strerror or exc}") from exc

    synth = SyntheticProduct(product, spec.image_size, spec.seed)
    plan = _frame_plan(spec)
    total = len(plan)
    width = max(3, len(str(max(spec.n_train, spec.n_test_good, spec.n_test_per_defect, 1) - 1)))
    tmp = Path(tempfile.mkdtemp(prefix=f".{product}.partial-", dir=root))
    try:
        ranges: dict[str, list[int]] = {}
        for done, (folder, defect, number, index) in enumerate(plan, start=1):
            image, mask = synth.render(index, defect)
            out_dir = tmp / folder
            out_dir.mkdir(parents=True, exist_ok=True)
            name = f"{number:0{width}d}"
            _save_png(out_dir / f"{name}.png", image)
            if defect is not None:
                gt_dir = tmp / "ground_truth" / defect
                gt_dir.mkdir(parents=True, exist_ok=True)
                _save_png(gt_dir / f"{name}_mask.png", mask)
            span = ranges.setdefault(folder, [index, index + 1])
            span[1] = index + 1
            if progress is not None:
                progress(done, total)
        info = {
            "generator": __name__,
            "format_version": _FORMAT_VERSION,
            "product": product,
            "layout_seed": synth.layout_seed,
            "spec": {**asdict(spec), "defect_types": list(spec.defect_types)},
            "frame_indices": ranges,  # folder -> [first, end) of render() indices, in file order
        }
        (tmp / SYNTH_JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if target.is_dir():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_synth_json(product_dir: str | Path) -> tuple[str, SynthSpec]:
    """``(product, spec)`` recorded by :func:`generate_dataset`, to regenerate a product."""
    path = Path(product_dir) / SYNTH_JSON
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        spec = info["spec"]
        return str(info["product"]), SynthSpec(
            image_size=int(spec["image_size"]),
            n_train=int(spec["n_train"]),
            n_test_good=int(spec["n_test_good"]),
            n_test_per_defect=int(spec["n_test_per_defect"]),
            defect_types=tuple(spec["defect_types"]),
            seed=int(spec["seed"]),
        )
    except FileNotFoundError as exc:
        raise DatasetError(f"{path} not found: not a synthetic product folder") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is not a valid {SYNTH_JSON}: {exc}") from exc


def preview_grid(
    product: str = "synth-pcb", image_size: int = 256, seed: int = 0, n_normal: int = 3
) -> np.ndarray:
    """One RGB image: ``n_normal`` normal frames, then one frame per defect type with its
    mask outlined in magenta (for eyeballing the generator)."""
    synth = SyntheticProduct(product, image_size, seed)
    tiles = [synth.render(i)[0] for i in range(n_normal)]
    for k, d in enumerate(DEFECT_TYPES):
        image, mask = synth.render(TEST_INDEX_OFFSET + k, d)
        image = image.copy()
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(image, contours, -1, (255, 0, 255), 1)
        cv2.putText(image, d, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        tiles.append(image)
    cols = 4
    rows = -(-len(tiles) // cols)
    S, gap = image_size, 4
    grid = np.full((rows * (S + gap) - gap, cols * (S + gap) - gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * (S + gap) : r * (S + gap) + S, c * (S + gap) : c * (S + gap) + S] = tile
    return grid
