"""Builds a tier from its config (the one place that maps a kind to a class)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore.config import TierConfig
from kvstore.errors import ConfigError
from kvstore.pins import PinRegistry
from kvstore.stats import Counters
from kvstore.tiers.base import EvictHandler, Tier

if TYPE_CHECKING:
    from kvstore.spec import KVSpec


def build_tier(config: TierConfig, *, spec: KVSpec | None, chunk_size: int, counters: Counters,
               pins: PinRegistry, namespace: bytes, on_evict: EvictHandler | None) -> Tier:
    """``spec`` None: a store of opaque objects (the daemon's), whose memory tier keeps bytes."""
    if config.is_memory and spec is None:
        if config.kind == "device":
            raise ConfigError("a byte store cannot have a device tier (it holds encoded objects, not tensors)")
        from kvstore.tiers.memblob import MemoryBlobTier

        return MemoryBlobTier(config, counters, pins, on_evict)
    if config.is_memory:
        from kvstore.tiers.memory import MemoryTier

        return MemoryTier(config, counters, spec, chunk_size, pins, on_evict)
    if config.kind == "disk":
        from kvstore.tiers.disk import DiskTier

        return DiskTier(config, counters, pins, namespace, on_evict)
    if config.kind == "redis":
        from kvstore.tiers.redis import RedisTier

        return RedisTier(config, counters, namespace, pins)
    if config.kind == "remote":
        from kvstore.tiers.remote import RemoteTier

        return RemoteTier(config, counters)
    raise AssertionError(f"no tier class for kind {config.kind!r}")  # config validates kinds
