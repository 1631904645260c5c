"""A tiered store of self-describing objects by key: what the daemon serves, and what holds the
pages of engines that name their own pages (kvstore.pagestore).

The daemon never sees a model spec or decodes a tensor; engines send objects already encoded
and checksummed (kvstore.objects). This store verifies them on the way in and out, keeps them in
memory -> disk -> (optional) Redis with the same writers, pins and eviction rules as KVStore,
and accounts bytes per owner (tenant) so the service can enforce quotas.

Known limit: owner accounting lives in memory. After a restart, objects found on disk are served
but count against no tenant until rewritten (a tenant-scoped key does not reveal its tenant).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from kvstore.buffers import unzeroed
from kvstore.config import StoreConfig, load_config
from kvstore.errors import ConfigError, CorruptObjectError, InvalidInputError
from kvstore.objects import NeedMore, ObjectMeta, check_meta, join_parts, parse_header, read_meta
from kvstore.pins import PinRegistry
from kvstore.stats import Counters
from kvstore.tiers.base import BlobTier
from kvstore.tiers.disk import DiskTier, ReadResult
from kvstore.wire import Blob, as_parts, parts_nbytes
from kvstore.writer import PendingWrite, TierWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredObject:
    storage_key: bytes   # where it lives (tenant-scoped by the caller)
    meta: ObjectMeta     # what it says about itself (meta.key is the engine's chunk key)
    # One buffer the store may keep as is (the daemon receives into memory it owns), or the
    # object's parts (header, payload) in memory the caller keeps: written synchronously to the
    # first tier and copied for anything kept (the memory tier joins them, queued writes get one
    # joined copy), so an engine can hand its page without copying it first.
    blob: Blob | tuple[Blob, ...]

    def parts(self) -> list[Blob]:
        return list(as_parts(self.blob))

    @property
    def nbytes(self) -> int:
        return parts_nbytes(as_parts(self.blob))


class QuotaExceededError(InvalidInputError):
    """A put would take an owner over its byte quota; nothing was stored or removed."""


class BlobStore:
    def __init__(self, config: Any = None, namespace: bytes = b"kvstore-daemon", *, allow_remote: bool = False) -> None:
        self.config: StoreConfig = load_config(config)
        self.counters = Counters()
        self.pins = PinRegistry()
        self.tiers: list[BlobTier] = []
        self._writers: dict[str, TierWriter] = {}
        self._lock = threading.Lock()
        self._owner: dict[bytes, tuple[str, int]] = {}
        self._usage: dict[str, int] = {}
        for kind, tc in self.config.tiers.items():
            if kind == "device":
                raise ConfigError("a byte store cannot have a device tier (it holds encoded objects, not tensors)")
            if kind == "remote" and not allow_remote:  # a daemon in front of a daemon could loop
                raise ConfigError("the daemon cannot have a remote tier (it stores bytes for many engines)")
            if kind == "cpu":
                from kvstore.tiers.memblob import MemoryBlobTier

                self.tiers.append(MemoryBlobTier(tc, self.counters, self.pins, self._on_evict))
            elif kind == "disk":
                self.tiers.append(DiskTier(tc, self.counters, self.pins, namespace, self._on_evict))
            elif kind == "redis":
                from kvstore.tiers.redis import RedisTier

                self.tiers.append(RedisTier(tc, self.counters, namespace, self.pins))
            else:
                from kvstore.tiers.remote import RemoteTier

                self.tiers.append(RemoteTier(tc, self.counters))
        for tier in self.tiers[1:]:
            self._writers[tier.name] = TierWriter(tier, self.counters, tier.config.queue_size,
                                                  self.config.queue_full == "block", self.config.put_timeout_s)

    # ---- reads ---------------------------------------------------------------------------

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return [pos is not None for pos in self._holders(keys)]

    def _holders(self, keys: Sequence[bytes]) -> list[int | None]:
        """Per key, the position of the highest tier holding it (None: no tier does)."""
        where: list[int | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for pos, tier in enumerate(self.tiers):
            if not todo:
                break
            for i, hit in zip(todo, tier.contains([keys[i] for i in todo])):
                if hit:
                    where[i] = pos
            todo = [i for i in todo if where[i] is None]
        return where

    def get(self, keys: Sequence[bytes], object_keys: Sequence[bytes],
            expect: Sequence[ObjectMeta] | None = None) -> list[bytes | memoryview | None]:
        """Verified objects (None for a miss or an object that failed verification). With
        ``expect``, an object must also match that meta (fingerprint, shape, dtype, tokens): one
        for another model or geometry is treated like a corrupt one, in the tier that held it."""
        out: list[bytes | memoryview | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for pos, tier in enumerate(self.tiers):
            if not todo:
                break
            blobs = tier.get_blobs([keys[i] for i in todo])
            for i, blob in zip(todo, blobs):
                if blob is None:
                    continue
                blob = memoryview(blob).cast("B")  # read-only from here on: no copy
                try:
                    # Process memory holds what was verified on the way in: check the header (key,
                    # lengths) but skip re-hashing the payload. Disk and Redis get the full check.
                    meta = parse_header(blob, blob.nbytes).meta if tier.is_memory_blob else read_meta(blob)[0]
                    if meta.key != object_keys[i]:
                        raise CorruptObjectError(f"object names key {meta.key.hex()}, stored as {object_keys[i].hex()}")
                    if expect is not None:
                        check_meta(meta, expect[i])
                except (CorruptObjectError, NeedMore) as exc:
                    log.warning("tier %s: object %s rejected: %s", tier.name, keys[i].hex(), exc)
                    self.counters.tier(tier.name, "corrupt")
                    tier.delete([keys[i]])
                    continue
                out[i] = blob
                self.counters.tier(tier.name, "hits")
                self.counters.tier(tier.name, "hit_tokens", meta.num_tokens)
                if pos and self.config.promote:
                    self.tiers[0].put_blobs([(_with_key(meta, keys[i]), [blob])])
            todo = [i for i in todo if out[i] is None]
        return out

    def read_into(self, keys: Sequence[bytes], expect: Sequence[ObjectMeta],
                  outs: Sequence[memoryview]) -> list[bool]:
        """Raw-codec payloads straight into the caller's memory where the holding tier can do it
        (disk: one read into ``out``, verified there), skipping the object buffer and its copy.
        False where it could not (absent, another codec, a tier without the ability, or a hit
        that a promotion should follow): the caller falls back to :meth:`get` for those."""
        done = [False] * len(keys)
        for i, pos in enumerate(self._holders(keys)):
            if pos is None or (pos and self.config.promote):
                continue
            tier = self.tiers[pos]
            if not isinstance(tier, DiskTier):
                continue
            status = tier.read_into(keys[i], expect[i], [outs[i]])
            if status is ReadResult.OK:
                done[i] = True
                self.counters.tier(tier.name, "hits")
                self.counters.tier(tier.name, "hit_tokens", expect[i].num_tokens)
            elif status is ReadResult.CORRUPT:
                log.warning("tier %s: object %s rejected: %s", tier.name, keys[i].hex(), tier.last_error)
                self.counters.tier(tier.name, "corrupt")
                tier.delete([keys[i]])
        return done

    # ---- writes --------------------------------------------------------------------------

    @staticmethod
    def verify(blob: bytes | memoryview, object_key: bytes) -> ObjectMeta:
        """Parse and check an incoming object; raises InvalidInputError naming the problem."""
        try:
            meta, _payload = read_meta(blob)
        except CorruptObjectError as exc:
            raise InvalidInputError(f"object for key {object_key.hex()} is not a valid kvstore object: {exc}") from None
        if meta.key != object_key:
            raise InvalidInputError(f"object names key {meta.key.hex()}, but was sent for {object_key.hex()}")
        return meta

    def allocate(self, nbytes: int) -> memoryview:
        """Writable memory to receive an object into before ``put`` (from the memory tier's
        pre-faulted arena when it has one): the put then keeps it without a copy."""
        return self.tiers[0].allocate(nbytes) if self.tiers else unzeroed(nbytes)

    def put(self, objects: Sequence[StoredObject], owner: str = "", quota: int | None = None) -> int:
        """Store objects not already present; returns how many were new. All or nothing on quota."""
        where = self._holders([o.storage_key for o in objects])
        new = [o for o, pos in zip(objects, where) if pos is None]
        size = sum(o.nbytes for o in new)
        with self._lock:
            used = self._usage.get(owner, 0)
            if quota is not None and used + size > quota:
                raise QuotaExceededError(
                    f"tenant {owner!r} quota exceeded: holds {used} bytes, this put adds {size}, quota is {quota}")
            for o in new:
                self._owner[o.storage_key] = (owner, o.nbytes)
            self._usage[owner] = used + size
        first = self.tiers[0]
        for o, pos in zip(objects, where):
            if pos == 0:
                continue
            # Also an object only a lower tier holds (after a restart, or demoted): the client
            # just showed it is hot, and its next GET then needs no disk read. The lower tiers
            # already hold it, so only new objects are written through.
            meta = _with_key(o.meta, o.storage_key)
            parts = o.parts()
            first.put_blobs([(meta, parts)])
            if pos is None:
                kept: list[bytes | memoryview] | None = None
                for tier in self.tiers[1:]:
                    if tier.config.write == "through":
                        kept = kept or (parts if len(parts) == 1 else [join_parts(parts)])
                        self._writers[tier.name].submit(PendingWrite(meta, blob=kept))
        return len(new)

    def _on_evict(self, tier: Any, key: bytes, fetch: Any) -> None:
        pos = self.tiers.index(tier)
        for lower in self.tiers[pos + 1:]:
            if lower.contains([key])[0]:
                return
            blob = fetch()
            if blob is None:
                break
            try:
                meta, _ = read_meta(blob)
            except CorruptObjectError:
                break
            if self._writers[lower.name].submit(PendingWrite(_with_key(meta, key), blob=[bytes(blob)])):
                self.counters.tier(tier.name, "demotions")
                return
            break
        if not any(t.contains([key])[0] for t in self.tiers if t is not tier and not t.is_remote):
            self._forget([key])

    def _forget(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for key in keys:
                owner = self._owner.pop(key, None)
                if owner is not None:
                    self._usage[owner[0]] = max(0, self._usage.get(owner[0], 0) - owner[1])

    # ---- control -------------------------------------------------------------------------

    def pin(self, keys: Sequence[bytes], ttl_s: float) -> int:
        present = [k for k, there in zip(keys, self.exists(keys)) if there]
        self.pins.pin(present, ttl_s)
        for tier in self.tiers:
            tier.expire(present, ttl_s)
        return len(present)

    def unpin(self, keys: Sequence[bytes]) -> int:
        return self.pins.unpin(keys)

    def delete(self, keys: Sequence[bytes]) -> int:
        self.flush()
        removed = [t.delete(keys) for t in self.tiers]
        self.pins.unpin(keys)
        self._forget(keys)
        return max(removed) if removed else 0

    def clear(self) -> None:
        self.flush()
        for tier in self.tiers:
            tier.clear()
        self.pins.unpin(self.pins.active())
        with self._lock:
            self._owner.clear()
            self._usage.clear()

    def usage(self, owner: str) -> int:
        return self._usage.get(owner, 0)

    def flush(self, timeout_s: float | None = None) -> bool:
        return all(w.flush(timeout_s) for w in self._writers.values())

    def stats(self) -> dict[str, Any]:
        _store, per_tier = self.counters.snapshot(t.name for t in self.tiers)
        tiers = {}
        for tier in self.tiers:
            st = tier.stats()
            tiers[tier.name] = {**per_tier[tier.name], "objects": st.objects, "bytes": st.bytes,
                                "capacity": st.capacity, "pinned_bytes": st.pinned_bytes, "available": st.available}
        return {"tiers": tiers, "pinned_objects": len(self.pins.active()), "tenants": dict(self._usage)}

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        for tier in self.tiers:
            tier.close()


def _with_key(meta: ObjectMeta, key: bytes) -> ObjectMeta:
    return ObjectMeta(key=key, fingerprint=meta.fingerprint, shape=meta.shape, dtype=meta.dtype,
                      num_tokens=meta.num_tokens, partial=meta.partial, codec=meta.codec)
