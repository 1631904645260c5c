"""A tiered store of self-describing objects by key: what the daemon serves, and what holds the
pages of engines that name their own pages (kvstore.pagestore).

The daemon never sees a model spec or decodes a tensor; engines send objects already encoded
and checksummed (kvstore.objects). This store verifies them on the way in and out, keeps them in
memory -> disk -> (optional) Redis with the same writers, pins and eviction rules as KVStore,
and accounts bytes per owner (tenant) so the service can enforce quotas.

Owner accounting survives a restart through a journal (kvstore.owners) when the store is given
one (the daemon keeps it beside its disk tier).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kvstore.buffers import unzeroed
from kvstore.config import StoreConfig, load_config
from kvstore.errors import CorruptObjectError, InvalidInputError
from kvstore.objects import NeedMore, ObjectMeta, check_meta, parse_header, read_meta, tensor_nbytes
from kvstore.owners import OwnerLedger
from kvstore.tiers.base import BlobTier, ReadResult
from kvstore.tierstack import TierStack, rekey
from kvstore.wire import Blob, as_parts, parts_nbytes
from kvstore.writer import WriteAcks


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
    """Verified objects by key over a :class:`~kvstore.tierstack.TierStack` of byte tiers, with
    bytes accounted per owner. Opaque: it never decodes or re-encodes what it holds."""

    def __init__(self, config: Any = None, namespace: bytes = b"kvstore-daemon", *, allow_remote: bool = False,
                 owners_journal: str | None = None) -> None:
        self.config: StoreConfig = load_config(config)
        self.owners = OwnerLedger(owners_journal)
        self.stack = TierStack(self.config, namespace=namespace, allow_remote=allow_remote, on_drop=self._forget_one)
        self.tiers = self.stack.tiers
        self.counters = self.stack.counters
        self.pins = self.stack.pins
        try:
            self.owners.load(self.exists)
        except BaseException:
            self.stack.close()
            raise

    # ---- reads ---------------------------------------------------------------------------

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return [pos is not None for pos in self.stack.holders(keys)]

    def get(self, keys: Sequence[bytes], object_keys: Sequence[bytes],
            expect: Sequence[ObjectMeta] | None = None,
            abandoned: Callable[[], bool] | None = None) -> list[bytes | memoryview | None]:
        """Verified objects (None for a miss or an object that failed verification). With
        ``expect``, an object must also match that meta (fingerprint, shape, dtype, tokens): one
        for another model or geometry is treated like a corrupt one, in the tier that held it.

        ``abandoned`` (the daemon: the client hung up or the request timed out) is asked between
        objects read from a local disk, which has no timeout of its own: a hung disk then holds
        this thread for one object, not for a 64-object batch; the rest are misses."""
        out: list[bytes | memoryview | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for pos, tier in enumerate(self.tiers):
            if not todo:
                break
            assert isinstance(tier, BlobTier)
            want = [keys[i] for i in todo]
            if abandoned is not None and not tier.is_remote and not tier.is_memory_blob:
                blobs = self._read_unless(tier, want, abandoned)
            else:
                blobs = self.stack.guarded(tier, "get_blobs", lambda t=tier: t.get_blobs(want), [None] * len(want))
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
                    self.stack.reject(pos, keys[i], exc)
                    continue
                out[i] = blob
                self.stack.hit(pos, meta.num_tokens)
                self.stack.promote(pos, rekey(meta, keys[i]), blob=blob)
            todo = [i for i in todo if out[i] is None]
        return out

    def _read_unless(self, tier: BlobTier, keys: list[bytes],
                     abandoned: Callable[[], bool]) -> list[bytes | memoryview | None]:
        out: list[bytes | memoryview | None] = [None] * len(keys)
        for i, key in enumerate(keys):
            if abandoned():
                break
            out[i] = self.stack.guarded(tier, "get_blobs", lambda: tier.get_blobs([key])[0], None)
        return out

    def in_memory(self, keys: Sequence[bytes]) -> bool:
        """Whether the first tier holds every key in process memory: a get of them then does
        no I/O (and no hashing: the memory tier holds what was verified on the way in)."""
        first = self.tiers[0] if self.tiers else None
        return first is not None and first.is_memory_blob and all(first.contains(keys))

    def put_without_waiting(self, nbytes: int, objects: int = 1) -> bool:
        """Whether a put of ``objects`` objects of ``nbytes`` in all would finish without waiting
        on I/O (see TierStack.writes_without_waiting): the daemon then does it on its event loop."""
        return self.stack.writes_without_waiting(nbytes, objects)

    def read_into(self, keys: Sequence[bytes], expect: Sequence[ObjectMeta],
                  outs: Sequence[memoryview]) -> list[bool]:
        """Raw-codec payloads straight into the caller's memory where the holding tier can do it
        (disk: one read into ``out``, verified there), skipping the object buffer and its copy.
        False where it could not (absent, another codec, a tier without the ability, or a hit
        that a promotion should follow): the caller falls back to :meth:`get` for those."""
        done = [False] * len(keys)
        for i, pos in enumerate(self.stack.holders(keys)):
            if pos is None or (pos and self.config.promote):
                continue
            tier = self.tiers[pos]
            assert isinstance(tier, BlobTier)
            status = self.stack.guarded(tier, "read_into", lambda t=tier: t.read_into(keys[i], expect[i], [outs[i]]),
                                        ReadResult.FALLBACK)  # FALLBACK where the tier cannot
            if status is ReadResult.OK:
                done[i] = True
                self.stack.hit(pos, expect[i].num_tokens)
            elif status is ReadResult.CORRUPT:
                self.stack.reject(pos, keys[i], tier.last_error or "failed verification")
        return done

    # ---- writes --------------------------------------------------------------------------

    @staticmethod
    def verify(blob: bytes | memoryview, object_key: bytes) -> ObjectMeta:
        """Parse and check an incoming object; raises InvalidInputError naming the problem."""
        try:
            meta, payload = read_meta(blob)
        except CorruptObjectError as exc:
            raise InvalidInputError(f"object for key {object_key.hex()} is not a valid kvstore object: {exc}") from None
        BlobStore.check(meta, payload.nbytes, object_key)
        return meta

    @staticmethod
    def check(meta: ObjectMeta, payload_nbytes: int, object_key: bytes) -> None:
        """What an intact object must also be to be stored: sent for the key it names, and a
        raw payload the size its shape says. Raises InvalidInputError."""
        if meta.key != object_key:
            raise InvalidInputError(f"object names key {meta.key.hex()}, but was sent for {object_key.hex()}")
        need = tensor_nbytes(meta) if meta.codec == "raw" else None
        if need is not None and payload_nbytes != need:
            raise InvalidInputError(f"object for key {object_key.hex()}: a raw payload of {payload_nbytes} bytes "
                                    f"for shape {list(meta.shape)} {meta.dtype} (needs {need})")

    def allocate(self, nbytes: int, *, fresh: bool = True) -> memoryview | None:
        """Writable memory to receive an object into before ``put`` (from the memory tier's
        arena): the put then keeps it without a copy. Without ``fresh``, None while the arena
        has no free region (BlobTier.allocate); never blocks."""
        first = self.tiers[0] if self.tiers else None
        return first.allocate(nbytes, fresh=fresh) if isinstance(first, BlobTier) else unzeroed(nbytes)

    def durable(self) -> bool:
        """Whether some tier keeps objects when this process dies and gets every new object:
        what a durable put (``acks``, ``put_durably``) is acknowledged by."""
        return bool(self.stack.durable_tiers())

    def held_durably(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys`` every durable tier holds now (no I/O: the disk's index)."""
        tiers = self.stack.durable_tiers()
        if not tiers:
            return 0
        held = [True] * len(keys)
        for tier in tiers:
            held = [h and c for h, c in zip(held, self.stack.contains(tier, keys))]
        return sum(held)

    def put(self, objects: Sequence[StoredObject], owner: str = "", quota: int | None = None, *,
            acks: WriteAcks | None = None) -> int:
        """Store objects not already present; returns how many new ones some tier took. All or
        nothing on quota. Never waits for a slower tier (beyond a full queue's back-pressure).

        With ``acks``, every write to a durable tier reports there, including writes queued
        again for objects stored before whose durable copy is missing (a failed or dropped
        write): wait on ``acks``, then ask ``held_durably`` (``put_durably`` does both)."""
        where = self.stack.holders([o.storage_key for o in objects])
        new = [o for o, pos in zip(objects, where) if pos is None]
        used = self.owners.add([(o.storage_key, owner, o.nbytes) for o in new], quota)
        if used is not None:
            raise QuotaExceededError(f"tenant {owner!r} quota exceeded: holds {used} bytes, this put adds "
                                     f"{sum(o.nbytes for o in new)}, quota is {quota}")
        stored = 0
        for o, pos in zip(objects, where):
            meta = rekey(o.meta, o.storage_key)
            if pos == 0:
                if acks is not None:
                    self.stack.rewrite_durable(meta, o.parts(), acks)
                continue
            # Also an object only a lower tier holds (after a restart, or demoted): the client
            # just showed it is hot, and its next GET then needs no disk read. The lower tiers
            # already hold it, so only new objects are written through (or, with ``acks``,
            # written again to a durable tier that lacks it).
            took = self.stack.write(meta, parts=o.parts(), keep_parts=not isinstance(o.blob, tuple),
                                    through=pos is None, acks=acks)
            if pos is None:
                if took:
                    stored += 1
                else:
                    self.owners.forget([o.storage_key])
            elif acks is not None:
                self.stack.rewrite_durable(meta, o.parts(), acks)
        return stored

    def put_durably(self, objects: Sequence[StoredObject], owner: str = "", quota: int | None = None,
                    timeout_s: float | None = None) -> int:
        """``put``, then block until the durable tiers have written (or failed to write) them;
        returns how many of ``objects`` every durable tier holds (0 if ``timeout_s`` passed):
        what a client may take as surviving a crash of this process."""
        acks = WriteAcks()
        self.put(objects, owner, quota, acks=acks)
        if not acks.wait(timeout_s):
            return 0
        return self.held_durably([o.storage_key for o in objects])

    def _forget_one(self, key: bytes) -> None:
        self.owners.forget([key])

    # ---- control -------------------------------------------------------------------------

    def pin(self, keys: Sequence[bytes], ttl_s: float) -> int:
        """Pin the keys present; raises PinLimitError, pinning nothing, past a tier's cap."""
        present = [k for k, there in zip(keys, self.exists(keys)) if there]
        self.stack.pin(present, ttl_s)
        return len(present)

    def unpin(self, keys: Sequence[bytes]) -> int:
        return self.stack.unpin(keys)

    def delete(self, keys: Sequence[bytes]) -> int:
        removed = self.stack.delete(keys)
        self.owners.forget(keys)
        return removed

    def clear(self) -> None:
        self.stack.clear()
        self.owners.clear()

    def clear_owner(self, owner: str) -> int:
        """Delete every object accounted to ``owner``; returns how many a tier held."""
        keys = self.owners.keys_of(owner)
        return self.delete(keys) if keys else 0

    def usage(self, owner: str) -> int:
        return self.owners.usage(owner)

    def flush(self, timeout_s: float | None = None) -> bool:
        return self.stack.flush(timeout_s)

    def stats(self) -> dict[str, Any]:
        _store, tiers = self.stack.tier_stats()
        return {"tiers": tiers, "pinned_objects": len(self.pins.active()), "tenants": self.owners.summary()}

    def close(self) -> None:
        self.stack.close()
        self.owners.close()
