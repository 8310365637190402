"""A small HTML page about a streamed run: the tally and example heatmaps from the verdicts.

The heatmaps are the thumbnails carried by the verdicts themselves (grey 0..255 = map value
0..2×threshold), drawn over the frame as it was sent, with the verdict's boxes: what a
consumer of the verdicts topic can show without the model.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from edge_ad.stream.schema import Verdict
from edge_ad.stream.scoring import heatmap_from_b64
from edge_ad.stream.tally import VerdictTally
from edge_ad.visualize import heatmap_overlay, side_by_side


def verdict_overlay(image: np.ndarray, verdict: Verdict) -> np.ndarray:
    """``image`` | the verdict's heatmap over it (the image twice when it carries none)."""
    if verdict.heatmap is None:
        return side_by_side(image, image)
    grey = heatmap_from_b64(verdict.heatmap).astype(np.float32)
    amap = cv2.resize(grey, (image.shape[1], image.shape[0])) / 255.0 * 2.0 * verdict.threshold
    return side_by_side(image, heatmap_overlay(image, amap, verdict.threshold, verdict.boxes))


def pick_examples(tally: VerdictTally, limit: int = 8) -> list[str]:
    """Frame ids worth a look: the highest-scoring flagged frames, then misses and false alarms
    (when the truth is known), then the most normal-looking frames."""
    by_score = sorted(tally.verdicts.values(), key=lambda v: -v.score)
    truth = tally.truth
    flagged = [v for v in by_score if v.is_anomalous and truth.get(v.frame_id, 1) == 1]
    missed = [v for v in by_score if not v.is_anomalous and truth.get(v.frame_id) == 1]
    false_alarms = [v for v in by_score if v.is_anomalous and truth.get(v.frame_id) == 0]
    normal = [v for v in reversed(by_score) if not v.is_anomalous]
    picked: list[str] = []
    for group, n in ((flagged, 4), (missed, 2), (false_alarms, 2), (normal, 2)):
        for v in group[:n]:
            if v.frame_id not in picked and len(picked) < limit:
                picked.append(v.frame_id)
    return picked


def write_stream_report(
    out_dir: Path,
    summary: dict[str, Any],
    tally: VerdictTally,
    images: dict[str, np.ndarray],
    kinds: dict[str, str] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (+ ``summary.json`` and ``heatmaps/*.png``); return it."""
    out_dir = Path(out_dir)
    heat_dir = out_dir / "heatmaps"
    heat_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    figures = []
    for frame_id in pick_examples(tally):
        verdict = tally.verdicts[frame_id]
        if frame_id not in images:
            continue
        name = f"{frame_id}.png"
        Image.fromarray(verdict_overlay(images[frame_id], verdict)).save(heat_dir / name)
        truth = (kinds or {}).get(frame_id, "unknown")
        call = "DEFECT" if verdict.is_anomalous else "ok"
        figures.append(
            f'<figure><img src="heatmaps/{html.escape(name)}" width="320">'
            f"<figcaption><b>{call}</b> score {verdict.score:.2f} / {verdict.threshold:.2f}, "
            f"T̂={verdict.timestep}, {len(verdict.boxes)} box(es) · truth: {html.escape(truth)}"
            f"<br><code>{html.escape(frame_id)}</code> · v{html.escape(verdict.model_version)}"
            "</figcaption></figure>"
        )
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_cell(v))}</td></tr>"
        for k, v in summary.items()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edge-ad stream report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
figure{{display:inline-block;margin:8px;width:330px;vertical-align:top}}
img{{image-rendering:pixelated}}</style></head><body>
<h1>edge-ad: streamed verdicts</h1>
<table>{rows}</table>
<h2>Examples (frame | heatmap from the verdict, boxes in red)</h2>
{"".join(figures) or "<p>no verdicts</p>"}
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    return "n/a" if value is None else str(value)
