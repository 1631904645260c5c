"""The tiers of one store, fastest first, and everything done across them.

Every store is a view over one ``TierStack``: ``KVStore`` (tensor chunks under prefix hashes),
``BlobStore`` (verified opaque objects, what the daemon serves) and through it ``PageStore``
(engine-named pages). The stack builds the tiers (only through ``tiers/registry.py``) and their
writer threads, finds the tier holding each key, writes new objects down the tiers, promotes
hits and demotes evictions, pins within each tier's cap, and counts. The views only decide what
a key is and what a valid object is.

Data moves between tiers in whichever form it is at hand: a tensor (a memory tier's slot, or a
decoded object) or an encoded object. A tier that needs the other form gets it converted here,
never in a view. An opaque stack (``spec=None``, the daemon's) never decodes or re-encodes: it
moves objects as they came.

Blocking: lookups, ``write`` to the first tier and promotion into memory tiers run on the
caller's thread; writes to slower tiers go through each tier's bounded queue (``queue_full``
decides between waiting up to ``put_timeout_s`` and dropping, both counted).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from kvstore.agents import Turnover
from kvstore.config import StoreConfig
from kvstore.errors import ConfigError, CorruptObjectError
from kvstore.objects import ObjectMeta, decode_payload, encode_object, join_parts, read_meta, recode
from kvstore.pins import PinRegistry, check_pin_budget
from kvstore.stats import Counters
from kvstore.tiers.base import BlobTier, MemoryTierBase, Tier, TierContext
from kvstore.tiers.registry import build_tier
from kvstore.wire import parts_nbytes
from kvstore.writer import PendingWrite, TierWriter, WriteAcks

if TYPE_CHECKING:  # the daemon's opaque stack never loads torch
    import torch

    from kvstore.spec import KVSpec

log = logging.getLogger(__name__)

Blob = Any  # bytes | bytearray | memoryview
T = TypeVar("T")


def rekey(meta: ObjectMeta, key: bytes) -> ObjectMeta:
    """The meta under which a tier stores an object: the daemon stores an engine's object
    (whose header names the engine's chunk key) under a tenant-scoped key."""
    return meta if meta.key == key else dataclasses.replace(meta, key=key)


class TierStack:
    def __init__(self, config: StoreConfig, *, namespace: bytes, spec: KVSpec | None = None,
                 allow_remote: bool = True, on_drop: Callable[[bytes], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.opaque = spec is None
        self.counters = Counters()
        self.pins = PinRegistry(clock)  # a replay (bench/agents.py) runs pins on simulated time
        self.tiers: list[Tier] = []
        self.writers: dict[str, TierWriter] = {}
        self.turnover: Turnover | None = None
        self._on_drop = on_drop
        self._stop = threading.Event()
        self._said: set[tuple[str, str]] = set()
        if self.opaque:
            _check_opaque_codecs(config)
        context = TierContext(spec, config.chunk_size, self.counters, self.pins, namespace, self._on_evict,
                              self._on_lost)
        try:
            for tc in config.tiers.values():
                if tc.kind == "remote" and not allow_remote:  # a daemon in front of a daemon could loop
                    raise ConfigError("the daemon cannot have a remote tier (it stores bytes for many engines)")
                self.tiers.append(build_tier(tc, context))
            first = self.tiers[0] if self.tiers else None
            # How fast new objects turn the fastest tier over (agent sessions' pause limit).
            self.turnover = (Turnover(int(first.config.capacity), clock) if first is not None and first.config.capacity
                             and (first.is_memory or first.is_memory_blob) else None)
            if first is not None and first.is_memory_blob:  # reads land where a promotion keeps them
                for tier in self.tiers[1:]:
                    if isinstance(tier, BlobTier):
                        tier.read_buffers = functools.partial(first.allocate, fresh=False)
            # Default byte bound of each write queue: 1/16 of the memory budget (at least 16 MiB).
            memory = sum(t.config.capacity or 0 for t in self.tiers if t.config.is_memory)
            default_bytes = max(16 << 20, memory // 16) if memory else None
            for tier in self.tiers[1:]:
                if isinstance(tier, BlobTier):
                    self.writers[tier.name] = TierWriter(tier, self.counters, tier.config.queue_size,
                                                         config.queue_full == "block", config.put_timeout_s,
                                                         tier.config.queue_bytes or default_bytes)
        except BaseException:
            self.close()
            raise
        self._sweeper = threading.Thread(target=self._sweep_loop, name="kvstore-pin-sweeper", daemon=True)
        self._sweeper.start()

    def guarded(self, tier: Tier, what: str, call: Callable[[], T], fallback: T) -> T:
        """A read-side tier call that must not reach the engine: a tier that raises (a bug, a
        backend that fails in a way it did not catch) answers ``fallback``, a miss, counted as
        ``read_errors`` and logged once per tier and call."""
        try:
            return call()
        except Exception as exc:
            self.counters.tier(tier.name, "read_errors")
            if self._first(tier, what):
                log.warning("tier %s: %s raised %r; treated as a miss (counted as read_errors, said once)",
                            tier.name, what, exc)
            return fallback

    def _first(self, tier: Tier, what: str) -> bool:
        """True the first time ``what`` happens in ``tier``: what is said once, and counted after."""
        key = (tier.name, what)
        if key in self._said:
            return False
        self._said.add(key)
        return True

    def guarded_write(self, tier: Tier, call: Callable[[], bool]) -> bool:
        """A write in the caller's thread (the first tier is one of serialized objects): a
        tier that raises did not take the object, counted as ``write_errors`` and logged once,
        never an exception in the engine's put."""
        try:
            return call()
        except Exception as exc:
            self.counters.tier(tier.name, "write_errors")
            if self._first(tier, "put_blobs"):
                log.warning("tier %s: put_blobs raised %r; the object was not stored (counted as write_errors, "
                            "said once)", tier.name, exc)
            return False

    # ---- where things are ----------------------------------------------------------------

    def contains(self, tier: Tier, keys: Sequence[bytes]) -> list[bool]:
        return self.guarded(tier, "contains", lambda: tier.contains(keys), [False] * len(keys))

    def holders(self, keys: Sequence[bytes]) -> list[int | None]:
        """Per key, the position of the fastest tier holding it (None: no tier does), asked
        one batched call per tier, fastest first, for the keys still unplaced."""
        where: list[int | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for pos, tier in enumerate(self.tiers):
            if not todo:
                break
            for i, hit in zip(todo, self.contains(tier, [keys[i] for i in todo])):
                if hit:
                    where[i] = pos
            todo = [i for i in todo if where[i] is None]
        return where

    def writes_without_waiting(self, nbytes: int, objects: int = 1) -> bool:
        """Whether writing ``objects`` new objects of ``nbytes`` in all would finish without
        waiting on I/O: the first tier is in process memory, no tier is remote (its index is a
        round trip away), and every writer has room for the write-through copies plus demotions
        of what they evict (taken as twice as much again, in bytes and in items). A snapshot: a
        concurrent write can still fill a queue first, and then this write waits as any would
        (up to the tier's put budget)."""
        if not self.tiers or not self.tiers[0].is_memory_blob or any(t.is_remote for t in self.tiers):
            return False
        return all(w.has_room(3 * nbytes, items=3 * objects + 1) for w in self.writers.values())

    def durable_tiers(self) -> list[Tier]:
        """The tiers that keep objects when this process dies (disk) and that every new object
        reaches: the first tier, or one written through."""
        return [t for i, t in enumerate(self.tiers) if t.is_durable and (
            i == 0 or (t.config.write == "through" and t.name in self.writers))]

    def rewrite_durable(self, meta: ObjectMeta, parts: list[Blob], acks: WriteAcks) -> None:
        """Queue an object again for every durable tier below the first that lacks it (an
        earlier write of it failed, or was dropped); each write reports to ``acks``."""
        for tier in self.durable_tiers():
            if tier is not self.tiers[0] and not self.contains(tier, [meta.key])[0]:
                item = self._pending(tier, meta, None, join_parts(parts))
                item.on_written = acks.expect(meta.key)
                self.writers[tier.name].submit(item)

    def held_locally(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether an in-process or on-disk tier holds each key (remote tiers dedupe in their
        writer, so a put does not pay a round trip to ask)."""
        present = [False] * len(keys)
        for tier in self.tiers:
            if not tier.is_remote:
                present = [p or hit for p, hit in zip(present, self.contains(tier, keys))]
        return present

    def touch(self, keys: Sequence[bytes]) -> None:
        """Mark keys most recently used in every local tier, the last key most recent."""
        for tier in self.tiers:
            if not tier.is_remote:
                self.guarded(tier, "touch", lambda t=tier: t.touch(keys), None)

    def hit(self, pos: int, tokens: int) -> None:
        self.counters.tier(self.tiers[pos].name, "hits")
        self.counters.tier(self.tiers[pos].name, "hit_tokens", tokens)

    def reject(self, pos: int, key: bytes, why: object) -> None:
        """An object in tier ``pos`` failed verification or belongs elsewhere: a miss there, a
        ``corrupt`` count (the first said in the log), and the object is deleted from that tier."""
        tier = self.tiers[pos]
        # The first with its reason; later ones are counted (a failing disk rejects thousands).
        first = self._first(tier, "reject")
        log.log(logging.WARNING if first else logging.DEBUG, "tier %s: object %s rejected: %s%s", tier.name,
                key.hex(), why, " (each counted as corrupt; said once)" if first else "")
        self.counters.tier(tier.name, "corrupt")
        self.guarded(tier, "delete", lambda: tier.delete([key]), 0)
        self._on_lost(key)

    # ---- moving data between tiers -------------------------------------------------------

    @staticmethod
    def _tensor(meta: ObjectMeta, blob: Blob) -> torch.Tensor:
        return decode_payload(meta, read_meta(blob)[1])

    def _recode(self, tier: Tier, meta: ObjectMeta) -> str | None:
        """In an opaque stack, the byte codec a tier with a codec wants the object in (``raw``, the
        default, keeps objects as they came); lossy codecs are refused for such tiers at start."""
        codec = tier.config.codec
        return codec if self.opaque and codec not in ("raw", meta.codec) else None

    def _as_encoded(self, tier: Tier, meta: ObjectMeta) -> bool:
        """Whether ``tier`` takes the object's encoded bytes as they are (an opaque stack never
        re-encodes; otherwise only a tier configured with the object's codec)."""
        return self.opaque or tier.config.codec == meta.codec

    def _pending(self, tier: Tier, meta: ObjectMeta, kv: torch.Tensor | None, blob: Blob | None) -> PendingWrite:
        """A write for a slower tier that owns its data (the caller's buffers are reused)."""
        if blob is not None and self._as_encoded(tier, meta):
            return PendingWrite(meta, blob=[bytes(blob)], recode=self._recode(tier, meta))
        if kv is None:
            kv = self._tensor(meta, blob)  # another codec: decoded here, encoded by the writer
            return PendingWrite(meta, kv)
        return PendingWrite(meta, kv.detach().to("cpu", copy=True))

    def copy_into(self, pos: int, meta: ObjectMeta, kv: torch.Tensor | None = None,
                  blob: Blob | None = None, promotion: bool = False) -> bool:
        """Put one object into tier ``pos`` (a promotion or a demotion), from a tensor or an
        encoded object, whichever the tier can take; queued for tiers with a writer. True if it
        was stored or queued. Never raises: a corrupt source is counted and skipped."""
        tier = self.tiers[pos]
        try:
            if isinstance(tier, MemoryTierBase):
                return tier.put(meta, kv if kv is not None else self._tensor(meta, blob)) is not None
            writer = self.writers.get(tier.name)
            if writer is not None:
                return writer.submit(self._pending(tier, meta, kv, blob))
            assert isinstance(tier, BlobTier)
            if blob is not None and self._as_encoded(tier, meta):
                codec = self._recode(tier, meta)
                if promotion and not codec:
                    return tier.promote_blob(meta, blob)
                parts = recode(blob, codec) if codec else [blob]
            else:
                parts = encode_object(meta, kv if kv is not None else self._tensor(meta, blob), tier.config.codec)
            return tier.put_blobs([(meta, parts)]) > 0
        except CorruptObjectError as exc:
            log.warning("object %s not copied into tier %s: %s", meta.key.hex(), tier.name, exc)
            return False

    def promote(self, pos: int, meta: ObjectMeta, kv: torch.Tensor | None = None, blob: Blob | None = None) -> None:
        """A hit in tier ``pos``: copy it into every faster tier that lacks it."""
        if not self.config.promote:
            return
        for faster in range(pos):
            tier = self.tiers[faster]
            if self.contains(tier, [meta.key])[0]:
                continue
            if self.copy_into(faster, meta, kv, blob, promotion=True):
                self.counters.tier(tier.name, "promotions")

    def _on_lost(self, key: bytes, gone_from: Tier | None = None) -> None:
        """An object left a tier (found gone, rejected, or evicted without a demotion: then
        ``gone_from``, which still holds it during the call): if no other local tier holds it, it
        left the store."""
        if self._on_drop is not None and not any(
                self.contains(t, [key])[0] for t in self.tiers if t is not gone_from and not t.is_remote):
            self._on_drop(key)

    def _on_evict(self, tier: Tier, key: bytes, fetch: Callable[[], Any]) -> None:
        """Demote an object a tier is dropping to the next tier down that lacks it."""
        pos = self.tiers.index(tier)
        demoted = False
        for lower in range(pos + 1, len(self.tiers)):
            if self.tiers[lower].contains([key])[0]:
                demoted = True  # already there: nothing to copy
                break
            data = fetch()
            if data is None:
                break
            if isinstance(data, tuple):  # a memory tier's (slot view, meta): the slot is reused next
                view, meta = data
                demoted = self.copy_into(lower, meta, kv=view)
            else:
                try:
                    meta = rekey(read_meta(data)[0], key)
                except CorruptObjectError:
                    self.counters.tier(tier.name, "corrupt")
                    break
                demoted = self.copy_into(lower, meta, blob=data)
            if demoted:
                self.counters.tier(tier.name, "demotions")
            break
        if not demoted:
            self._on_lost(key, gone_from=tier)

    # ---- writing new objects -------------------------------------------------------------

    def write(self, meta: ObjectMeta, kv: torch.Tensor | None = None, parts: list[Blob] | None = None, *,
              keep_parts: bool = False, through: bool = True, acks: WriteAcks | None = None) -> bool:
        """Store a new object: synchronously in the first tier, then (``through``) in every
        ``write: through`` tier, memory tiers at once and slower ones through their writers.
        Give the tensor ``kv``, the encoded object as byte ``parts``, or both. ``parts`` are the
        caller's memory unless ``keep_parts`` (one buffer the store may keep as it is): queued
        writes get a copy. True if some tier took it (stored, or queued for a writer). With
        ``acks``, every queued write to a durable tier reports its outcome there."""
        first = self.tiers[0]
        t0 = time.perf_counter()
        view: torch.Tensor | None = None
        if isinstance(first, MemoryTierBase):
            assert kv is not None, "a memory tier of tensors needs the tensor"
            slow = sum(1 for t in self.tiers[1:] if through and t.config.write == "through" and t.name in self.writers)
            view = first.put(meta, kv, hold=slow)
            if view is None and first.contains([meta.key])[0]:
                return True  # a concurrent put of the same object won the race
            took = view is not None
        else:
            assert isinstance(first, BlobTier)
            codec = self._recode(first, meta)
            if parts is None:
                parts = encode_object(meta, kv, first.config.codec)
            item = (meta, recode(join_parts(parts), codec) if codec else parts)
            took = self.guarded_write(first, lambda: first.put_blobs([item]) > 0)
        self.counters.tier(first.name, "write_seconds", time.perf_counter() - t0)
        if took and self.turnover is not None:
            self.turnover.add(kv.nbytes if view is not None and kv is not None else parts_nbytes(parts or []))
        if not through:
            return took
        return self._write_down(meta, kv, parts, view, took, keep_parts=keep_parts, acks=acks)

    def _write_down(self, meta: ObjectMeta, kv: torch.Tensor | None, parts: list[Blob] | None,
                    view: torch.Tensor | None, took: bool, *, keep_parts: bool = False,
                    acks: WriteAcks | None = None) -> bool:
        """The ``write: through`` tiers below the first, for an object the first tier has taken
        (``took``; ``view``: its leased slot there, when it is a memory tier of tensors)."""
        first = self.tiers[0]
        kept: list[Blob] | None = None
        owned: torch.Tensor | None = None
        for tier in self.tiers[1:]:
            if tier.config.write != "through":
                continue
            if isinstance(tier, MemoryTierBase):
                took = tier.put(meta, kv) is not None or took
                continue
            if view is not None:  # the writer reads the leased slot and releases its lease
                item = PendingWrite(meta, view, release=lambda k=meta.key: first.release(k))
            elif parts is not None and self._as_encoded(tier, meta):
                kept = kept or (list(parts) if keep_parts else [join_parts(parts)])
                item = PendingWrite(meta, blob=kept, recode=self._recode(tier, meta))
            else:
                assert kv is not None, "an object in another codec needs the tensor"
                owned = owned if owned is not None else kv.detach().to("cpu", copy=True).contiguous()
                item = PendingWrite(meta, owned)
            if acks is not None and tier.is_durable:
                item.on_written = acks.expect(meta.key)
            took = self.writers[tier.name].submit(item) or took
        return took

    def write_many(self, objects: Sequence[tuple[ObjectMeta, torch.Tensor]]) -> int:
        """``write`` for each (meta, kv), but a remote first tier takes them all in one call (one
        pipeline per Redis node, one request to a daemon) instead of a round trip per object.
        Returns how many some tier took: the remote tier answers a count for the whole batch,
        not which objects (a daemon with ``--ack disk`` counts only what its disk holds), so
        that count is taken as it is, never as "all of them" because it is not zero."""
        first = self.tiers[0]
        if len(objects) < 2 or not (isinstance(first, BlobTier) and first.is_remote):
            return sum(self.write(meta, kv=kv) for meta, kv in objects)
        t0 = time.perf_counter()
        encoded = [(meta, encode_object(meta, kv, first.config.codec)) for meta, kv in objects]
        took = int(self.guarded_write(first, lambda: first.put_blobs(encoded)))
        self.counters.tier(first.name, "write_seconds", time.perf_counter() - t0)
        below = sum(self._write_down(meta, kv, parts, None, False)  # what the tiers below took
                    for (meta, kv), (_meta, parts) in zip(objects, encoded))
        return min(len(objects), max(took, below))

    # ---- pins ----------------------------------------------------------------------------

    def pin(self, keys: Sequence[bytes], ttl_s: float, session: bool = False) -> None:
        """Pin keys for ``ttl_s``; raises PinLimitError, pinning nothing, past any tier's cap.
        ``session``: an agent session's pin (kept apart from callers' pins, see PinRegistry),
        which tiers that keep sessions themselves take as an event (``tool_started``) instead."""
        check_pin_budget(self.tiers, self.pins.active(), keys)
        self.pins.pin(keys, ttl_s, session)
        for tier in self.tiers:
            if isinstance(tier, BlobTier) and not (session and tier.keeps_sessions):
                tier.expire(keys, ttl_s)

    def tool_started(self, session: str, tool: str, keys: Sequence[bytes], ago_s: float) -> None:
        """Tell the tiers that keep agent sessions (blocking: one round trip each; never raises)."""
        for tier in self.tiers:
            if tier.keeps_sessions:
                tier.tool_started(session, tool, keys, ago_s)

    def tool_finished(self, session: str, ago_s: float) -> None:
        for tier in self.tiers:
            if tier.keeps_sessions:
                tier.tool_finished(session, ago_s)

    def unpin(self, keys: Sequence[bytes], session: bool = False) -> int:
        return self.pins.unpin(keys, session)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.config.pin_sweep_s):
            self.pins.sweep()

    # ---- housekeeping --------------------------------------------------------------------

    def delete(self, keys: Sequence[bytes]) -> int:
        self.flush()
        removed = [t.delete(keys) for t in self.tiers]
        self.pins.forget(keys)
        return max(removed) if removed else 0

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write has reached its tier."""
        return all(w.flush(timeout_s) for w in self.writers.values())

    def tier_stats(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(store-wide counters, per tier: counters plus what the tier holds)."""
        store, per_tier = self.counters.snapshot(t.name for t in self.tiers)
        tiers: dict[str, Any] = {}
        for tier in self.tiers:
            st = tier.stats()
            entry: dict[str, Any] = per_tier[tier.name]
            entry.update(objects=st.objects, bytes=st.bytes, capacity=st.capacity,
                         pinned_bytes=st.pinned_bytes, available=st.available)
            if tier.name in self.writers:
                entry["queued_writes"] = self.writers[tier.name].pending
            tiers[tier.name] = entry
        return store, tiers

    def clear(self) -> None:
        self.flush()
        self.pins.forget(self.pins.active())
        for tier in self.tiers:
            tier.clear()

    def close(self) -> None:
        self._stop.set()
        for writer in self.writers.values():
            writer.close()
        for tier in self.tiers:
            tier.close()


def _check_opaque_codecs(config: StoreConfig) -> None:
    """A store of opaque objects can only apply byte codecs: a lossy one would need torch and the
    model's tensors, and must be chosen by the engines, which then send objects already in it."""
    from kvstore.codecs import is_bytewise

    for tc in config.tiers.values():
        if not is_bytewise(tc.codec):
            raise ConfigError(f"tiers.{tc.kind}.codec {tc.codec!r} is lossy: the daemon stores engines' objects "
                              f"without decoding them, so it applies only lossless byte codecs (raw, lz4); set a "
                              f"lossy codec on the engines' tiers instead")


__all__ = ["TierStack", "rekey"]
