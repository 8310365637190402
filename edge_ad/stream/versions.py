"""Which model version scores a product's frames: the registry alias, looked up at most every
``ttl_s`` seconds.

The Serve ingress asks for every frame; the registry is asked once per product per ``ttl_s``.
When ``production`` moves, frames read after the next lookup carry the new version (and the
scorer loads it), while frames already in flight finish on the version they started with.

Product names come from frame headers, which anyone who can write to the topic fills. So the
cache holds at most ``max_products`` entries (least recently used dropped first), and with a
``known`` listing (one registry search per ``ttl_s`` for all products) a name the registry
does not hold is answered None without a lookup of its own.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection


class AliasWatcher:
    """Thread-safe, time-bounded cache of ``lookup(product) -> version | None``."""

    def __init__(
        self,
        lookup: Callable[[str], int | None],
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_products: int = 1024,
        known: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self._lookup = lookup
        self.ttl_s = ttl_s
        self._clock = clock
        self.max_products = max_products
        self._known = known
        self._known_at: tuple[float, Collection[str]] | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[float, int | None]] = OrderedDict()
        self._lookups: dict[str, threading.Lock] = {}

    def version(self, product: str) -> int | None:
        """The version holding the alias now (as of at most ``ttl_s`` ago); None if none does.

        Lookup errors propagate (the caller decides whether to retry) and are not cached.
        """
        hit = self._fresh(product)
        if hit is not None:
            return hit[1]
        if self._known is not None and product not in self._known_products():
            return None
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
                self._cache.move_to_end(product)
                while len(self._cache) > self.max_products:
                    dropped, _ = self._cache.popitem(last=False)
                    if dropped != product:
                        self._lookups.pop(dropped, None)
            return version

    def _known_products(self) -> Collection[str]:
        """The registry's products, listed at most once per ``ttl_s`` (errors propagate)."""
        assert self._known is not None
        with self._lock:
            listed = self._known_at
        if listed is None or self._clock() - listed[0] >= self.ttl_s:
            now = self._clock()
            listed = (now, self._known())
            with self._lock:
                self._known_at = listed
        return listed[1]

    def _fresh(self, product: str) -> tuple[float, int | None] | None:
        with self._lock:
            hit = self._cache.get(product)
            if hit is not None:
                self._cache.move_to_end(product)
        if hit is not None and self._clock() - hit[0] < self.ttl_s:
            return hit
        return None

    def forget(self, product: str | None = None) -> None:
        """Drop the cached answer for ``product`` (all products when None)."""
        with self._lock:
            if product is None:
                self._cache.clear()
                self._known_at = None
            else:
                self._cache.pop(product, None)
