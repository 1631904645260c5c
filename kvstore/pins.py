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
    """Two kinds of pin, kept apart so releasing one never releases the other: a caller's
    ``pin()`` and an agent session's (kvstore.agents), which its next turn releases."""

    def __init__(self, clock=time.monotonic) -> None:
        self._lock = threading.Lock()
        self._until: dict[bytes, float] = {}
        self._session_until: dict[bytes, float] = {}
        self._clock = clock

    def _of(self, session: bool) -> dict[bytes, float]:
        return self._session_until if session else self._until

    def pin(self, keys: Iterable[bytes], ttl_s: float, session: bool = False) -> None:
        """Pin (or extend) keys until now + ttl_s; an existing longer pin is kept."""
        until = self._clock() + ttl_s
        with self._lock:
            table = self._of(session)
            for key in keys:
                if table.get(key, 0.0) < until:
                    table[key] = until

    def unpin(self, keys: Iterable[bytes], session: bool = False) -> int:
        with self._lock:
            table = self._of(session)
            return sum(table.pop(key, None) is not None for key in keys)

    def forget(self, keys: Iterable[bytes]) -> None:
        """Both kinds of pin on keys that are gone (deleted, cleared)."""
        with self._lock:
            for key in keys:
                self._until.pop(key, None)
                self._session_until.pop(key, None)

    def is_pinned(self, key: bytes) -> bool:
        return self._live(self._until, key) or (bool(self._session_until) and self._live(self._session_until, key))

    def _live(self, table: dict[bytes, float], key: bytes) -> bool:
        until = table.get(key)  # dict reads are atomic under the GIL; no lock on the hot path
        if until is None:
            return False
        if until > self._clock():
            return True
        with self._lock:
            if table.get(key, 0.0) <= self._clock():
                table.pop(key, None)
        return False

    def remaining(self, key: bytes) -> float:
        until = max(self._until.get(key, 0.0), self._session_until.get(key, 0.0))
        return max(0.0, until - self._clock())

    def active(self) -> list[bytes]:
        now = self._clock()
        with self._lock:
            live = {k for k, u in self._until.items() if u > now}
            live.update(k for k, u in self._session_until.items() if u > now)
            return list(live)

    def sweep(self) -> int:
        now = self._clock()
        expired = 0
        with self._lock:
            for table in (self._until, self._session_until):
                gone = [k for k, u in table.items() if u <= now]
                for k in gone:
                    del table[k]
                expired += len(gone)
        return expired

    def __len__(self) -> int:
        return len(self._until.keys() | self._session_until.keys())


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
