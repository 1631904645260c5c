"""A byte budget of chunk tensors on one torch device (the ``device`` and ``cpu`` tiers).

One preallocated pool of fixed-size slots (one full chunk each): every full chunk of a model has
the same size, so a slot allocator has no fragmentation, and put/get never hit the system
allocator or page faults after warm-up. On CUDA machines the host pool is pinned so host<->device
copies can run without staging. Partial chunks use a whole slot; the budget counts slots.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from kvstore.buffers import PAGE
from kvstore.config import TierConfig
from kvstore.errors import ConfigError
from kvstore.objects import ObjectMeta
from kvstore.tiers.base import MemoryTierBase, TierContext, TierStats


@dataclass
class _Entry:
    slot: int
    meta: ObjectMeta
    refs: int = 0


class MemoryTier(MemoryTierBase):
    def __init__(self, config: TierConfig, context: TierContext) -> None:
        super().__init__(config, context)
        spec, chunk_size = context.spec, context.chunk_size
        assert spec is not None, "a tier of tensors needs the model's KVSpec"
        if config.kind == "device":
            self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        else:
            self.device = torch.device("cpu")
        self._cuda = self.device.type == "cuda"
        pin_host = self.device.type == "cpu" and torch.cuda.is_available()
        self.dtype = spec.dtype
        self.slot_numel = math.prod(spec.chunk_shape(chunk_size))
        self.slot_bytes = self.slot_numel * torch.empty((), dtype=spec.dtype).element_size()
        self.num_slots = int(config.capacity or 0) // self.slot_bytes
        if self.num_slots < 1:
            raise ConfigError(
                f"tiers.{config.kind}.capacity {config.capacity} bytes cannot hold one chunk of "
                f"{self.slot_bytes} bytes ({chunk_size} tokens x {spec.bytes_per_token} bytes/token)")
        # torch.empty does not touch the pages on CPU: the pool costs memory only as it fills.
        self._pool = torch.empty((self.num_slots, self.slot_numel), dtype=self.dtype, device=self.device,
                                 pin_memory=pin_host)
        if config.prealloc and self.device.type == "cpu" and not pin_host:
            # ``prealloc``: one write per page now, so no put waits on the kernel mapping its slot
            # (pinned and device memory is resident from the start anyway).
            self._pool.view(torch.uint8).view(-1)[::PAGE].zero_()
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # LRU first, MRU last
        self._pending: set[bytes] = set()
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._pins = context.pins
        self._on_evict = context.on_evict

    # ---- lookups -------------------------------------------------------------------------

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        entries = self._entries
        return [k in entries for k in keys]

    def acquire(self, key: bytes) -> tuple[torch.Tensor, ObjectMeta] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.refs += 1
            self._entries.move_to_end(key)
        return self._view(entry.slot, entry.meta.shape), entry.meta

    def release(self, key: bytes) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.refs > 0:
                entry.refs -= 1

    # ---- writes --------------------------------------------------------------------------

    def put(self, meta: ObjectMeta, src: torch.Tensor, hold: int = 0) -> torch.Tensor | None:
        key = meta.key
        with self._lock:
            if key in self._entries or key in self._pending:
                return None
            if self._pins.is_pinned(key) and not self._pin_room_locked(1):
                self.refuse("pinned chunks have reached the tier's pin cap (pin_fraction)")
                return None
            victim = self._take_slot_locked()
            if victim is None:
                self.refuse("every slot is pinned or being read")
                return None
            slot, old_key, old_meta = victim
            self._pending.add(key)
        try:
            if old_key is not None:
                # The victim left the index but its slot is still intact: demote before reuse.
                self.counters.tier(self.name, "evictions")
                if self._on_evict is not None:
                    view = self._view(slot, old_meta.shape)
                    self._on_evict(self, old_key, lambda: (view, old_meta))
            dst = self._view(slot, meta.shape)
            dst.copy_(src, non_blocking=self._cuda)
            if self._cuda or src.is_cuda:
                torch.cuda.current_stream(self.device if self._cuda else src.device).synchronize()
        except BaseException:
            with self._lock:
                self._pending.discard(key)
                self._free.append(slot)
            raise
        with self._lock:
            self._pending.discard(key)
            self._entries[key] = _Entry(slot, meta, refs=hold)
        self.counters.tier(self.name, "puts")
        self.counters.tier(self.name, "put_bytes", self.slot_bytes)
        return dst

    def touch(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            entries = self._entries
            for key in keys:
                if key in entries:
                    entries.move_to_end(key)

    def delete(self, keys: Sequence[bytes]) -> int:
        removed = 0
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.refs == 0:
                    del self._entries[key]
                    self._free.append(entry.slot)
                    removed += 1
        return removed

    def clear(self) -> None:
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.refs == 0]:
                self._free.append(self._entries.pop(key).slot)

    # ---- accounting ----------------------------------------------------------------------

    def stats(self) -> TierStats:
        with self._lock:
            n = len(self._entries)
        return TierStats(objects=n, bytes=n * self.slot_bytes, capacity=self.num_slots * self.slot_bytes,
                         pinned_bytes=self.pinned_bytes_of(self._pins.active()))

    def pinned_bytes_of(self, keys: Sequence[bytes]) -> int:
        entries = self._entries
        return sum(self.slot_bytes for k in keys if k in entries)

    @property
    def pin_capacity(self) -> int:
        return int(self.num_slots * self.config.pin_fraction) * self.slot_bytes

    # ---- internals -----------------------------------------------------------------------

    def _view(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._pool[slot, :math.prod(shape)].view(shape)

    def _pin_room_locked(self, extra_slots: int) -> bool:
        pinned = sum(1 for k in self._pins.active() if k in self._entries)
        return (pinned + extra_slots) * self.slot_bytes <= self.pin_capacity

    def _take_slot_locked(self) -> tuple[int, bytes | None, ObjectMeta | None] | None:
        if self._free:
            return self._free.pop(), None, None
        skipped: list[bytes] = []
        victim: tuple[int, bytes, ObjectMeta] | None = None
        for key, entry in self._entries.items():
            if entry.refs == 0 and not self._pins.is_pinned(key):
                victim = (entry.slot, key, entry.meta)
                break
            skipped.append(key)
        # Move pinned/leased entries out of the LRU head so the next scan does not revisit them.
        for key in skipped:
            self._entries.move_to_end(key)
        if victim is not None:
            del self._entries[victim[1]]
        return victim
