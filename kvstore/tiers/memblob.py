"""Serialized objects in process memory: the daemon's fast tier (it stores bytes, not tensors,
because it serves many models and never decodes what it holds)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

from kvstore.buffers import Arena, unzeroed
from kvstore.config import TierConfig
from kvstore.objects import ObjectMeta
from kvstore.tiers.base import BlobTier, TierContext, TierStats


class MemoryBlobTier(BlobTier):
    is_memory_blob = True

    def __init__(self, config: TierConfig, context: TierContext) -> None:
        super().__init__(config, context)
        self.capacity = int(config.capacity or 0)
        self._pins = context.pins
        self._on_evict = context.on_evict
        self._lock = threading.Lock()
        self._blobs: OrderedDict[bytes, memoryview] = OrderedDict()
        self._used = 0
        # Every object lives in the arena (pre-faulted with ``prealloc``, else mapped as it fills):
        # its memory is reused warm after an eviction, and the tier's memory is bounded. It also
        # holds objects on their way in (request bodies, disk reads to promote) and on their way
        # out (a GET still sending an evicted object), for which the cache gives up objects (see
        # allocate), so 1/64 above the budget is slack for size classes only.
        self.arena = Arena(self.capacity + self.capacity // 64, prefault=config.prealloc) if self.capacity else None

    def allocate(self, nbytes: int, *, fresh: bool = True) -> memoryview | None:
        """Writable memory for an object about to be put here (or read from a lower tier to be
        promoted): from the arena when a region is free, else fresh.

        When the arena is full, objects in flight hold it: bodies being received, evicted
        objects still being sent or queued for disk. Then the tier gives up cached objects, least
        recently used first, one at a time until a region frees (an evicted object's memory only
        returns once nobody reads it): the cache shrinks by what transfers hold, so cache plus
        transfers stay within the budget. At most ``max(4 x nbytes, capacity / 16)`` is evicted
        for one allocation, so a burst of transfers cannot empty the tier. Then fresh memory
        (counted as ``arena_misses``), or without ``fresh`` None: the daemon waits for a
        region."""
        if self.arena is not None and nbytes <= self.capacity:
            view = self.arena.allocate(nbytes)
            evicted, most = 0, max(4 * nbytes, self.capacity // 16)
            while view is None and evicted < most:
                with self._lock:  # what the put would evict anyway, then the oldest, one by one
                    victims = self._evict_lru(nbytes if not evicted else 0, at_least=1)
                if not victims:
                    break
                evicted += sum(v.nbytes for _, v in victims)
                self._report(victims)
                del victims  # the last references: their regions return to the arena (unless still read)
                view = self.arena.allocate(nbytes)
            if view is not None or not fresh:
                return view
            self.counters.tier(self.name, "arena_misses")
        # Beyond the arena (an object larger than the tier, or none free for a second): mapped
        # as it is written, so a peer that announces a huge body and sends little holds little.
        return unzeroed(nbytes, populate=False)

    def promote_blob(self, meta: ObjectMeta, blob: bytes | memoryview) -> bool:
        """A copy of an object a slower tier holds: declined when the arena has no free region
        (its regions are still being sent or written), since held beside the pre-faulted budget it
        would take the process past it."""
        view = memoryview(blob).cast("B")
        if self._outside_arena(view):
            view = self._into_arena(view)
            if view is None:
                return False
        return self.put_blobs([(meta, [view])]) > 0

    def _outside_arena(self, blob: memoryview) -> bool:
        return self.arena is not None and (not self.arena.owns(blob) or self.arena.region_bytes(blob) > 2 * blob.nbytes)

    def _into_arena(self, blob: memoryview) -> memoryview | None:
        region = self.allocate(blob.nbytes, fresh=False)
        if region is None:
            return None  # no free region: every one is still being sent or written
        region[:] = blob
        return region

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        blobs = self._blobs
        return [k in blobs for k in keys]

    def get_blobs(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        out: list[memoryview | None] = []
        with self._lock:
            for key in keys:
                blob = self._blobs.get(key)
                if blob is not None:
                    self._blobs.move_to_end(key)
                out.append(blob)
        return out

    def put_blobs(self, items: Sequence[tuple[ObjectMeta, list[bytes | memoryview]]]) -> int:
        written = 0
        for meta, parts in items:
            # A single part (bytes or a memoryview nobody writes to) is kept as is: no copy. With an
            # arena, an object from elsewhere (a body that missed the arena) or one of a batch body
            # (its view would keep the whole body's region from reuse until every object of the
            # batch is evicted) is copied into a region of its own when one is free.
            blob = memoryview(parts[0]).cast("B") if len(parts) == 1 else memoryview(b"".join(parts))
            if self._outside_arena(blob):
                blob = self._into_arena(blob) or blob
            size = blob.nbytes
            with self._lock:
                if meta.key in self._blobs:
                    continue
                if size > self.capacity:
                    self.refuse(f"an object is larger than the whole capacity ({self.capacity} bytes)")
                    continue
                victims = self._evict_lru(size)
                if self._used + size > self.capacity:
                    self.refuse("what is left is pinned or being read")
                    for key, old in victims:  # could not make room: put them back
                        self._blobs[key] = old
                        self._blobs.move_to_end(key, last=False)
                        self._used += old.nbytes
                    continue
                self._blobs[meta.key] = blob
                self._used += size
            self._report(victims)
            written += 1
            self.counters.tier(self.name, "puts")
            self.counters.tier(self.name, "put_bytes", size)
        return written

    def _evict_lru(self, room: int, at_least: int = 0) -> list[tuple[bytes, memoryview]]:
        """Pop unpinned objects, least recently used first, until ``room`` more bytes fit (and
        at least ``at_least`` objects). Caller holds the lock."""
        victims = []
        for key in list(self._blobs):
            if self._used + room <= self.capacity and len(victims) >= at_least:
                break
            if self._pins.is_pinned(key):
                continue
            old = self._blobs.pop(key)
            self._used -= old.nbytes
            victims.append((key, old))
        return victims

    def _report(self, victims: list[tuple[bytes, memoryview]]) -> None:
        """Count and demote evicted objects (outside the lock: demotion submits to a writer)."""
        for key, old in victims:
            self.counters.tier(self.name, "evictions")
            if self._on_evict is not None:
                self._on_evict(self, key, lambda b=old: b)

    def touch(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for key in keys:
                if key in self._blobs:
                    self._blobs.move_to_end(key)

    def delete(self, keys: Sequence[bytes]) -> int:
        removed = 0
        with self._lock:
            for key in keys:
                blob = self._blobs.pop(key, None)
                if blob is not None:
                    self._used -= blob.nbytes
                    removed += 1
        return removed

    def clear(self) -> None:
        with self._lock:
            self._blobs.clear()
            self._used = 0

    def size_of(self, key: bytes) -> int:
        blob = self._blobs.get(key)
        return 0 if blob is None else blob.nbytes

    def pinned_bytes_of(self, keys: Sequence[bytes]) -> int:
        return sum(self.size_of(k) for k in keys)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(objects=len(self._blobs), bytes=self._used, capacity=self.capacity,
                             pinned_bytes=self.pinned_bytes_of(self._pins.active()))
