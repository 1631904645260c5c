"""Thread-safe counters, one set per tier plus store-wide ones.

Counter names are fixed here so that ``stats()``, the daemon's Prometheus export and the docs
all agree on one vocabulary.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Iterable

TIER_COUNTERS = (
    "hits",            # chunks served from this tier
    "hit_tokens",
    "puts",            # chunks written into this tier
    "put_bytes",
    "evictions",       # chunks removed to make room
    "demotions",       # evicted chunks copied to a slower tier that lacked them
    "promotions",      # chunks copied up into this tier after a hit below
    "corrupt",         # objects that failed verification (a miss, and removed)
    "dropped_writes",  # async writes dropped because the queue was full
    "write_errors",    # writes that failed (I/O error, Redis down)
    "read_errors",     # tier calls on the read side that raised (served as misses)
    "rejected",        # puts refused because everything left is pinned or in use
    "arena_misses",    # daemon memory tier: objects that got fresh memory, no arena hole was free
    "unavailable",     # operations skipped while the backend was down (Redis)
    "load_seconds",    # wall time spent fetching, verifying and copying hits out of this tier
    "write_seconds",   # wall time spent writing into this tier (sync for the first, async below)
)
STORE_COUNTERS = ("lookups", "lookup_tokens", "lookup_hit_tokens", "gets", "get_tokens", "get_hit_tokens",
                  "get_miss_tokens", "puts", "put_tokens", "put_new_chunks")
"""Store-wide: a miss belongs to the request, not to a tier (a chunk absent everywhere was
missed by all of them), so misses are counted here as tokens asked for and not served."""


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tier: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(TIER_COUNTERS, 0))
        self._store = dict.fromkeys(STORE_COUNTERS, 0)

    def tier(self, tier: str, name: str, amount: float = 1) -> None:
        """Count ``name`` for ``tier``; names beyond TIER_COUNTERS are a tier's own (a fault
        tier's ``injected_*``) and appear in its stats once counted."""
        with self._lock:
            counts = self._tier[tier]
            counts[name] = counts.get(name, 0) + amount

    def store(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._store[name] += amount

    def snapshot(self, tiers: Iterable[str] = ()) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
        """Store counters and per-tier counters; every tier named in ``tiers`` has every counter,
        zero where nothing was counted yet (an untouched tier still reports the full vocabulary)."""
        with self._lock:
            per_tier = {name: dict(self._tier[name]) for name in tiers}
            per_tier.update({k: dict(v) for k, v in self._tier.items() if k not in per_tier})
            return dict(self._store), per_tier
