"""Counting verdicts as they arrive: dedupe on frame_id, latency percentiles, and (when the
truth is known, as in the demo) how well the streamed verdicts separate defects from normals.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_ad.stream.schema import Verdict


@dataclass
class VerdictTally:
    """Running totals over distinct frames; ``truth`` maps frame_id → 1 (defect) / 0 (normal)."""

    truth: dict[str, int] = field(default_factory=dict)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    duplicates: int = 0

    def add(self, verdict: Verdict) -> bool:
        """Count ``verdict``; False (and counted as a duplicate) if its frame had one already."""
        if verdict.frame_id in self.verdicts:
            self.duplicates += 1
            return False
        self.verdicts[verdict.frame_id] = verdict
        return True

    @property
    def frames(self) -> int:
        return len(self.verdicts)

    @property
    def flagged(self) -> int:
        return sum(v.is_anomalous for v in self.verdicts.values())

    def latency_ms(self, quantile: float) -> float | None:
        if not self.verdicts:
            return None
        return float(np.quantile([v.latency_ms for v in self.verdicts.values()], quantile))

    def image_auroc(self) -> float | None:
        """AUROC of the streamed scores against the truth (None without both classes)."""
        from sklearn.metrics import roc_auc_score

        pairs = [(self.truth[i], v.score) for i, v in self.verdicts.items() if i in self.truth]
        labels = {label for label, _ in pairs}
        if labels != {0, 1}:
            return None
        y, s = zip(*pairs, strict=True)
        return float(roc_auc_score(y, s))

    def confusion(self) -> dict[str, int]:
        """True/false positives/negatives over the frames whose truth is known."""
        out = Counter(tp=0, fp=0, tn=0, fn=0)
        for frame_id, v in self.verdicts.items():
            label = self.truth.get(frame_id)
            if label is None or label < 0:
                continue
            key = ("t" if bool(label) == v.is_anomalous else "f") + ("p" if v.is_anomalous else "n")
            out[key] += 1
        return dict(out)

    def summary(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "duplicates": self.duplicates,
            "flagged_defective": self.flagged,
            "by_version": dict(Counter(v.model_version for v in self.verdicts.values())),
            "by_product": dict(Counter(v.product for v in self.verdicts.values())),
            "image_auroc": self.image_auroc(),
            "confusion": self.confusion() if self.truth else None,
            "p50_ms": self.latency_ms(0.5),
            "p99_ms": self.latency_ms(0.99),
        }
