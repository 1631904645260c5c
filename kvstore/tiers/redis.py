"""Redis/Valkey as a shared tier: pipelined batch ops, TTL via EXPIRE, degrade-to-miss when down.

Redis owns its memory budget (``maxmemory`` + its eviction policy), so this tier has no capacity
of its own. When Redis is unreachable every call returns a miss (or skips the write) at once for
a back-off period that doubles up to 30 s; redis-py reconnects on the first call after it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, RedisClusterException, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from kvstore.config import TierConfig, redact_url
from kvstore.errors import ConfigError
from kvstore.objects import ObjectMeta
from kvstore.tiers.backoff import Backoff, GuardedCalls
from kvstore.tiers.base import BlobTier, TierContext, TierStats

log = logging.getLogger(__name__)


class RedisTier(GuardedCalls, BlobTier):
    is_remote = True
    # A cluster mid-failover answers CLUSTERDOWN/TRYAGAIN, or has slots no live node serves
    # (RedisClusterException, which is not a RedisError): an outage, so misses and a back-off.
    TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, TryAgainError,
                 RedisClusterException)
    ERRORS = (RedisError,)

    def __init__(self, config: TierConfig, context: TierContext) -> None:
        super().__init__(config, context)
        namespace, pins = context.namespace, context.pins
        url = str(config.url)
        self.cluster = config.cluster or "+cluster://" in url
        opts = dict(socket_timeout=config.timeout_s, socket_connect_timeout=config.timeout_s)
        self._lock = threading.Lock()
        self._client: Any = None
        self._connect_failures = 0
        if self.cluster:
            first, seeds = cluster_seeds(url)  # a malformed URL is a config error now, not misses later
            self._connect: Callable[[], Any] = lambda: _cluster_client(first, seeds, opts)
        else:
            self._client = redis.Redis.from_url(url, health_check_interval=30, **opts)  # connects lazily
        self._pins = pins
        # The namespace (root key) scopes clear() and stats to this model and tenant.
        self._prefix = config.key_prefix.encode() + namespace.hex()[:8].encode() + b":"
        # A cluster heals itself (a failover takes seconds): look again within 2 s, not 30.
        self._backoff = Backoff(f"redis tier {redact_url(url)}", max_s=2.0 if self.cluster else 30.0)
        self.ttl = None if config.ttl_s is None else max(1, int(round(config.ttl_s)))

    @property
    def client(self) -> Any:
        """The connection; a cluster client is made on first use, inside a guarded call, so an
        engine starting while the cluster (or its seed node) is down gets misses, not an error."""
        if self._client is None:
            failures = self._connect_failures
            with self._lock:
                if self._client is None:
                    if self._connect_failures != failures:  # it failed while this call waited: once is enough
                        raise RedisConnectionError("cannot reach any seed node of the cluster")
                    try:
                        self._client = self._connect()
                    except BaseException:
                        self._connect_failures += 1
                        raise
        return self._client

    def _rkey(self, key: bytes) -> bytes:
        return self._prefix + key.hex().encode()

    @property
    def available(self) -> bool:
        return self._backoff.available

    def _pipeline(self, op: Callable[[Any], None], n: int) -> list[Any] | None:
        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            op(pipe)
            return pipe.execute()
        return self._call(run, None) if n else []

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        res = self._pipeline(lambda p: [p.exists(self._rkey(k)) for k in keys], len(keys))
        return [False] * len(keys) if res is None else [bool(r) for r in res]

    def get_blobs(self, keys: Sequence[bytes]) -> list[bytes | None]:
        def mget() -> list[Any]:
            rkeys = [self._rkey(k) for k in keys]
            return self.client.mget_nonatomic(rkeys) if self.cluster else self.client.mget(rkeys)
        res = self._call(mget, None) if keys else []
        return [None] * len(keys) if res is None else list(res)

    def put_blobs(self, items: Sequence[tuple[ObjectMeta, list[bytes | memoryview]]]) -> int:
        if not items:
            return 0
        present = self.contains([m.key for m, _ in items])
        todo = [(m, parts) for (m, parts), there in zip(items, present) if not there]
        if not todo or not self.available:
            return 0

        def op(pipe: Any) -> None:
            for meta, parts in todo:
                pipe.set(self._rkey(meta.key), b"".join(parts), ex=self._ttl_for(meta.key))
        res = self._pipeline(op, len(todo))
        if res is None:
            self.counters.tier(self.name, "write_errors", len(todo))
            return 0
        size = sum(sum(memoryview(p).nbytes for p in parts) for _m, parts in todo)
        self.counters.tier(self.name, "puts", len(todo))
        self.counters.tier(self.name, "put_bytes", size)
        return len(todo)

    def _ttl_for(self, key: bytes) -> int | None:
        """The default TTL, stretched to cover a pin taken before the async write landed."""
        if self.ttl is None:
            return None
        return max(self.ttl, int(self._pins.remaining(key) + 0.999))

    def expire(self, keys: Sequence[bytes], ttl_s: float) -> None:
        """Extend expiry to at least ``ttl_s`` (``GT``: never shortens; keys without a TTL keep none)."""
        ttl = max(1, int(round(ttl_s)))
        self._pipeline(lambda p: [p.expire(self._rkey(k), ttl, gt=True) for k in keys], len(keys))

    def delete(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        return int(self._call(lambda: self.client.delete(*[self._rkey(k) for k in keys]), 0))

    def clear(self) -> None:
        def run() -> None:
            batch = []
            for k in self.client.scan_iter(match=self._prefix + b"*", count=1000):
                batch.append(k)
                if len(batch) >= 1000:
                    self.client.delete(*batch)
                    batch.clear()
            if batch:
                self.client.delete(*batch)
        self._call(run, None)

    def stats(self) -> TierStats:
        # Redis is shared and owns its memory: per-store object counts would need a SCAN.
        return TierStats(objects=None, bytes=None, capacity=None, pinned_bytes=0, available=self.available)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def cluster_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``redis+cluster://[auth@]host:port[,host:port...][/0]`` -> (a redis:// URL of the first
    seed with the auth and options, every seed as (host, port)). Raises ConfigError naming the
    problem: a port that is not a number, no host, a database other than 0."""
    parts = urlsplit(url.replace("+cluster://", "://"))
    auth, _at, hosts = parts.netloc.rpartition("@")
    seeds = []
    for raw in hosts.split(","):
        host = raw.strip()
        if not host:
            continue
        if host.startswith("["):  # IPv6: [addr]:port
            name, _b, rest = host[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else "6379"
        else:
            name, _c, port = host.rpartition(":") if ":" in host else (host, "", "6379")
        if not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"tiers.redis.url {redact_url(url)}: seed {host!r} is not host:port")
        seeds.append((name, int(port)))
    if not seeds:
        raise ConfigError(f"tiers.redis.url {redact_url(url)}: no seed node (redis+cluster://host:port,...)")
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigError(f"tiers.redis.url {redact_url(url)}: a cluster has only database 0")
    name, port = seeds[0]
    host = f"[{name}]" if ":" in name else name
    first = urlunsplit(parts._replace(netloc=(auth + "@" if auth else "") + f"{host}:{port}", path="/0"))
    return first, seeds


def _cluster_client(first: str, seeds: list[tuple[str, int]], opts: dict[str, Any]) -> Any:
    """A slot-aware client: every listed node is a seed, so a fresh client finds the cluster
    while any one of them is up. Pipelines and multi-key reads are split per node by redis-py.

    No retry inside redis-py: its default (10 retries with back-off) held an engine's read for a
    whole failover (3 s measured), and even one retry against a hung node costs several
    timeouts (reconnect, handshake, command). A failed call is a miss and a back-off; the
    topology refresh it asks for runs on the next call, which then finds the promoted replica."""
    from redis.cluster import ClusterNode, RedisCluster

    return RedisCluster(url=first, startup_nodes=[ClusterNode(h, p) for h, p in seeds[1:]],
                        retry=Retry(NoBackoff(), 0), **opts)
