"""Store configuration: dataclasses plus loaders from dicts, YAML/JSON files and KVSTORE_* env vars.

Precedence (lowest first): defaults, config file, environment, explicit overrides (CLI flags).
Every unknown key is an error that names the key and the closest known one, because a typo in a
cache config silently falls back to a default that may be 100x too small.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kvstore.errors import ConfigError
from kvstore.tiers.registry import TierKind, default_cache_dir, tier_kind, tier_kinds

WRITE_POLICIES = ("through", "demote")
QUEUE_FULL_POLICIES = ("block", "drop")
# Not store settings: the config file, the log level, where converted models are cached (the
# reference engine's GGUF import).
RESERVED_ENV = ("KVSTORE_CONFIG", "KVSTORE_LOG_LEVEL", "KVSTORE_MODEL_CACHE", "KVSTORE_CODEC_PROFILES")
RESERVED_ENV_PREFIXES = ("KVSTORE_SERVE_", "KVSTORE_ADMIN_")  # the daemon's own settings, kvstore admin's
RESERVED_ENV_SUFFIXES = ("_TESTS", "_VENV")  # the test scripts' switches (KVSTORE_SGLANG_TESTS=1)

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: int | float | str, what: str = "size") -> int:
    """Bytes from ``4GiB``, ``512MB``, ``1.5G`` (bare K/M/G mean binary units) or a number."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a byte size, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{what}: must not be negative, got {value}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{what}: cannot parse byte size {value!r} (examples: 4GiB, 512MB, 1073741824)")
    number, unit, binary, _b = m.groups()
    decimal_si = unit and not binary and _b  # "MB" is SI, "M"/"MiB" are binary
    base = 1000 if decimal_si else 1024
    return int(float(number) * base ** _POWERS[unit.lower()])


def redact_url(url: str) -> str:
    """``url`` with any password or token hidden (user:pass@, a user-only token@, ?password=)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:<redacted>@{host}" if sep else f"<redacted>@{host}"
    query = urlencode([(k, "<redacted>" if k.lower() in ("password", "pass", "token", "auth") else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="<>")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def format_size(nbytes: int | None) -> str:
    """``4.0 GiB``: sizes in start-up lines and messages, in the units configs use."""
    if nbytes is None:
        return "unbounded"
    size, unit = float(nbytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            break
        size /= 1024
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


@dataclass
class TierConfig:
    """One tier. ``kind`` (a registered :class:`TierKind`) fixes its place in the hierarchy and
    the options it takes; unused fields stay at defaults. ``extra`` holds the options of a kind
    that are not fields here (a kind registered outside kvstore)."""

    # Field comments are the documentation: scripts/config_reference.py turns them into
    # docs/configuration.md, and a test fails when a field has none or the file is stale.
    kind: str  # the tier kind (device, cpu, disk, redis, remote, or a registered one)
    capacity: int | None = None  # byte budget (4GiB, 512MB, ...); required for device/cpu/disk; Redis uses its maxmemory
    codec: str = "raw"  # codec of the objects this tier writes: raw, lossless, balanced, compact, aggressive (or lz4, int8, fp8, cachegen[:level])
    write: str = "through"  # through: every put is copied down here; demote: only evictions land here
    path: str | None = None  # disk: the cache directory (default ~/.cache/kvstore)
    fsync: bool = False  # disk: fsync each object before it gets its name (survives power loss)
    # disk: other processes write this directory too; an index miss checks the file system.
    shared: bool = False
    # cpu tier: reserve and pre-fault the whole budget at start (the daemon's arena, a store's
    # slot pool): puts then never wait on page faults, at the price of holding it from the start.
    prealloc: bool = False
    url: str | None = None  # redis: redis://host:port/db (redis+cluster://h:p[,h:p...] for a cluster); remote: kvstore://h:p[,h:p...]
    ttl_s: float | None = None  # redis: expire objects after this many seconds (pins extend it)
    timeout_s: float = 2.0  # redis/remote: per-call timeout; a slower backend is skipped with back-off
    key_prefix: str = "kvstore:"  # redis: prefix of every key kvstore writes
    cluster: bool = False  # redis: Redis Cluster (also implied by a redis+cluster:// URL)
    api_key: str | None = None  # remote: the daemon's API key
    tls_ca: str | None = None  # remote over kvstores://: CA file to verify the daemon (default: system CAs)
    device: str | None = None  # device tier: torch device (default cuda when available, else cpu)
    pin_fraction: float = 0.5  # share of the capacity pins may hold; pinning past it is refused
    queue_size: int = 64  # writes queued for this tier before queue_full applies
    queue_bytes: int | None = None  # bytes of writes queued for this tier (default 1/16 of the memory tiers' budget)
    extra: dict[str, Any] = field(default_factory=dict)  # options of a kind registered outside kvstore

    def __post_init__(self) -> None:
        kind = _kind(self.kind)
        self.extra = dict(self.extra)  # a copy: dataclasses.replace must not share it
        fields = _FIELDS
        for key in self.extra:
            if key in fields or key not in kind.options:
                raise ConfigError(f"unknown option {key!r} for tier {self.kind!r}{_suggest(key, kind.options)}; "
                                  f"allowed: {sorted(kind.options)}")
        if self.capacity is not None:
            self.capacity = parse_size(self.capacity, f"tiers.{self.kind}.capacity")
        if self.queue_bytes is not None:
            self.queue_bytes = parse_size(self.queue_bytes, f"tiers.{self.kind}.queue_bytes")
        if kind.needs_capacity and not self.capacity:
            raise ConfigError(f"tiers.{self.kind}.capacity is required and must be > 0")
        if kind.check is not None:
            kind.check(self)
        if self.codec != "raw":  # the default needs no check, and checking imports torch (the daemon has none)
            from kvstore.codecs import CodecError, available_codecs, get_codec

            try:
                get_codec(self.codec)
            except CodecError as exc:
                raise ConfigError(f"tiers.{self.kind}.codec: {exc}{_suggest(self.codec, available_codecs())}") from None
        if self.write not in WRITE_POLICIES:
            raise ConfigError(f"tiers.{self.kind}.write must be one of {WRITE_POLICIES}, got {self.write!r}")
        if not 0.0 <= float(self.pin_fraction) <= 1.0:
            raise ConfigError(f"tiers.{self.kind}.pin_fraction must be in [0, 1], got {self.pin_fraction}")
        if self.queue_size < 1:
            raise ConfigError(f"tiers.{self.kind}.queue_size must be >= 1, got {self.queue_size}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ConfigError(f"tiers.{self.kind}.ttl_s must be positive, got {self.ttl_s}")

    @property
    def is_memory(self) -> bool:
        return _kind(self.kind).memory

    def options(self) -> dict[str, Any]:
        """The options of this tier as a config file would give them."""
        allowed = _kind(self.kind).options
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in allowed}
        out.update(self.extra)
        return out


_FIELDS = frozenset(f.name for f in dataclasses.fields(TierConfig)) - {"kind", "extra"}
# Options kept as the text given in an env var (``KVSTORE_REMOTE_API_KEY=0123`` is not the number 123).
_TEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(TierConfig) if f.type in ("str", "str | None"))


def _kind(name: str) -> TierKind:
    kind = tier_kind(name)
    if kind is None:
        known = tier_kinds()
        raise ConfigError(f"unknown tier {name!r}{_suggest(name, known)}; known: {', '.join(known)}")
    return kind


def _default_tiers() -> dict[str, TierConfig]:
    return {
        "cpu": TierConfig("cpu", capacity=parse_size("4GiB")),
        "disk": TierConfig("disk", capacity=parse_size("20GiB"), path=default_cache_dir()),
    }


@dataclass
class StoreConfig:
    """Everything a KVStore needs besides the model's KVSpec."""

    chunk_size: int = 256  # tokens per chunk: the unit of keys, storage and hits
    tenant: str = "default"  # mixed into every key: tenants never share KV
    salt: str = ""  # mixed into every key as well (e.g. a deployment or experiment name)
    tiers: dict[str, TierConfig] = field(default_factory=_default_tiers)  # the tiers, by kind (see below)
    save_partial: bool = True  # store a trailing partial chunk (the next chat turn still hits it)
    promote: bool = True  # copy hits in slower tiers into faster ones
    queue_full: str = "block"  # block (back-pressure, up to put_timeout_s) or drop (counted)
    put_timeout_s: float = 0.5  # how long a put may wait on a full write queue
    pin_sweep_s: float = 1.0  # how often expired pins are released
    max_pin_ttl_s: float = 7 * 86400.0  # the longest pin a caller may ask for
    tool_default_ttl_s: float = 30.0  # agent sessions: the pin of a tool never seen before (then learned per tool)
    tool_ttl_quantile: float = 0.9  # agent sessions: pins last this quantile of the tool's durations, x1.25
    tool_pause_turnovers: float = 2.5  # agent sessions: a tool expected to take longer than this many turnovers of the memory tier is not pinned (0: use tool_max_pause_s)
    tool_max_pause_s: float = 60.0  # agent sessions: the same limit in seconds, while the turnover is unknown
    access_log: str | None = None  # a JSONL file of every lookup, get, put and pin, for `kvstore plan` (off by default)

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.queue_full not in QUEUE_FULL_POLICIES:
            raise ConfigError(f"queue_full must be one of {QUEUE_FULL_POLICIES}, got {self.queue_full!r}")
        if not self.tiers:
            raise ConfigError("at least one tier must be configured")
        for name, tier in self.tiers.items():
            if name != tier.kind:
                raise ConfigError(f"tier {name!r} has kind {tier.kind!r}; the key must equal the kind")
        # Keep the hierarchy order regardless of how the user listed them.
        self.tiers = dict(sorted(self.tiers.items(), key=lambda item: _kind(item[0]).rank))

    def with_shared_disk(self) -> "StoreConfig":
        """The same config with its disk tier marked ``shared``: it then sees objects other
        processes write (vLLM's scheduler and worker, SGLang's TP ranks, or several engines on
        one host share a directory)."""
        tiers = {name: dataclasses.replace(tc, shared=True) if tc.kind == "disk" else tc
                 for name, tc in self.tiers.items()}
        return dataclasses.replace(self, tiers=tiers)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tiers"}
        out["tiers"] = {k: t.options() for k, t in self.tiers.items()}
        return out

    # ---- loaders -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StoreConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"unknown config key {key!r}{_suggest(key, known)}")
        kwargs = {k: v for k, v in data.items() if k != "tiers"}
        if "tiers" in data:
            kwargs["tiers"] = _tiers_from(data["tiers"])
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "StoreConfig":
        return cls.from_dict(read_config_file(path))


def _tiers_from(raw: Any) -> dict[str, TierConfig]:
    """Tiers as a mapping ``{kind: {options}}`` (``None``/``{}`` options mean defaults)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("tiers must be a mapping of tier kind to options, e.g. {cpu: {capacity: 4GiB}}")
    defaults = _default_tiers()
    tiers: dict[str, TierConfig] = {}
    for kind, opts in raw.items():
        if isinstance(opts, TierConfig):
            tiers[kind] = opts
            continue
        allowed = _kind(kind).options
        opts = dict(opts or {})
        for key in opts:
            if key not in allowed:
                raise ConfigError(f"unknown option {key!r} for tier {kind!r}"
                                  f"{_suggest(key, allowed)}; allowed: {sorted(allowed)}")
        if kind in defaults:
            opts = {**defaults[kind].options(), **opts}
        tiers[kind] = TierConfig(kind, **{k: v for k, v in opts.items() if k in _FIELDS},
                                 extra={k: v for k, v in opts.items() if k not in _FIELDS})
    return tiers


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
    import yaml

    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from exc
    return data or {}


def _env_value(raw: str) -> Any:
    low = raw.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null", ""):
        return None
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``KVSTORE_CHUNK_SIZE=512``, ``KVSTORE_TIERS=cpu,disk``, ``KVSTORE_DISK_PATH=/x``,
    ``KVSTORE_CPU_CAPACITY=8GiB``, ``KVSTORE_REDIS_URL=redis://...`` (setting a tier's option
    enables that tier)."""
    out: dict[str, Any] = {}
    tiers: dict[str, dict[str, Any]] = {}
    top = {f.name for f in dataclasses.fields(StoreConfig)} - {"tiers"}
    for name, raw in env.items():
        if (not name.startswith("KVSTORE_") or name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES)
                or name.endswith(RESERVED_ENV_SUFFIXES)):
            continue
        key = name[len("KVSTORE_"):].lower()
        if key == "tiers":
            for kind in (k.strip() for k in raw.split(",") if k.strip()):
                tiers.setdefault(kind, {})
            continue
        kind, _, opt = key.partition("_")
        if tier_kind(kind) is not None and opt:
            # Text options and a kind's own (its tier parses them) stay as given.
            tiers.setdefault(kind, {})[opt] = raw if opt in _TEXT_FIELDS or opt not in _FIELDS else _env_value(raw)
        elif key in top:
            out[key] = raw if key in ("tenant", "salt") else _env_value(raw)
        else:
            hint = _suggest(key, top | {f'{k}_...' for k in tier_kinds()})
            if not hint and opt:
                hint = f" (no tier kind {kind!r} is registered; known: {', '.join(tier_kinds())})"
            raise ConfigError(f"unknown environment variable {name}{hint}")
    if "KVSTORE_TIERS" in env:
        listed = {k.strip() for k in env["KVSTORE_TIERS"].split(",") if k.strip()}
        out["tiers"] = {k: v for k, v in tiers.items() if k in listed or v}
        out["_tiers_exclusive"] = True
    elif tiers:
        out["tiers"] = tiers
    return out


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge config dicts; tiers merge per kind and option. ``_tiers_exclusive`` replaces the set."""
    result = dict(base)
    for key, value in over.items():
        if key == "_tiers_exclusive":
            continue
        if key == "tiers" and isinstance(value, Mapping):
            old = dict(result.get("tiers") or {})
            new = {} if over.get("_tiers_exclusive") else old
            for kind, opts in value.items():
                merged = dict(old.get(kind) or {})
                merged.update(opts or {})
                new[kind] = merged
            result["tiers"] = new
        else:
            result[key] = value
    return result


def load_config(source: "StoreConfig | Mapping[str, Any] | str | os.PathLike[str] | None" = None, *,
                env: Mapping[str, str] | None = None, use_env: bool | None = None,
                overrides: Mapping[str, Any] | None = None) -> StoreConfig:
    """Build a StoreConfig from any accepted source.

    ``source=None`` reads ``$KVSTORE_CONFIG`` (if set) and then the ``KVSTORE_*`` variables. An
    explicit dict or file ignores the environment unless ``use_env=True`` (the CLI sets it), so
    that library users get exactly what they passed.
    """
    if isinstance(source, StoreConfig) and not overrides and not use_env:
        return source
    env = os.environ if env is None else env
    if use_env is None:
        use_env = source is None
    data: dict[str, Any] = {}
    if isinstance(source, StoreConfig):
        data = source.to_dict()
    elif isinstance(source, Mapping):
        data = dict(source)
    elif source is not None:
        data = read_config_file(source)
    elif env.get("KVSTORE_CONFIG"):
        data = read_config_file(env["KVSTORE_CONFIG"])
    if (use_env or overrides) and "tiers" not in data:
        # Env vars and flags adjust the effective tiers, which are the defaults unless given.
        data["tiers"] = StoreConfig().to_dict()["tiers"]
    if use_env:
        data = merge(data, env_overrides(env))
    if overrides:
        data = merge(data, overrides)
    return StoreConfig.from_dict(data)


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
