"""How training reports progress: a tiny observer interface with a no-op default.

The detector's stages call ``stage_start`` / ``advance`` / ``epoch_end`` / ``stage_end``; the CLI
plugs in a rich progress bar, Ray Train and MLflow plug in their own reporters. Training code
therefore never imports a UI or a tracking library.
"""

from __future__ import annotations


class FitObserver:
    """Receives training progress. Every method is optional to override."""

    def stage_start(self, stage: str, total: int) -> None:
        """A stage (``autoencoder``, ``unet``, ``adaptation``, ``knn``, ``calibration``) begins;
        ``total`` is the number of ``advance`` units it will report."""

    def advance(self, stage: str, n: int = 1, **metrics: float) -> None:
        """``n`` units of ``stage`` are done; ``metrics`` are the latest running values."""

    def epoch_end(self, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        """An epoch of a trained stage finished with these mean metrics."""

    def stage_end(self, stage: str, metrics: dict[str, float]) -> None:
        """The stage finished; ``metrics`` summarises it (final loss, seconds)."""


class ObserverGroup(FitObserver):
    """Forwards every call to several observers (e.g. a progress bar and MLflow)."""

    def __init__(self, *observers: FitObserver) -> None:
        self.observers = [o for o in observers if o is not None]

    def stage_start(self, stage: str, total: int) -> None:
        for o in self.observers:
            o.stage_start(stage, total)

    def advance(self, stage: str, n: int = 1, **metrics: float) -> None:
        for o in self.observers:
            o.advance(stage, n, **metrics)

    def epoch_end(self, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        for o in self.observers:
            o.epoch_end(stage, epoch, metrics)

    def stage_end(self, stage: str, metrics: dict[str, float]) -> None:
        for o in self.observers:
            o.stage_end(stage, metrics)


class HistoryObserver(FitObserver):
    """Keeps per-epoch metrics and stage summaries (for tests, reports and MLflow)."""

    def __init__(self) -> None:
        self.epochs: dict[str, list[dict[str, float]]] = {}
        self.stages: dict[str, dict[str, float]] = {}

    def epoch_end(self, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs.setdefault(stage, []).append(dict(metrics))

    def stage_end(self, stage: str, metrics: dict[str, float]) -> None:
        self.stages[stage] = dict(metrics)
