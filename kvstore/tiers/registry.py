"""Tier kinds by name: the one map from a config's tier kind to the class that implements it.

Why a registry and not a switch: adding a tier (S3, a CXL pool, a test double) must not mean
editing the config, the stores or a factory. A kind says here what the config needs to know before
any tier module is imported (its place in the hierarchy, the options it takes, whether it needs a
budget, further checks) and names its class as ``"module:Class"``, imported on first use, so the
daemon, which never loads torch, never imports the tensor tiers it does not configure.

A tier class is built as ``cls(config, context)`` with a :class:`~kvstore.tiers.base.TierContext`.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from kvstore.errors import ConfigError
from kvstore.paths import cache_dir

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from kvstore.config import TierConfig
    from kvstore.tiers.base import Tier, TierContext

ClassRef = Union[str, type]
"""A tier class, or its ``"module:Class"`` path (imported when the first such tier is built)."""

COMMON_OPTIONS = frozenset({"codec", "write", "queue_size", "queue_bytes", "pin_fraction"})
ENTRY_POINTS = "kvstore.tiers"
"""Packages add tier kinds through this entry-point group (``name = "pkg.module:KIND"``, a
TierKind or a callable returning one), loaded the first time a config names a kind not yet known:
so a kind works through config alone in any process (the daemon, an engine's workers)."""

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*$")  # KVSTORE_<KIND>_<OPTION> splits at the first "_"
# First words of other KVSTORE_* variables (StoreConfig fields, the daemon's, the tools'): a kind
# named so would take them over. tests/test_extensions.py checks this covers every field.
RESERVED_NAMES = frozenset({"chunk", "tenant", "salt", "tiers", "save", "promote", "queue", "put", "pin", "max",
                            "serve", "admin", "config", "log", "sglang", "vllm", "lmcache", "tool", "access"})


@dataclass(frozen=True)
class KindOption:
    """An option a kind takes beyond TierConfig's fields (it lands in ``TierConfig.extra``),
    described for the generated configuration reference."""

    name: str
    type: str
    default: object
    doc: str


@dataclass(frozen=True)
class TierKind:
    """One kind of tier, as the config and the tier stack see it.

    ``rank`` orders a store's tiers, lowest (fastest) first: builtins use 10 (device), 20 (cpu),
    30 (disk), 40 (redis), 50 (remote). ``tensors`` is the class for a store of a model's chunks;
    ``objects`` the class for an opaque store of encoded objects (the daemon's; ``None``: the kind
    cannot serve one). ``options`` are the config keys the kind accepts: TierConfig fields, or
    names of the kind's own, which land in ``TierConfig.extra``. ``check`` validates a config of
    this kind (raise ConfigError naming the option) and may fill defaults in."""

    name: str
    rank: int
    tensors: ClassRef
    objects: ClassRef | None
    options: frozenset[str]
    memory: bool = False  # holds tensors in this process (device, cpu): no writer thread, no codec
    needs_capacity: bool = False
    check: Callable[[TierConfig], None] | None = None
    own: tuple[KindOption, ...] = ()  # the kind's own options, described (their names are in ``options`` too)


_KINDS: dict[str, TierKind] = {}


def register_tier(kind: TierKind) -> TierKind:
    """Make a tier kind known to configs and stores. A name is registered once: replacing a
    built-in would change what every default config means."""
    if not _NAME_RE.match(kind.name):
        raise ValueError(f"tier kind name {kind.name!r} must be lowercase letters and digits (it is used in "
                         f"KVSTORE_<KIND>_<OPTION> variables)")
    if kind.name in RESERVED_NAMES:
        raise ValueError(f"tier kind name {kind.name!r} would capture the KVSTORE_{kind.name.upper()}_* variables")
    if kind.name in _KINDS:
        raise ValueError(f"tier kind {kind.name!r} is already registered")
    bad = {"kind", "extra"} & kind.options
    if bad:
        raise ValueError(f"tier kind {kind.name!r}: {sorted(bad)} cannot be options")
    _KINDS[kind.name] = kind
    return kind


def unregister_tier(name: str) -> None:
    if name in _BUILTIN:
        raise ValueError(f"tier kind {name!r} is built in")
    _KINDS.pop(name, None)


def tier_kind(name: str) -> TierKind | None:
    if name not in _KINDS:
        _load_entry_points()
    return _KINDS.get(name)


_loaded_entry_points = False


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        try:
            found = ep.load()
            kind = found() if callable(found) and not isinstance(found, TierKind) else found
            if not isinstance(kind, TierKind):
                raise TypeError(f"it gave {type(kind).__name__}, not a TierKind")
            if kind.name not in _KINDS:
                register_tier(kind)
        except Exception as exc:  # one broken plug-in must not stop every store from starting
            log.warning("tier plug-in %s (%s) not loaded: %s", ep.name, ep.value, exc)


def tier_kinds() -> list[str]:
    """Known kinds, fastest first."""
    return sorted(_KINDS, key=lambda n: _KINDS[n].rank)


def _resolve(kind: str, ref: ClassRef) -> type:
    if isinstance(ref, type):
        return ref
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"tier kind {kind!r}: cannot load its class {ref!r} ({exc})") from None


def build_tier(config: TierConfig, context: TierContext) -> Tier:
    """The tier for ``config``: the kind's tensor class, or its object class in an opaque store."""
    kind = _KINDS.get(config.kind)
    if kind is None:
        raise ConfigError(f"no tier kind {config.kind!r} is registered; known: {', '.join(tier_kinds())}")
    ref = kind.tensors if context.spec is not None else kind.objects
    if ref is None:
        raise ConfigError(f"a store of encoded objects (the daemon) cannot have a {config.kind} tier")
    return _resolve(config.kind, ref)(config, context)


# ---- the built-in kinds ------------------------------------------------------------------------

def default_cache_dir() -> str:
    return str(cache_dir())


def _check_disk(config: TierConfig) -> None:
    if not config.path:
        config.path = default_cache_dir()


def _check_redis(config: TierConfig) -> None:
    if not config.url:
        raise ConfigError("tiers.redis.url is required (for example redis://127.0.0.1:6379/0)")


def _check_remote(config: TierConfig) -> None:
    if not str(config.url or "").startswith(("kvstore://", "http://", "kvstores://", "https://")):
        raise ConfigError("tiers.remote.url must be the daemon's address, e.g. kvstore://127.0.0.1:8765 "
                          "(kvstores:// for TLS)")


_MEMORY = "kvstore.tiers.memory:MemoryTier"
register_tier(TierKind("device", 10, _MEMORY, None, frozenset({"capacity", "device", "pin_fraction"}),
                       memory=True, needs_capacity=True))
register_tier(TierKind("cpu", 20, _MEMORY, "kvstore.tiers.memblob:MemoryBlobTier",
                       frozenset({"capacity", "pin_fraction", "write", "prealloc"}), memory=True, needs_capacity=True))
register_tier(TierKind("disk", 30, "kvstore.tiers.disk:DiskTier", "kvstore.tiers.disk:DiskTier",
                       COMMON_OPTIONS | {"capacity", "path", "fsync", "shared"}, needs_capacity=True,
                       check=_check_disk))
register_tier(TierKind("redis", 40, "kvstore.tiers.redis:RedisTier", "kvstore.tiers.redis:RedisTier",
                       (COMMON_OPTIONS - {"pin_fraction"}) | {"url", "ttl_s", "timeout_s", "key_prefix", "cluster"},
                       check=_check_redis))
register_tier(TierKind("remote", 50, "kvstore.tiers.remote:RemoteTier", "kvstore.tiers.remote:RemoteTier",
                       (COMMON_OPTIONS - {"pin_fraction"}) | {"url", "api_key", "timeout_s", "tls_ca"},
                       check=_check_remote))
# Faults on purpose (kvstore/tiers/fault.py): wraps a tier of serialized objects; it accepts what
# any of those accepts, and the wrapped kind's own check runs on its options.
_FAULT = "kvstore.tiers.fault:FaultTier"
_FAULT_OPTIONS = (
    KindOption("wraps", "str", None, "the kind of serialized objects it wraps (disk, redis, remote); their options apply"),
    KindOption("seed", "int", 0, "seed of the fault draws: the same seed and requests give the same faults"),
    *(KindOption(f"read_{f}", "float", 0.0, f"probability that an object read {what}")
      for f, what in (("miss", "misses (a lost object)"), ("error", "raises an I/O error"),
                      ("delay", "comes `delay_s` late"), ("stall", "comes `stall_s` late (past a client's timeout)"),
                      ("truncate", "is cut to half"), ("flip", "has one byte changed"),
                      ("swap", "is another stored key's object"))),
    *(KindOption(f"write_{f}", "float", 0.0, f"probability that an object write {what}")
      for f, what in (("lose", "is acknowledged and never made"), ("error", "raises an I/O error"),
                      ("truncate", "stores half the object (a torn write)"))),
    KindOption("delay_s", "float", 0.05, "how late a `read_delay` read is"),
    KindOption("stall_s", "float", 5.0, "how late a `read_stall` read is"),
)
register_tier(TierKind("fault", 35, _FAULT, _FAULT,
                       frozenset().union(*(k.options for k in _KINDS.values() if not k.memory))
                       | {o.name for o in _FAULT_OPTIONS},
                       check=lambda config: importlib.import_module("kvstore.tiers.fault").check(config),
                       own=_FAULT_OPTIONS))
_BUILTIN = frozenset(_KINDS)
