"""``kvstore serve``: the shared cache daemon (HTTP on service.http).

Data plane: exists/lookup/get/put of self-describing objects in batches (kvstore.wire). Control
plane (service.control): pin/unpin/delete/clear, agent sessions, stats; here too: health,
Prometheus metrics, OpenAPI. Every object is
stored under a tenant-scoped key (service.auth.storage_key), verified on the way in, and
verified again on the way out; store work that may block (a disk read, a full writer queue,
Redis) runs in a thread pool so one slow disk read never stalls other requests, and work that
cannot (memory hits, puts with room in the queues) runs on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvstore.blobstore import BlobStore, QuotaExceededError, StoredObject
from kvstore.config import StoreConfig, parse_size
from kvstore.errors import ConfigError, InvalidInputError, KVStoreError, PinLimitError
from kvstore.service import startup
from kvstore.agents import ToolTTLConfig
from kvstore.service.auth import KeyFile, Principal, storage_key
from kvstore.service.control import ControlPlane, TenantSessions, msgpack_response
from kvstore.service.http import HttpServer
from kvstore.service.http_messages import Application, Limits, Request, Response, Route, bounded, error_response
from kvstore.service.intake import BodyIntake
from kvstore.service.metrics import Metrics
from kvstore.service.openapi import openapi
from kvstore.client import TENANT_HEADER
from kvstore.writer import WriteAcks
from kvstore.wire import BATCH_CONTENT_TYPE, WireError, batch_header, check_keys, unpack_control

log = logging.getLogger(__name__)
_ARENA_WAIT_S = 1.0  # longest a body waits for arena memory before it takes fresh memory
_SMALL_BODY = 65536  # a PUT body below this goes into its own bytearray, not the arena


@dataclass
class ServeConfig:
    """The daemon's own options (``serve:`` in a config file, ``KVSTORE_SERVE_*``, flags)."""

    host: str = "127.0.0.1"  # bind address; beyond loopback it needs key_file (or insecure)
    port: int = 8765  # HTTP port
    key_file: str | None = None  # YAML of API keys -> tenants and quotas (none: open, one admin tenant)
    max_body_bytes: int = 2 * 1024**3  # largest request body
    max_batch: int = 4096  # most keys per request
    request_timeout_s: float = 120.0  # a body not in within it is answered 408, a request running longer 503
    lmcache_port: int | None = None  # also speak LMCache's lm:// protocol on this port (off by default)
    lmcache_host: str = "127.0.0.1"  # bind address of the lm:// listener
    lmcache_tenant: str = "lmcache"  # tenant that lm:// objects belong to
    insecure: bool = False  # allow a non-loopback bind without a key file (anyone is admin)
    metrics_port: int | None = None  # /metrics without a key on its own listener (for Prometheus)
    metrics_host: str = "127.0.0.1"  # bind address of the metrics listener
    tls_cert: str | None = None  # PEM certificate (chain): serve HTTPS (kvstores:// for clients)
    tls_key: str | None = None  # PEM private key of tls_cert
    # Objects a failed disk write left only in memory are served but not counted as "stored".
    ack: str = "memory"  # answer a PUT once memory holds it (kill -9 loses queued disk writes) or once the disk has it
    store: StoreConfig = field(default_factory=StoreConfig)  # the tiers (the rest of the config file)

    def __post_init__(self) -> None:
        for name in ("port", "lmcache_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 < port < 65536:
                raise ConfigError(f"serve.{name} must be in 1..65535, got {port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("serve.tls_cert and serve.tls_key go together (--tls-cert and --tls-key)")
        if self.max_batch < 1:
            raise ConfigError(f"serve.max_batch must be >= 1, got {self.max_batch}")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"serve.request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.ack not in ("memory", "disk"):
            raise ConfigError(f"serve.ack must be memory or disk, got {self.ack!r}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], store: StoreConfig) -> "ServeConfig":
        """Options from a config file's ``serve:`` section, env vars or flags (strings are fine:
        each is converted to its field's type; unknown names are an error)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"store"}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown serve option(s) {sorted(unknown)}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if value is None:
                continue
            try:
                if name == "max_body_bytes":
                    kwargs[name] = parse_size(value, "serve.max_body_bytes")
                elif name in ("port", "max_batch", "lmcache_port", "metrics_port"):
                    kwargs[name] = int(value)
                elif name == "request_timeout_s":
                    kwargs[name] = float(value)
                elif name == "insecure":
                    kwargs[name] = _flag(value)
                else:
                    kwargs[name] = str(value)
            except ValueError:
                raise ConfigError(f"serve.{name}: cannot use {value!r}") from None
        return cls(store=store, **kwargs)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


def _release(exc: BaseException) -> None:
    """Drop the locals of the frames an error passed through. A handler's frame holds the
    request body (an arena region of the memory tier), and the exception's traceback, in a cycle
    with the task that ran the handler, would keep it until the garbage collector runs: every
    rejected 2 MiB body held its region, and the next puts waited for memory."""
    traceback.clear_frames(exc.__traceback__)


def _internal_error(request: Request, exc: BaseException) -> Response:
    """A bug: logged with its traceback, answered 500; the daemon keeps serving."""
    log.exception("unhandled error on %s", request.path)
    _release(exc)
    return error_response(500, "internal error (logged)")


class Daemon(ControlPlane, Application):
    def __init__(self, config: ServeConfig, keys: KeyFile | None = None) -> None:
        self.config = config
        self.keys = keys if keys is not None else KeyFile.load(config.key_file)
        # Beside the disk tier's files (a fault tier wrapping a disk has one too).
        disk = next((t for t in config.store.tiers.values() if "disk" in (t.kind, t.extra.get("wraps"))), None)
        journal = os.path.join(os.path.expanduser(str(disk.path)), "daemon-owners.journal") if disk else None
        self.store = BlobStore(config.store, owners_journal=journal)
        if config.ack == "disk" and not self.store.durable():
            self.store.close()
            raise ConfigError("serve.ack is disk, but no disk tier gets every object (add tiers.disk, with "
                              "write: through if it is not the first tier, or leave --ack at memory)")
        self.sessions = TenantSessions(self.store, ToolTTLConfig.of(config.store))
        self.metrics = Metrics(self.store.stats, self.sessions.stats)
        self.started = time.monotonic()
        self.listening = False
        self._local_only = not any(t.is_remote for t in self.store.tiers)
        self.ready = True
        first = self.store.tiers[0] if self.store.tiers else None
        budget = first.config.capacity if first is not None and not first.is_remote else None
        self._receiving_cap = (budget or 8 << 30) // 8
        self._receiving = 0  # bytes of PUT bodies being received (see _may_receive) ...
        self._receiving_by: dict[str, int] = {}  # ... and per tenant
        self._room: collections.deque[asyncio.Future] = collections.deque()
        # A control body is a msgpack map of at most max_batch keys (16 bytes, a few more framed)
        # and a few small fields: bounded, so no one makes the daemon zero a 2 GiB buffer for one.
        self._control_limit = 65536 + 64 * config.max_batch

    # ---- what service.http asks of the application ------------------------------------

    def admit(self, request: Request) -> Response | None:
        """Who is asking, from the head alone: a wrong key is refused before its body is read."""
        assert request.route is not None
        if request.route.open:
            return None
        principal = self.keys.authenticate(request.headers.get("Authorization"))
        if principal is None:
            return error_response(401, "missing or invalid API key (Authorization: Bearer KEY)")
        acting = request.headers.get(TENANT_HEADER)
        if acting:  # an operator acting on one tenant's objects (kvstore admin --tenant)
            if not principal.admin:
                return error_response(403, f"{TENANT_HEADER} needs an admin key")
            principal = dataclasses.replace(principal, tenant=acting)
        request.principal = principal
        quota = self.keys.quotas.get(principal.tenant)
        if (request.route.sink is not None and quota is not None and quota + _SMALL_BODY < request.content_length
                <= self.config.max_body_bytes):  # (past the body limit: the 413 comes first)
            # The objects alone would exceed the tenant's whole quota: refused before they take memory.
            return error_response(403, f"tenant {principal.tenant!r} quota exceeded: this put's body is "
                                       f"{request.content_length} bytes, the quota is {quota}")
        return None

    async def handle(self, request: Request) -> Response:
        assert request.route is not None
        try:
            return await bounded(request.route.handler(request), self.config.request_timeout_s)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every error is an answer
            return self.failed(request, exc)

    def failed(self, request: Request, exc: BaseException) -> Response:
        if isinstance(exc, (WireError, InvalidInputError)):
            _release(exc)
            return error_response(403 if isinstance(exc, QuotaExceededError) else 400, str(exc))
        if isinstance(exc, asyncio.TimeoutError):
            _release(exc)
            return error_response(503, f"request took longer than {self.config.request_timeout_s}s")
        if isinstance(exc, PinLimitError):  # the tier's pinned-bytes cap: a conflict, nothing was pinned
            return error_response(409, str(exc))
        if isinstance(exc, KVStoreError):
            _release(exc)
            return error_response(400, str(exc))
        return _internal_error(request, exc)  # a bug: log it, answer 500, keep serving

    def finished(self, request: Request | None, status: int) -> None:
        if request is None:  # too malformed to route
            self.metrics.requests.labels("unmatched", str(status)).inc()
            return
        request.notes["finished"] = True
        self._received(request)
        route = request.route.name if request.route is not None else "unmatched"
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - request.started)

    # ---- helpers -------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _control(self, request: Request) -> dict[str, Any]:
        return unpack_control(request.body)

    def _keys(self, body: dict[str, Any], principal: Principal) -> tuple[list[bytes], list[bytes]]:
        keys = check_keys(body.get("keys"), self.config.max_batch)
        return keys, [storage_key(principal.tenant, k) for k in keys]

    # ---- data plane ----------------------------------------------------------------------

    async def _exists(self, skeys: list[bytes]) -> list[bool]:
        # Memory and disk tiers answer from in-memory indexes: no thread hop (it would cost more
        # than the lookup). A Redis tier does network I/O, so then it runs in the pool.
        if self._local_only:
            return self.store.exists(skeys)
        return await self._run(self.store.exists, skeys)

    async def exists(self, request: Request) -> Response:
        _keys, skeys = self._keys(self._control(request), request.principal)
        return msgpack_response({"present": await self._exists(skeys)})

    async def lookup(self, request: Request) -> Response:
        _keys, skeys = self._keys(self._control(request), request.principal)
        present = await self._exists(skeys)
        hits = next((i for i, p in enumerate(present) if not p), len(present))
        return msgpack_response({"hits": hits})

    async def get(self, request: Request) -> Response:
        keys, skeys = self._keys(self._control(request), request.principal)
        # All in process memory: no I/O, so no thread hop (it costs 0.1-0.2 ms, a tenth of a
        # 2 MiB request).
        if self._local_only and self.store.in_memory(skeys):
            blobs = self.store.get(skeys, keys)
        else:
            deadline = time.monotonic() + self.config.request_timeout_s

            def abandoned() -> bool:  # asked from the pool thread between disk reads
                return request.gone() or time.monotonic() > deadline
            blobs = await self._run(self.store.get, skeys, keys, None, abandoned)
        sizes = [-1 if b is None else memoryview(b).nbytes for b in blobs]
        found = [b for b in blobs if b is not None]
        for blob in found:
            self.metrics.object_bytes.labels("get").observe(memoryview(blob).nbytes)
        self.metrics.bytes_out.inc(sum(s for s in sizes if s > 0))
        # Streamed object by object from where the tiers hold them: no response-sized buffer.
        return Response(body=batch_header(keys, sizes), content_type=BATCH_CONTENT_TYPE, parts=found)

    def _put_sink(self, request: Request, length: int) -> BodyIntake | Awaitable[BodyIntake]:
        """Where a PUT body is received, checked as it arrives (service.intake): a large one
        straight into a region of the memory tier's arena, which the put then keeps without a
        copy (unzeroed memory when the arena has no free region), a small one into its own
        bytearray. Either waits while bodies in flight hold their share (``_may_receive``)."""
        if self._may_receive(request.principal.tenant, length):
            self._reserve(request, length)
            if length < _SMALL_BODY:
                return BodyIntake(memoryview(bytearray(length)), self.config.max_batch)
        return self._put_sink_later(request, length)

    def _may_receive(self, tenant: str, length: int) -> bool:
        """Bodies being received may hold at most an eighth of the memory tier, so uploads that
        stall mid-body, until the request timeout cuts them, evict little of the cache (the
        regions they take need contiguous room, up to twice their size in evicted objects).
        Each tenant may always receive one body, so one tenant's stalled uploads cannot hold
        back another's puts. A body beyond it waits in the kernel, its client slowed."""
        return not self._receiving_by.get(tenant) or self._receiving + length <= self._receiving_cap

    def _reserve(self, request: Request, length: int) -> None:
        tenant = request.principal.tenant
        self._receiving += length
        self._receiving_by[tenant] = self._receiving_by.get(tenant, 0) + length
        request.notes["receiving"] = length

    async def _put_sink_later(self, request: Request, length: int) -> BodyIntake:
        tenant = request.principal.tenant
        if "receiving" not in request.notes:
            self.metrics.body_waits.inc()
            while not self._may_receive(tenant, length):
                room = asyncio.get_running_loop().create_future()
                self._room.append(room)
                await room
            self._reserve(request, length)
        try:
            buf = memoryview(bytearray(length)) if length < _SMALL_BODY else await self._receive_buffer(length)
            if "finished" in request.notes:  # the connection's 408 came first: nobody will release it
                raise asyncio.CancelledError
            return BodyIntake(buf, self.config.max_batch)
        except BaseException:
            self._received(request)
            raise

    def _received(self, request: Request) -> None:
        """The body's memory is stored or dropped: wake the bodies waiting for room."""
        length = request.notes.pop("receiving", 0)
        if not length:
            return
        tenant = request.principal.tenant
        self._receiving -= length
        left = self._receiving_by.pop(tenant, 0) - length
        if left:
            self._receiving_by[tenant] = left
        while self._room:
            room = self._room.popleft()
            if not room.done():
                room.set_result(None)

    async def _receive_buffer(self, length: int) -> memoryview:
        """A region of the memory tier's arena for a body. When every free byte is taken by
        objects still in flight (bodies being received, evicted objects still being sent or
        queued for disk), wait for one to be freed rather than take memory beyond the budget:
        until then the body waits in the kernel's socket buffer and the client is slowed, which
        is the back-pressure that keeps the daemon near its budget under load. After
        ``_ARENA_WAIT_S`` it takes fresh memory (counted as ``arena_misses``): a stall must
        not become a timeout."""
        buf = await self._allocate(length, fresh=False)
        if buf is None:
            self.metrics.arena_waits.inc()
        deadline = time.monotonic() + _ARENA_WAIT_S
        delay = 0.0005
        while buf is None and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)
            buf = await self._allocate(length, fresh=False)
        if buf is None:
            buf = await self._allocate(length, fresh=True)
        assert buf is not None
        return buf

    async def _allocate(self, length: int, fresh: bool) -> memoryview | None:
        # Making room evicts, and an evicted object is demoted through a writer queue that may
        # be full: on the event loop only when the queues have room.
        if self.store.put_without_waiting(length):
            return self.store.allocate(length, fresh=fresh)
        return await self._run(functools.partial(self.store.allocate, length, fresh=fresh))

    async def put(self, request: Request) -> Response:
        principal: Principal = request.principal
        intake = request.sink
        assert isinstance(intake, BodyIntake)
        self.metrics.bytes_in.inc(intake.buf.nbytes)
        objects = []
        for key, data, meta in intake.finish():  # data: a view of the body, which nothing else writes to
            objects.append(StoredObject(storage_key(principal.tenant, key), meta, data))
            self.metrics.object_bytes.labels("put").observe(data.nbytes)
        args = (objects, principal.tenant, self.keys.quotas.get(principal.tenant))
        acks = WriteAcks() if self.config.ack == "disk" else None
        put = functools.partial(self.store.put, *args, acks=acks)
        if self.store.put_without_waiting(intake.buf.nbytes, len(objects)):  # memory, and room in the writers' queues
            stored = put()
        else:
            stored = await self._run(put)
        if acks is not None:
            # Waited for without holding a thread (writers call back), so slow disk writes cannot
            # starve the pool that GETs read the disk with; the request timeout bounds the wait.
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            acks.when_done(lambda: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None)))
            await done
            stored = self.store.held_durably([o.storage_key for o in objects])
        return msgpack_response({"stored": stored})

    # ---- control plane -------------------------------------------------------------------

    async def healthz(self, _request: Request) -> Response:
        return Response(body=b"ok")

    async def readyz(self, _request: Request) -> Response:
        return Response(body=b"ready") if self.ready else Response(503, b"shutting down")

    async def metrics_view(self, request: Request) -> Response:
        """The operator's view (every tenant's usage): an admin key on the main port, or none on
        the ``--metrics-port`` listener, which binds to loopback unless told otherwise."""
        principal = request.principal
        if principal is not None and not principal.admin:
            return error_response(403, "/metrics needs an admin key (or scrape the --metrics-port listener)")
        return Response(body=generate_latest(self.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    async def openapi_view(self, _request: Request) -> Response:
        return Response(body=json.dumps(openapi(), indent=1).encode(), content_type="application/json")

    # ---- serving -------------------------------------------------------------------------

    def _routes(self) -> dict[str, dict[str, Route]]:
        routes: dict[str, dict[str, Route]] = {}
        for path, handler in (("/v1/exists", self.exists), ("/v1/lookup", self.lookup), ("/v1/get", self.get),
                              ("/v1/put", self.put), ("/v1/pin", self.pin), ("/v1/unpin", self.unpin),
                              ("/v1/delete", self.delete), ("/v1/clear", self.clear),
                              ("/v1/tool/started", self.tool_started), ("/v1/tool/finished", self.tool_finished)):
            put = path == "/v1/put"
            routes[path] = {"POST": Route(handler, path, sink=self._put_sink if put else None,
                                          max_body=None if put else self._control_limit)}
        routes["/v1/stats"] = {"GET": Route(self.stats, "/v1/stats")}
        routes["/metrics"] = {"GET": Route(self.metrics_view, "/metrics")}
        for path, handler in (("/healthz", self.healthz), ("/readyz", self.readyz),
                              ("/openapi.json", self.openapi_view)):
            routes[path] = {"GET": Route(handler, path, open=True)}
        return routes

    def limits(self) -> Limits:
        return Limits(max_body_bytes=self.config.max_body_bytes, request_timeout_s=self.config.request_timeout_s,
                      max_connections=startup.connection_limit())

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain: stop accepting, let requests in progress
        finish (20 s at most, so that queued disk writes are flushed within the 30 s an
        orchestrator usually allows), flush queued disk writes. Raises ConfigError for an address it
        cannot listen on."""
        self.routes = self._routes()
        limits = self.limits()
        self.http = HttpServer(self, limits)
        metrics = None
        try:
            try:
                await self.http.listen(self.config.host, self.config.port, startup.tls_context(self.config))
            except OSError as exc:  # a port in use, an address this host does not have
                raise _bind_error(self.config.host, self.config.port, exc, "--port") from None
            if self.config.lmcache_port is not None:
                from kvstore.service.lmcache_server import LMCacheListener

                self.lmcache = LMCacheListener(self.store, self.config.lmcache_tenant, self.config.max_body_bytes,
                                               self.keys.quotas.get(self.config.lmcache_tenant), self.metrics)
                try:
                    self.lmcache.start(self.config.lmcache_host, self.config.lmcache_port)
                except OSError as exc:
                    raise _bind_error(self.config.lmcache_host, self.config.lmcache_port, exc, "--lmcache-port") from None
            if self.config.metrics_port is not None:
                metrics = HttpServer(_MetricsOnly(self), limits)
                try:
                    await metrics.listen(self.config.metrics_host, self.config.metrics_port)
                except OSError as exc:
                    raise _bind_error(self.config.metrics_host, self.config.metrics_port, exc, "--metrics-port") from None
            self.listening = True
            log.info("%s", startup.started_line(self.config, self.keys))
            await stop.wait()
        finally:
            self.ready = False
            if getattr(self, "lmcache", None) is not None:
                self.lmcache.stop()
            for server in (metrics, self.http):
                if server is not None:
                    await server.shutdown(20)
            # In-flight requests are done; flush queued disk writes so a restart serves them again.
            await self._run(self.store.close)
        if not self.listening:
            return
        served = sum(int(s.value) for m in self.metrics.requests.collect() for s in m.samples
                     if s.name.endswith("_total"))
        log.info("kvstore daemon stopped after %.0f s and %d requests; queued writes flushed",
                 time.monotonic() - self.started, served)


class _MetricsOnly(Application):
    """The ``--metrics-port`` listener: /metrics and nothing else, without a key."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.routes = {"/metrics": {"GET": Route(daemon.metrics_view, "/metrics", open=True)}}

    def admit(self, request: Request) -> Response | None:
        return None

    async def handle(self, request: Request) -> Response:
        return await self.daemon.handle(request)

    def failed(self, request: Request, exc: BaseException) -> Response:
        return self.daemon.failed(request, exc)

    def finished(self, request: Request | None, status: int) -> None:
        pass


def serve(config: ServeConfig) -> None:
    """Run the daemon until SIGINT/SIGTERM. Raises ConfigError (one line for the CLI) for a
    configuration it must not serve and for a port it cannot listen on."""
    keys = KeyFile.load(config.key_file)
    startup.check(config, keys)
    startup.limit_malloc_arenas()
    daemon = Daemon(config, keys)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await daemon.run(stop)

    asyncio.run(main())


def _bind_error(host: str, port: int, exc: OSError, flag: str) -> ConfigError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return ConfigError(f"cannot listen on {host}:{port} ({flag}): {reason}")
