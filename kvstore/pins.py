"""Pins with TTL: which chunk keys must not be evicted, and until when.

Expiry is lazy (checked whenever a tier asks) plus a periodic sweep, so an expired pin stops
protecting its chunk at once even if the sweeper is late.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Sequence

from kvstore.errors import PinLimitError


class PinRegistry:
    def __init__(self, clock=time.monotonic) -> None:
        self._lock = threading.Lock()
        self._until: dict[bytes, float] = {}
        self._clock = clock

    def pin(self, keys: Iterable[bytes], ttl_s: float) -> None:
        """Pin (or extend) keys until now + ttl_s; an existing longer pin is kept."""
        until = self._clock() + ttl_s
        with self._lock:
            for key in keys:
                if self._until.get(key, 0.0) < until:
                    self._until[key] = until

    def unpin(self, keys: Iterable[bytes]) -> int:
        with self._lock:
            return sum(self._until.pop(key, None) is not None for key in keys)

    def is_pinned(self, key: bytes) -> bool:
        until = self._until.get(key)  # dict reads are atomic under the GIL; no lock on the hot path
        if until is None:
            return False
        if until > self._clock():
            return True
        with self._lock:
            if self._until.get(key, 0.0) <= self._clock():
                self._until.pop(key, None)
        return False

    def remaining(self, key: bytes) -> float:
        until = self._until.get(key)
        return 0.0 if until is None else max(0.0, until - self._clock())

    def active(self) -> list[bytes]:
        now = self._clock()
        with self._lock:
            return [k for k, u in self._until.items() if u > now]

    def sweep(self) -> int:
        now = self._clock()
        with self._lock:
            expired = [k for k, u in self._until.items() if u <= now]
            for k in expired:
                del self._until[k]
        return len(expired)

    def __len__(self) -> int:
        return len(self._until)


def check_pin_budget(tiers: Sequence[Any], active: Iterable[bytes], keys: Sequence[bytes]) -> None:
    """Raise PinLimitError, before anything is pinned, if pinning ``keys`` on top of the
    ``active`` pins would exceed any local tier's pinned-bytes cap (``pin_fraction``)."""
    active = set(active)
    fresh = [k for k in keys if k not in active]
    for tier in tiers:
        cap = tier.pin_capacity
        if cap is None or tier.is_remote:
            continue
        now = tier.pinned_bytes_of(list(active))
        extra = tier.pinned_bytes_of(fresh)
        if now + extra > cap:
            raise PinLimitError(
                f"pinning {len(fresh)} more chunks needs {extra} bytes in tier {tier.name!r}, which already "
                f"has {now} pinned bytes of its {cap}-byte pin cap (pin_fraction={tier.config.pin_fraction})")
