"""Storage tiers. Two small ABCs: MemoryTier holds tensors, BlobTier holds self-describing bytes."""

from kvstore.tiers.base import BlobTier, EvictHandler, Tier, TierStats
from kvstore.tiers.factory import build_tier

__all__ = ["BlobTier", "EvictHandler", "Tier", "TierStats", "build_tier"]
