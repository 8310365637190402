"""Which model version scores a product's frames: the registry alias, looked up at most every
``ttl_s`` seconds.

The Serve ingress asks for every frame; the registry is asked once per product per ``ttl_s``.
When ``production`` moves, frames read after the next lookup carry the new version (and the
scorer loads it), while frames already in flight finish on the version they started with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class AliasWatcher:
    """Thread-safe, time-bounded cache of ``lookup(product) -> version | None``."""

    def __init__(
        self,
        lookup: Callable[[str], int | None],
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, int | None]] = {}
        self._lookups: dict[str, threading.Lock] = {}

    def version(self, product: str) -> int | None:
        """The version holding the alias now (as of at most ``ttl_s`` ago); None if none does.

        Lookup errors propagate (the caller decides whether to retry) and are not cached.
        """
        hit = self._fresh(product)
        if hit is not None:
            return hit[1]
        with self._lock:
            product_lock = self._lookups.setdefault(product, threading.Lock())
        # One lookup per product at a time: when the entry expires, the frames that arrive
        # meanwhile wait for that lookup instead of each asking the registry.
        with product_lock:
            hit = self._fresh(product)
            if hit is not None:
                return hit[1]
            now = self._clock()
            version = self._lookup(product)
            with self._lock:
                self._cache[product] = (now, version)
            return version

    def _fresh(self, product: str) -> tuple[float, int | None] | None:
        with self._lock:
            hit = self._cache.get(product)
        if hit is not None and self._clock() - hit[0] < self.ttl_s:
            return hit
        return None

    def forget(self, product: str | None = None) -> None:
        """Drop the cached answer for ``product`` (all products when None)."""
        with self._lock:
            if product is None:
                self._cache.clear()
            else:
                self._cache.pop(product, None)
