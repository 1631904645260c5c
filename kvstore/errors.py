"""Exception types shared by every layer.

Two families on purpose: *input* errors (the caller handed us something wrong) are raised to the
caller with a message naming the problem; *data* errors (what a tier returned is corrupt or belongs
to another model/key) never reach the engine: the store turns them into a miss plus a counter.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error kvstore raises on purpose."""


class ConfigError(KVStoreError, ValueError):
    """A configuration key or value is unknown or invalid."""


class InvalidInputError(KVStoreError, ValueError):
    """Tokens or KV handed to the store do not match what the spec or the call requires."""


class PinLimitError(KVStoreError):
    """A pin would exceed a tier's pinned-bytes cap; nothing was pinned."""


class CorruptObjectError(KVStoreError):
    """A stored object failed verification (magic, version, checksum, size, header fields).

    Raised inside the store and tiers only; the store converts it into a miss and bumps the
    tier's ``corrupt`` counter.
    """


class MismatchedObjectError(CorruptObjectError):
    """A well-formed object that belongs to another key, model fingerprint or shape."""
