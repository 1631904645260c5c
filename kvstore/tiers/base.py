"""The tier roles.

Every tier answers ``contains`` in one batched call and owns its own locking. Memory tiers keep
tensors (a memcpy is the whole cost of a hit); blob tiers keep the verified byte format of
:mod:`kvstore.objects`, so the same bytes move between disk, Redis and the daemon unchanged.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from kvstore.buffers import unzeroed
from kvstore.config import TierConfig
from kvstore.objects import ObjectMeta
from kvstore.pins import PinRegistry
from kvstore.stats import Counters

if TYPE_CHECKING:
    import torch  # tensor tiers only; blob tiers (the daemon's) never touch tensors

    from kvstore.spec import KVSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierStats:
    objects: int | None  # None: not known to this process (shared backends)
    bytes: int | None
    capacity: int | None
    pinned_bytes: int
    available: bool = True


@dataclass(frozen=True)
class TierContext:
    """What the tier stack hands every tier it builds, besides the tier's own config."""

    spec: KVSpec | None  # the model's KV layout; None in a store of opaque objects (the daemon's)
    chunk_size: int
    counters: Counters  # shared by the stack's tiers; a tier counts under its own name
    pins: PinRegistry  # pinned keys must not be evicted
    namespace: bytes  # model + tenant: scopes clear(), stats and on-disk directories
    on_evict: EvictHandler | None = None  # call before dropping an object, so it can be demoted
    on_lost: Callable[[bytes], None] | None = None  # call when an indexed object is found gone (deleted by hand)


class Tier(ABC):
    """What the store needs from every tier. Built as ``cls(config, context)`` by the registry."""

    is_memory: bool = False
    is_remote: bool = False  # shared across processes/machines; a round-trip per call
    is_memory_blob: bool = False  # serialized objects in this process's memory (verified on entry)
    is_durable: bool = False  # keeps what it holds when this process dies (files on this machine)
    # Keeps agent sessions itself (the daemon, which learns tool durations from every engine):
    # gets tool_started/tool_finished instead of a pin at this process's predicted TTL.
    keeps_sessions: bool = False

    def __init__(self, config: TierConfig, context: TierContext) -> None:
        self.config = config
        self.name = config.kind
        self.counters = context.counters
        self._refusals: set[str] = set()

    def refuse(self, why: str) -> None:
        """Count a put this tier cannot take. The first of each reason is also logged: it is an
        operator's to fix (pins filling the budget, objects larger than the whole tier), and a
        counter alone goes unseen."""
        self.counters.tier(self.name, "rejected")
        if why not in self._refusals:
            self._refusals.add(why)
            log.warning("tier %s refuses writes: %s (each is counted as 'rejected'; said once)", self.name, why)

    @abstractmethod
    def contains(self, keys: Sequence[bytes]) -> list[bool]: ...

    @abstractmethod
    def delete(self, keys: Sequence[bytes]) -> int: ...

    @abstractmethod
    def stats(self) -> TierStats: ...

    def touch(self, keys: Sequence[bytes]) -> None:
        """Mark keys as just used, in the given order (the last one becomes most recent)."""

    def pinned_bytes_of(self, keys: Sequence[bytes]) -> int:
        """Bytes these keys occupy here (0 for keys not stored); used to enforce pin caps."""
        return 0

    @property
    def pin_capacity(self) -> int | None:
        cap = self.config.capacity
        return None if cap is None else int(cap * self.config.pin_fraction)

    def tool_started(self, session: str, tool: str, keys: Sequence[bytes], ago_s: float) -> None:
        """An agent session paused on ``tool`` holding ``keys`` (tiers that keep sessions).
        Blocking: may do a round trip; must not raise (a failure is a counted miss of the pin)."""

    def tool_finished(self, session: str, ago_s: float) -> None:
        """The session's next turn arrived ``ago_s`` seconds ago (tiers that keep sessions)."""

    def clear(self) -> None:
        """Remove every object this tier holds for this store."""

    def close(self) -> None:
        pass


class MemoryTierBase(Tier):
    """A tier of tensors in process memory (engine device or host)."""

    is_memory = True

    @abstractmethod
    def put(self, meta: ObjectMeta, src: torch.Tensor, hold: int = 0) -> torch.Tensor | None:
        """Copy ``src`` in; returns the stored view, or None if the key was already there or no
        room could be made. ``hold`` leases the entry that many times (async writers still reading
        the returned view), so it is not evicted or overwritten until each lease is released."""

    @abstractmethod
    def acquire(self, key: bytes) -> tuple[torch.Tensor, ObjectMeta] | None:
        """A view of the stored chunk, leased until :meth:`release`; None on a miss."""

    @abstractmethod
    def release(self, key: bytes) -> None: ...


class ReadResult(Enum):
    """What :meth:`BlobTier.read_into` did."""

    OK = "ok"              # the payload is in the caller's buffer, verified
    MISSING = "missing"    # no such object (any more)
    CORRUPT = "corrupt"    # it failed verification; the caller's buffer holds garbage
    FALLBACK = "fallback"  # fine, but not readable this way (another codec, or a tier that cannot)


class BlobTier(Tier):
    """A tier of serialized objects (disk, Redis, the daemon): SGLang-HiCache-style batch API."""

    last_error: str = ""  # why the last read_into answered CORRUPT, for the log line
    # Where get_blobs may read objects into: set by the stack below an in-process tier of
    # objects (the daemon's memory tier), whose arena it draws on. A hit promoted there then
    # needs no copy, and a daemon's reads stay within its memory budget. None from it: no free
    # region now, use your own buffer.
    read_buffers: Callable[[int], memoryview | None] | None = None

    @abstractmethod
    def get_blobs(self, keys: Sequence[bytes]) -> list[bytes | bytearray | memoryview | None]:
        """Objects (or None on a miss) in buffers the caller owns."""

    def iter_blobs(self, keys: Sequence[bytes]) -> Iterator[bytes | bytearray | memoryview | None]:
        """Like get_blobs, but each yielded buffer is only valid until the next one is requested.

        The hot get path uses this so a tier can reuse one read buffer: fresh 32 MiB buffers
        cost more in page faults than the read itself."""
        yield from self.get_blobs(keys)

    @abstractmethod
    def put_blobs(self, items: Sequence[tuple[ObjectMeta, list[bytes | memoryview]]]) -> int:
        """Store objects given as byte parts; returns how many were written (existing keys are
        skipped). Never raises on backend failure: failures are counted."""

    def promote_blob(self, meta: ObjectMeta, blob: bytes | memoryview) -> bool:
        """Keep a copy of an object a slower tier holds (a promotion). A tier may decline one it
        could only keep past its memory budget; the default takes it like any put."""
        return self.put_blobs([(meta, [blob])]) > 0

    def read_into(self, key: bytes, expect: ObjectMeta, segments: list[memoryview]) -> ReadResult:
        """Read a raw-codec object's payload straight into ``segments`` (the caller's memory, in
        payload order) and verify it there, skipping an object buffer and its copy. A tier that
        can do this overrides it (the disk tier); the rest answer FALLBACK and are read whole."""
        return ReadResult.FALLBACK

    def allocate(self, nbytes: int, *, fresh: bool = True) -> memoryview | None:
        """Writable memory to build an object in before putting it here; tiers that keep objects
        in memory may hand out memory they can keep without a copy. Without ``fresh``, None
        where the tier would have to hand out memory beyond its budget (the caller may wait for
        some to be freed: an evicted object still being sent or written). Never blocks."""
        return unzeroed(nbytes)

    def expire(self, keys: Sequence[bytes], ttl_s: float) -> None:
        """Keep keys for at least ``ttl_s`` (backends with their own expiry, e.g. Redis)."""


EvictHandler = Callable[["Tier", bytes, Callable[[], object]], None]
"""Called with (tier, key, fetch) just before a tier drops an object to make room.

``fetch()`` returns the object's data (a tensor view for memory tiers, bytes for blob tiers) and
is only valid during the call: the handler copies what it needs to demote."""
