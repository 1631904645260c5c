"""kvstore: a tiered KV-cache store for LLM inference.

>>> from kvstore import KVSpec, KVStore
"""

from kvstore.config import StoreConfig, TierConfig, load_config
from kvstore.errors import ConfigError, InvalidInputError, KVStoreError, PinLimitError
from kvstore.spec import KVKind, KVSpec
from kvstore.store import KVStore

__all__ = ["ConfigError", "InvalidInputError", "KVKind", "KVSpec", "KVStore", "KVStoreError", "PinLimitError",
           "StoreConfig", "TierConfig", "load_config"]
__version__ = "0.1.0"
