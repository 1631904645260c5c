"""A tier that fails on purpose: it wraps a tier of serialized objects (disk, Redis, the daemon,
or a registered one) and injects the faults real storage has, at rates a config sets, from a
seed, so a failing run replays exactly.

Why a tier and not mocks in tests: the promise that matters most ("exact KV or a miss, never
wrong bytes, never an exception in the engine's path") must hold through every layer a user
runs, the store, its layer-wise loads, the daemon, the connectors, CacheBlend. Configured like
any tier, it reaches all of them with no test hooks in the code under test::

    tiers:
      cpu: {capacity: 1GiB}
      fault: {wraps: disk, path: /tmp/kv, capacity: 4GiB, seed: 7, read_flip: 0.05, write_lose: 0.02}

Read faults, each drawn per object read (``read_<fault>`` is its probability):
``miss`` (the object is not there: a lost file, an evicted key), ``error`` (the backend raises),
``delay`` (``delay_s`` late), ``stall`` (``stall_s`` late: longer than a client's timeout),
``truncate`` (half the object), ``flip`` (one byte changed), ``swap`` (another stored key's
object: valid bytes under the wrong name). Write faults, per object written: ``lose`` (the write
is acknowledged and never made), ``error`` (the backend raises), ``truncate`` (a torn write: half
the object is stored). Every injected fault is counted under this tier as ``injected_<fault>``.

The wrapped tier counts under this tier's name. Blocking behaviour: as the wrapped tier's, plus
the injected delays and stalls (a stall blocks the calling thread for ``stall_s``).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

from kvstore.config import TierConfig
from kvstore.errors import ConfigError
from kvstore.objects import ObjectMeta
from kvstore.tiers.base import BlobTier, ReadResult, TierContext, TierStats
from kvstore.tiers.registry import tier_kind

READ_FAULTS = ("miss", "error", "delay", "stall", "truncate", "flip", "swap")
WRITE_FAULTS = ("lose", "error", "truncate")


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

        def rate(name: str) -> float:
            value = float(opts[name])
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"tiers.fault.{name} must be a probability in [0, 1], got {value}")
            return value

        read = tuple((f, rate(f"read_{f}")) for f in READ_FAULTS)
        write = tuple((f, rate(f"write_{f}")) for f in WRITE_FAULTS)
        for plan, what in ((read, "read"), (write, "write")):
            if sum(p for _, p in plan) > 1.0:
                raise ConfigError(f"tiers.fault: the {what} fault probabilities add up to more than 1")
        delay, stall = float(opts["delay_s"]), float(opts["stall_s"])
        if delay < 0 or stall < 0:
            raise ConfigError("tiers.fault.delay_s and stall_s must be >= 0")
        return cls(str(opts["wraps"] or ""), int(opts["seed"]), read, write, delay, stall)


def _defaults() -> dict[str, object]:
    """The fault kind's own options with their defaults (kvstore/tiers/registry.py lists and
    documents them, the one place)."""
    kind = tier_kind("fault")
    assert kind is not None
    return {o.name: o.default for o in kind.own}


def inner_config(config: TierConfig) -> TierConfig:
    """The wrapped tier's config: this one's, as the wrapped kind, without the fault options."""
    return dataclasses.replace(config, kind=str(config.extra.get("wraps") or ""),
                               extra={k: v for k, v in config.extra.items() if k not in _defaults()})


def check(config: TierConfig) -> None:
    """Config-time checks: a known kind of serialized objects to wrap, valid rates, and the
    wrapped kind's own checks (run by building its config)."""
    from kvstore.tiers.registry import tier_kinds

    wraps = config.extra.get("wraps")
    kind = tier_kind(str(wraps)) if wraps else None
    if kind is None or kind.memory or kind.name == "fault":
        raise ConfigError(f"tiers.fault.wraps must name a tier kind of serialized objects to wrap (one of "
                          f"{', '.join(k for k in tier_kinds() if not tier_kind(k).memory and k != 'fault')}), "
                          f"got {wraps!r}")
    FaultPlan.from_extra(config.extra)
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
        self._rng = random.Random(self.plan.seed)
        self._lock = threading.Lock()
        self._recent: deque[bytes] = deque(maxlen=64)  # keys seen, for swaps
        self._pending: dict[bytes, str] = {}  # corruption chosen in read_into, done by the whole read

    # ---- the dice --------------------------------------------------------------------------

    def _draw(self, plan: tuple[tuple[str, float], ...]) -> str | None:
        with self._lock:
            x = self._rng.random()
        for fault, p in plan:
            if x < p:
                return fault
            x -= p
        return None

    def _count(self, fault: str) -> None:
        self.counters.tier(self.name, f"injected_{fault}")

    def _corrupt(self, fault: str, key: bytes, blob: bytes | bytearray | memoryview) -> bytes | None:
        data = bytes(blob)
        if fault == "truncate":
            return data[:len(data) // 2]
        if fault == "flip":
            with self._lock:
                at = self._rng.randrange(len(data)) if data else 0
            return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:] if data else data
        # swap: another key's object, valid in itself
        others = [k for k in self._recent if k != key]
        if others:
            with self._lock:
                other = self._rng.choice(others)
            got = self.inner.get_blobs([other])[0]
            if got is not None:
                return bytes(got)
        return data

    def _read_fault(self, key: bytes) -> str | None:
        """Apply the timing faults now; return the data fault to apply to ``key``'s bytes."""
        with self._lock:
            fault = self._pending.pop(key, None)
        fault = fault or self._draw(self.plan.read)
        if fault is None:
            return None
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
        return self.inner.read_into(key, expect, segments)

    # ---- writes ----------------------------------------------------------------------------

    def put_blobs(self, items: Sequence[tuple[ObjectMeta, list[bytes | memoryview]]]) -> int:
        keep: list[tuple[ObjectMeta, list[bytes | memoryview]]] = []
        lost = 0
        for meta, parts in items:
            fault = self._draw(self.plan.write)
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
