"""What the daemon says when it starts and stops, and the operator mistakes it refuses or warns of.

Why: an operator reads the first line to learn what is running (address, tiers and budgets, who
may connect), and a cache that is misconfigured still "works": it answers every request and keeps
nothing. So the mistakes that make it keep nothing, or serve everyone, are caught here, before
the port opens: an error where the daemon would be wrong, a warning where it only might be.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from typing import TYPE_CHECKING

from kvstore.config import TierConfig, format_size, redact_url
from kvstore.errors import ConfigError

if TYPE_CHECKING:
    from kvstore.service.auth import KeyFile
    from kvstore.service.server import ServeConfig

log = logging.getLogger(__name__)

SMALLEST_USEFUL_TIER = 1 << 20
"""A tier budget below this holds no real KV object (one 256-token chunk of SmolLM2-135M, 30 layers
of 3 KV heads, is 5.6 MiB); objects larger than a tier's whole budget are refused."""


def limit_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own heap arena (up to 8 per core), and each
    keeps the multi-MiB request buffers it freed: the load test measured 2.0x the memory budget in
    RSS with the default, 1.6x with two arenas. A no-op where glibc is not the C library."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def connection_limit(reserve: int = 256, most: int = 10000) -> int:
    """How many client connections the daemon may hold: the open-file limit, raised to its hard
    limit as servers do, less ``reserve`` for the disk tier's files, Redis and the listeners, and
    at most ``most`` (Redis's maxclients default; each connection holds a few KiB).
    Past it new connections are closed at once; without it, running out of descriptors made
    asyncio's accept loop log a traceback per attempt, thousands a second."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    except ImportError:  # not POSIX
        return most
    return max(16, min(soft - reserve, most))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check(config: ServeConfig, keys: KeyFile) -> None:
    """Refuse what would be wrong to serve; warn of what is merely doubtful."""
    if not keys.enabled and not is_loopback(config.host) and not config.insecure:
        raise ConfigError(f"--host {config.host} without --key-file would make every client on the network an "
                          f"admin; give a key file, or --insecure if that is really meant")
    for name, tier in config.store.tiers.items():
        if tier.capacity is not None and tier.capacity < SMALLEST_USEFUL_TIER:
            log.warning("tiers.%s.capacity is %s: too small for any KV object, so this tier will refuse "
                        "every put", name, format_size(tier.capacity))
    if not keys.enabled and not is_loopback(config.host):
        log.warning("serving %s without a key file (--insecure): every client is an admin", config.host)


def tls_context(config: ServeConfig) -> ssl.SSLContext | None:
    """The server side of TLS, from the PEM files given; a file that does not load is one line."""
    if config.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load --tls-cert {config.tls_cert} / --tls-key {config.tls_key}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return ctx


def _tier(tc: TierConfig) -> str:
    where = {"disk": tc.path, "redis": redact_url(tc.url or "")}.get(tc.kind)
    codec = "" if tc.is_memory else f", codec {tc.codec}"
    budget = format_size(tc.capacity) if tc.capacity is not None else "its own budget"
    return f"{tc.kind} {budget}{f' at {where}' if where else ''}{codec}"


def started_line(config: ServeConfig, keys: KeyFile) -> str:
    auth = (f"{len(keys.keys)} API key(s) for {len({p.tenant for p in keys.keys.values()})} tenant(s)"
            if keys.enabled else "open, no key file (one tenant, admin for all)")
    scheme = "https" if config.tls_cert else "http"
    line = (f"kvstore daemon serving {scheme}://{config.host}:{config.port}; tiers: "
            f"{'; '.join(_tier(t) for t in config.store.tiers.values())}; auth: {auth}")
    if config.lmcache_port is not None:
        line += f"; LMCache lm:// on {config.lmcache_host}:{config.lmcache_port}"
    if config.metrics_port is not None:
        line += f"; /metrics also on http://{config.metrics_host}:{config.metrics_port}"
    return line
