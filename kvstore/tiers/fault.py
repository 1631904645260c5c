"""A tier that fails on purpose: it wraps a tier of serialized objects (disk, Redis, the daemon,
or a registered one) and injects the faults real storage has, at rates a config sets, drawn
from a seed.

Why a tier and not mocks in tests: the promise that matters most ("exact KV or a miss, never
wrong bytes, never an exception in the engine's path") must hold through every layer a user
runs, the store, its layer-wise loads, the daemon, the connectors, CacheBlend. Configured like
any tier, it reaches all of them with no test hooks in the code under test::

    tiers:
      cpu: {capacity: 1GiB}
      fault: {wraps: disk, path: /tmp/kv, capacity: 4GiB, seed: 7, read_flip: 0.05, write_lose: 0.02}

Read faults, each drawn per object read (``read_<fault>`` is its probability):
``miss`` (the object is not there: a lost file, an evicted key), ``error`` (the backend raises),
``delay`` (``delay_s`` late), ``stall`` (``stall_s`` late, in the process the fault tier runs in:
inside a daemon that is a backend slower than its clients' ``timeout_s``; in an engine's own
process it blocks the reading thread, as a hung local disk does),
``truncate`` (half the object), ``flip`` (one byte changed), ``swap`` (another stored key's
object: valid bytes under the wrong name). Write faults, per object written: ``lose`` (the write
is acknowledged and never made), ``error`` (the backend raises), ``truncate`` (a torn write: half
the object is stored). Every injected fault is counted under this tier as ``injected_<fault>``.
Faults are drawn per object and attempt from the seed: the n-th read of an object meets the same
fault in every run. Which reads reach this tier can still vary from run to run when a background
writer races the reads (write-through behind a memory tier), so a whole run replays exactly only
when this tier is written synchronously (it is the first tier).

The wrapped tier counts under this tier's name. Blocking behaviour: as the wrapped tier's, plus
the injected delays and stalls (a stall blocks the calling thread for ``stall_s``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import xxhash

from kvstore.config import TierConfig
from kvstore.errors import ConfigError
from kvstore.objects import ObjectMeta
from kvstore.tiers.base import BlobTier, ReadResult, TierContext, TierStats
from kvstore.tiers.registry import tier_kind, tier_kinds

READ_FAULTS = ("miss", "error", "delay", "stall", "truncate", "flip", "swap")
WRITE_FAULTS = ("lose", "error", "truncate")


_UNDRAWN = object()


class InjectedFault(OSError):
    """What an ``error`` fault raises: an I/O error, as a failing backend would."""


@dataclass(frozen=True)
class FaultPlan:
    wraps: str
    seed: int
    read: tuple[tuple[str, float], ...]   # (fault, probability), in READ_FAULTS order
    write: tuple[tuple[str, float], ...]
    delay_s: float
    stall_s: float

    @classmethod
    def from_extra(cls, extra: dict) -> "FaultPlan":
        """The plan a fault tier's options (``TierConfig.extra``) describe; missing ones take
        the defaults the registry documents."""
        opts = {**_defaults(), **extra}

        def number(name: str, low: float, high: float = math.inf) -> float:
            try:
                value = float(opts[name])
            except (TypeError, ValueError):
                raise ConfigError(f"tiers.fault.{name} must be a number, got {opts[name]!r}") from None
            if not (math.isfinite(value) and low <= value <= high):
                raise ConfigError(f"tiers.fault.{name} must be a finite number in [{low}, {high}], got {value}")
            return value

        read = tuple((f, number(f"read_{f}", 0.0, 1.0)) for f in READ_FAULTS)
        write = tuple((f, number(f"write_{f}", 0.0, 1.0)) for f in WRITE_FAULTS)
        for plan, what in ((read, "read"), (write, "write")):
            if sum(p for _, p in plan) > 1.0:
                raise ConfigError(f"tiers.fault: the {what} fault probabilities add up to more than 1")
        seed = opts["seed"]
        if isinstance(seed, bool) or not str(seed).lstrip("-").isdigit():
            raise ConfigError(f"tiers.fault.seed must be a whole number, got {seed!r}")
        return cls(str(opts["wraps"] or ""), int(seed), read, write, number("delay_s", 0.0),
                   number("stall_s", 0.0))


def _defaults() -> dict[str, object]:
    """The fault kind's own options with their defaults (kvstore/tiers/registry.py lists and
    documents them, the one place)."""
    kind = tier_kind("fault")
    assert kind is not None
    return {o.name: o.default for o in kind.own}


def inner_config(config: TierConfig) -> TierConfig:
    """The wrapped tier's config: this one's, as the wrapped kind, without the fault options."""
    own = _defaults()
    return dataclasses.replace(config, kind=str(config.extra.get("wraps") or ""),
                               extra={k: v for k, v in config.extra.items() if k not in own})


def check(config: TierConfig) -> None:
    """Config-time checks: a known kind of serialized objects to wrap, valid rates, and the
    wrapped kind's own checks (run by building its config)."""
    wraps = config.extra.get("wraps")
    kind = tier_kind(str(wraps)) if wraps else None
    if kind is None or kind.memory or kind.name == "fault":
        raise ConfigError(f"tiers.fault.wraps must name a tier kind of serialized objects to wrap (one of "
                          f"{', '.join(k for k in tier_kinds() if not tier_kind(k).memory and k != 'fault')}), "
                          f"got {wraps!r}")
    FaultPlan.from_extra(config.extra)
    if kind.name == "disk" and not config.path:
        raise ConfigError("tiers.fault.path is required when it wraps disk: it tears and loses objects on purpose, "
                          "so it must not share a real cache's directory (the default ~/.cache/kvstore)")
    inner = inner_config(config)
    for key, value in dataclasses.asdict(inner).items():  # the wrapped kind fills its defaults in
        if key not in ("kind", "extra"):
            setattr(config, key, value)


class FaultTier(BlobTier):
    def __init__(self, config: TierConfig, context: TierContext) -> None:
        from kvstore.tiers.registry import build_tier

        super().__init__(config, context)
        self.plan = FaultPlan.from_extra(config.extra)
        self.inner = build_tier(inner_config(config), context)
        if not isinstance(self.inner, BlobTier):
            raise ConfigError(f"tiers.fault cannot wrap {self.plan.wraps!r}: not a tier of serialized objects")
        self.inner.name = self.name  # its counters are this tier's
        self.is_remote = self.inner.is_remote
        self.is_durable = self.inner.is_durable
        self._lock = threading.Lock()
        self._attempts: dict[tuple[str, bytes], int] = {}
        self._recent: deque[bytes] = deque(maxlen=64)  # keys seen, for swaps
        # What read_into drew for a key it passed on to the whole-object read (None: no fault)
        self._pending: dict[bytes, str | None] = {}

    # ---- the dice --------------------------------------------------------------------------

    def _draw(self, op: str, key: bytes, plan: tuple[tuple[str, float], ...]) -> str | None:
        """The fault for the n-th ``op`` on ``key``: a hash of (seed, key, op, n), so the same
        requests meet the same faults whatever other threads (the writers) do meanwhile."""
        with self._lock:
            n = self._attempts.get((op, key), 0)
            self._attempts[(op, key)] = n + 1
        x = xxhash.xxh64_intdigest(key + f":{op}:{n}".encode(), seed=self.plan.seed & (2**64 - 1)) / 2**64
        for fault, p in plan:
            if x < p:
                return fault
            x -= p
        return None

    def _count(self, fault: str) -> None:
        self.counters.tier(self.name, f"injected_{fault}")

    def _corrupt(self, fault: str, key: bytes, blob: bytes | bytearray | memoryview) -> bytes | None:
        data = bytes(blob)
        rng = random.Random(xxhash.xxh64_intdigest(key, seed=self.plan.seed & (2**64 - 1)) + len(data))
        if fault == "truncate":
            return data[:len(data) // 2]
        if fault == "flip":
            at = rng.randrange(len(data)) if data else 0
            return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:] if data else data
        # swap: another key's object, valid in itself (one read recently, in the order reads came)
        others = [k for k in self._recent if k != key]
        if others:
            got = self.inner.get_blobs([rng.choice(others)])[0]
            if got is not None:
                return bytes(got)
        return data

    def _read_fault(self, key: bytes) -> str | None:
        """Apply the timing faults now; return the data fault to apply to ``key``'s bytes. A read
        that read_into passed on to the whole-object path keeps the draw it had there."""
        with self._lock:
            fault = self._pending.pop(key, _UNDRAWN)
        if fault is _UNDRAWN:
            fault = self._draw("read", key, self.plan.read)
            if fault is not None:
                self._count(fault)
                if fault == "error":
                    raise InjectedFault(f"injected read error for {key.hex()[:12]}")
                if fault in ("delay", "stall"):
                    time.sleep(self.plan.delay_s if fault == "delay" else self.plan.stall_s)
                    return None
        return fault

    def _faulted(self, key: bytes, blob: bytes | bytearray | memoryview | None
                 ) -> bytes | bytearray | memoryview | None:
        if blob is None:
            return None
        self._recent.append(key)
        fault = self._read_fault(key)
        if fault is None:
            return blob
        if fault == "miss":
            return None
        return self._corrupt(fault, key, blob)

    # ---- reads ---------------------------------------------------------------------------

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return self.inner.contains(keys)

    def get_blobs(self, keys: Sequence[bytes]) -> list[bytes | bytearray | memoryview | None]:
        return [self._faulted(k, b) for k, b in zip(keys, self.inner.get_blobs(keys))]

    def iter_blobs(self, keys: Sequence[bytes]) -> Iterator[bytes | bytearray | memoryview | None]:
        for k, b in zip(keys, self.inner.iter_blobs(keys)):
            yield self._faulted(k, b)

    def read_into(self, key: bytes, expect: ObjectMeta, segments: list[memoryview]) -> ReadResult:
        # Corruption must happen before verification, which the wrapped tier does inside its
        # read_into: a corrupting fault sends the read to the whole-object path instead.
        fault = self._read_fault(key)
        if fault == "miss":
            return ReadResult.MISSING
        if fault is not None:
            with self._lock:
                self._pending[key] = fault
            return ReadResult.FALLBACK
        result = self.inner.read_into(key, expect, segments)
        if result is ReadResult.FALLBACK:  # read whole next: drawn already, no second draw
            with self._lock:
                self._pending[key] = None
        return result

    # ---- writes ----------------------------------------------------------------------------

    def put_blobs(self, items: Sequence[tuple[ObjectMeta, list[bytes | memoryview]]]) -> int:
        keep: list[tuple[ObjectMeta, list[bytes | memoryview]]] = []
        lost = 0
        for meta, parts in items:
            fault = self._draw("write", bytes(meta.key), self.plan.write)
            if fault is not None:
                self._count(f"write_{fault}")
            if fault == "error":
                raise InjectedFault(f"injected write error for {bytes(meta.key).hex()[:12]}")
            if fault == "lose":
                lost += 1
                continue
            if fault == "truncate":
                whole = b"".join(bytes(p) for p in parts)
                parts = [whole[:len(whole) // 2]]
            keep.append((meta, parts))
        return self.inner.put_blobs(keep) + lost if keep else lost

    def promote_blob(self, meta: ObjectMeta, blob: bytes | memoryview) -> bool:
        return self.inner.promote_blob(meta, blob)

    # ---- the rest: the wrapped tier's ------------------------------------------------------

    @property
    def read_buffers(self):  # type: ignore[override]
        return self.inner.read_buffers

    @read_buffers.setter
    def read_buffers(self, value) -> None:  # type: ignore[override]
        self.inner.read_buffers = value

    @property
    def last_error(self) -> str:  # type: ignore[override]
        return self.inner.last_error

    def allocate(self, nbytes: int, *, fresh: bool = True) -> memoryview | None:
        return self.inner.allocate(nbytes, fresh=fresh)

    def expire(self, keys: Sequence[bytes], ttl_s: float) -> None:
        self.inner.expire(keys, ttl_s)

    def delete(self, keys: Sequence[bytes]) -> int:
        return self.inner.delete(keys)

    def stats(self) -> TierStats:
        return self.inner.stats()

    def touch(self, keys: Sequence[bytes]) -> None:
        self.inner.touch(keys)

    def pinned_bytes_of(self, keys: Sequence[bytes]) -> int:
        return self.inner.pinned_bytes_of(keys)

    @property
    def pin_capacity(self) -> int | None:
        return self.inner.pin_capacity

    def clear(self) -> None:
        self.inner.clear()

    def close(self) -> None:
        self.inner.close()
