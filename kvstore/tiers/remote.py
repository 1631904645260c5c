"""The daemon as a tier: ``kvstore://host:port``, or several daemons that spread keys among them
(``kvstore://a:8765,b:8765``, see kvstore.spread). An embedded store sits in front of a shared
one (prefill engines put, decode engines get). Like Redis, an unreachable daemon means misses
and skipped writes for a back-off period, never an exception in the engine."""

from __future__ import annotations

import http.client
from typing import Any, Sequence

from kvstore.client import ServiceError
from kvstore.config import TierConfig
from kvstore.objects import ObjectMeta
from kvstore.spread import connect
from kvstore.tiers.backoff import Backoff, GuardedCalls
from kvstore.tiers.base import BlobTier, TierContext, TierStats
from kvstore.wire import parts_nbytes


class RemoteTier(GuardedCalls, BlobTier):
    is_remote = True
    keeps_sessions = True
    TRANSIENT = (OSError, http.client.HTTPException)
    ERRORS = (ServiceError,)

    def __init__(self, config: TierConfig, context: TierContext) -> None:
        super().__init__(config, context)
        # Several daemons: each has its own back-off inside the group; this tier's is for all down.
        self.client = connect(str(config.url), api_key=config.api_key, timeout_s=config.timeout_s, retries=0,
                              tls_ca=config.tls_ca)
        self._backoff = Backoff(f"daemon tier {config.url}")

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        return self._call(lambda: self.client.exists(keys), [False] * len(keys))

    def get_blobs(self, keys: Sequence[bytes]) -> list[Any]:
        if not keys:
            return []
        return self._call(lambda: self.client.get(keys), [None] * len(keys))

    def put_blobs(self, items: Sequence[tuple[ObjectMeta, list[bytes | memoryview]]]) -> int:
        if not items:
            return 0
        batch = [(meta.key, tuple(parts)) for meta, parts in items]  # sent part by part, never joined
        stored = self._call(lambda: self.client.put(batch), 0)
        if stored:
            self.counters.tier(self.name, "puts", stored)
            self.counters.tier(self.name, "put_bytes", sum(parts_nbytes(ps) for _k, ps in batch))
        return stored

    def expire(self, keys: Sequence[bytes], ttl_s: float) -> None:
        if keys:
            self._call(lambda: self.client.pin(keys, ttl_s), 0)

    def tool_started(self, session: str, tool: str, keys: Sequence[bytes], ago_s: float) -> None:
        self._call(lambda: self.client.tool_started(session, tool, keys, ago_s), 0.0)

    def tool_finished(self, session: str, ago_s: float) -> None:
        self._call(lambda: self.client.tool_finished(session, ago_s), None)

    def delete(self, keys: Sequence[bytes]) -> int:
        return self._call(lambda: self.client.delete(keys), 0) if keys else 0

    def clear(self) -> None:
        """Deletes nothing: the daemon is shared, and only an admin may clear it (kvstore CLI)."""

    def stats(self) -> TierStats:
        return TierStats(objects=None, bytes=None, capacity=None, pinned_bytes=0, available=self._backoff.available)

    def close(self) -> None:
        self.client.close()
