"""Training progress out of Ray Train workers: to the driver's progress bars and to MLflow.

Training code only knows :class:`~edge_ad.d3ad.observer.FitObserver`. In a Ray Train job the
rank-0 worker gets a :class:`RelayObserver`, which forwards every event to a small
:class:`ProgressRelay` actor; the driver drains that actor a few times a second and replays the
events onto its own observer (the rich bars of ``edge-ad train``). Remote calls from one caller
to one actor run in order, so the driver sees the events in the order they happened.
:class:`TrackingObserver` logs per-epoch losses to the run's MLflow run as they happen.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import ray

from edge_ad.d3ad.observer import FitObserver

if TYPE_CHECKING:
    from edge_ad.registry import RunTracker


@ray.remote(num_cpus=0)
class ProgressRelay:
    """A mailbox of observer events: workers ``put``, the driver ``drain``s."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def put(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.events.append((method, args, kwargs))

    def drain(self) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
        events, self.events = self.events, []
        return events


class RelayObserver(FitObserver):
    """Worker side: every observer call becomes a fire-and-forget message to the relay."""

    def __init__(self, relay: ray.actor.ActorHandle) -> None:
        self.relay = relay

    def _send(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.relay.put.remote(method, args, kwargs)

    def stage_start(self, stage: str, total: int) -> None:
        self._send("stage_start", stage, total)

    def advance(self, stage: str, n: int = 1, **metrics: float) -> None:
        self._send("advance", stage, n, **metrics)

    def epoch_end(self, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        self._send("epoch_end", stage, epoch, metrics)

    def stage_end(self, stage: str, metrics: dict[str, float]) -> None:
        self._send("stage_end", stage, metrics)


class RelayPump:
    """Driver side: a thread that replays the relay's events onto ``observer`` until stopped."""

    def __init__(self, relay: ray.actor.ActorHandle, observer: FitObserver, every_s: float = 0.3):
        self.relay, self.observer, self.every_s = relay, observer, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RelayPump:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._replay()  # what arrived after the last poll

    def _replay(self) -> None:
        try:
            events = ray.get(self.relay.drain.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            return  # progress display only: never fail training over it
        for method, args, kwargs in events:
            getattr(self.observer, method)(*args, **kwargs)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._replay()


class TrackingObserver(FitObserver):
    """Logs each epoch's mean losses (step = epoch) and each stage's summary to MLflow."""

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker
        self._per_epoch: set[str] = set()

    def epoch_end(self, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=epoch)
        self._per_epoch |= set(metrics)

    def stage_end(self, stage: str, metrics: dict[str, float]) -> None:
        # Final losses are already the last point of their per-epoch curve.
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k not in self._per_epoch})
