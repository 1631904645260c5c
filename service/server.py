"""``kvstore serve``: the shared cache daemon (aiohttp).

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
import dataclasses
import functools
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvstore.blobstore import BlobStore, QuotaExceededError, StoredObject
from kvstore.config import StoreConfig, parse_size
from kvstore.errors import ConfigError, InvalidInputError, KVStoreError, PinLimitError
from kvstore.service import startup
from kvstore.agents import ToolTTLConfig
from kvstore.service.auth import KeyFile, Principal, storage_key
from kvstore.service.control import ControlPlane, TenantSessions, error_response, msgpack_response
from kvstore.service.intake import BodyIntake
from kvstore.service.metrics import Metrics
from kvstore.service.openapi import openapi
from kvstore.client import TENANT_HEADER
from kvstore.writer import WriteAcks
from kvstore.wire import BATCH_CONTENT_TYPE, WireError, batch_header, check_keys, unpack_control

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_ARENA_WAIT_S = 1.0  # longest a body waits for arena memory before it takes fresh memory
_SEND_SLICE = 256 << 10  # GET responses are written in slices of this size (see Daemon.get)
# aiohttp buffers up to twice this per connection before it pauses the socket: enough that it
# does not pause every 64 KiB (its default), little enough that 64 uploads hold 32 MiB at most.
_READ_CHUNK = 256 << 10
_OPEN = {"/healthz", "/readyz", "/openapi.json"}
_timeout = getattr(asyncio, "timeout", None)


@dataclass
class ServeConfig:
    """The daemon's own options (``serve:`` in a config file, ``KVSTORE_SERVE_*``, flags)."""

    host: str = "127.0.0.1"  # bind address; beyond loopback it needs key_file (or insecure)
    port: int = 8765  # HTTP port
    key_file: str | None = None  # YAML of API keys -> tenants and quotas (none: open, one admin tenant)
    max_body_bytes: int = 2 * 1024**3  # largest request body
    max_batch: int = 4096  # most keys per request
    request_timeout_s: float = 120.0  # a request running longer is answered 503
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


async def _next_chunk(content: Any) -> bytes:
    """The next piece of a body as aiohttp received it (b"" at its end). ``readany`` joins
    every piece waiting into a new bytes object, a copy of what is about to be copied into the
    receive buffer anyway; ``readchunk`` hands them over one at a time."""
    while True:
        data, end_of_http_chunk = await content.readchunk()
        if data or not end_of_http_chunk:  # (b"", True): the end of a chunked-encoding piece
            return data


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _internal_error(request: web.Request, exc: BaseException) -> web.Response:
    """A bug: logged with its traceback, answered 500; the daemon keeps serving."""
    log.exception("unhandled error on %s", request.path)
    _release(exc)
    return error_response(500, "internal error (logged)")


class Daemon(ControlPlane):
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

    # ---- middleware ----------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        t0 = time.perf_counter()
        status = 500
        try:
            # An unknown path or method is a 404/405 for anyone; only real routes need a key.
            if request.path not in _OPEN and request.match_info.http_exception is None:
                principal = self.keys.authenticate(request.headers.get("Authorization"))
                if principal is None:
                    status = 401
                    return error_response(401, "missing or invalid API key (Authorization: Bearer KEY)")
                acting = request.headers.get(TENANT_HEADER)
                if acting:  # an operator acting on one tenant's objects (kvstore admin --tenant)
                    if not principal.admin:
                        status = 403
                        return error_response(403, f"{TENANT_HEADER} needs an admin key")
                    principal = dataclasses.replace(principal, tenant=acting)
                request["principal"] = principal
            if _timeout is not None:  # Python >= 3.11: no task per request, as wait_for makes
                async with _timeout(self.config.request_timeout_s):
                    resp = await handler(request)
            else:
                resp = await asyncio.wait_for(handler(request), self.config.request_timeout_s)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            if exc.status == 413:
                return error_response(413, f"request body exceeds the limit of {self.config.max_body_bytes} bytes")
            raise
        except (WireError, InvalidInputError) as exc:
            status = 403 if isinstance(exc, QuotaExceededError) else 400
            _release(exc)
            return error_response(status, str(exc))
        except ConnectionError as exc:
            # The client went away mid-body or mid-response (aiohttp says ConnectionResetError
            # while reading, a plain ConnectionError("Connection lost") while draining a write):
            # not ours. Any other connection error is a bug, below.
            if not isinstance(exc, ConnectionResetError) and not _client_gone(request):
                status = 500
                return _internal_error(request, exc)
            status = 499  # nginx's "client closed request": counted, not logged as an error
            _release(exc)
            return error_response(499, "client closed the connection")
        except asyncio.TimeoutError as exc:
            status = 503
            _release(exc)
            return error_response(503, f"request took longer than {self.config.request_timeout_s}s")
        except PinLimitError as exc:  # the tier's pinned-bytes cap: a conflict, nothing was pinned
            status = 409
            return error_response(409, str(exc))
        except KVStoreError as exc:
            status = 400
            _release(exc)
            return error_response(400, str(exc))
        except Exception as exc:  # a bug: log it, answer 500, keep serving
            return _internal_error(request, exc)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

    # ---- helpers -------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _control(self, request: web.Request) -> dict[str, Any]:
        return unpack_control(await request.read())

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

    async def exists(self, request: web.Request) -> web.Response:
        _keys, skeys = self._keys(await self._control(request), request["principal"])
        return msgpack_response({"present": await self._exists(skeys)})

    async def lookup(self, request: web.Request) -> web.Response:
        _keys, skeys = self._keys(await self._control(request), request["principal"])
        present = await self._exists(skeys)
        hits = next((i for i, p in enumerate(present) if not p), len(present))
        return msgpack_response({"hits": hits})

    async def get(self, request: web.Request) -> web.StreamResponse:
        keys, skeys = self._keys(await self._control(request), request["principal"])
        # All in process memory: no I/O, so no thread hop (it costs 0.1-0.2 ms, a tenth of a
        # 2 MiB request).
        local = self._local_only and self.store.in_memory(skeys)
        if local:
            blobs = self.store.get(skeys, keys)
        else:
            deadline = time.monotonic() + self.config.request_timeout_s

            def abandoned() -> bool:  # asked from the pool thread between disk reads
                transport = request.transport
                return transport is None or transport.is_closing() or time.monotonic() > deadline
            blobs = await self._run(self.store.get, skeys, keys, None, abandoned)
        sizes = [-1 if b is None else memoryview(b).nbytes for b in blobs]
        resp = web.StreamResponse(headers={"Content-Type": BATCH_CONTENT_TYPE})
        resp.content_length = len(batch_header(keys, sizes)) + sum(s for s in sizes if s > 0)
        await resp.prepare(request)
        await resp.write(batch_header(keys, sizes))
        for blob in blobs:  # streamed object by object: no response-sized buffer
            if blob is not None:
                view = memoryview(blob).cast("B")
                # In slices: what the socket does not take at once is copied into the transport's
                # buffer (Python 3.11), so a whole 2 MiB write to a slow reader would hold a second
                # copy of the object outside the memory budget; each slice waits for the last.
                for at in range(0, view.nbytes, _SEND_SLICE):
                    await resp.write(view[at:at + _SEND_SLICE])
                self.metrics.bytes_out.inc(view.nbytes)
                self.metrics.object_bytes.labels("get").observe(view.nbytes)
        await resp.write_eof()
        return resp

    async def _intake(self, request: web.Request) -> BodyIntake:
        """The body, checked as it arrives (service.intake). A large one goes straight into one
        buffer of its Content-Length from the memory tier's arena (unzeroed memory when it has
        no free region): aiohttp's ``read()`` grows a bytearray chunk by chunk and then copies
        it into bytes."""
        length = request.content_length
        if length is None or length < 65536:
            intake = BodyIntake(memoryview(await request.read()), self.config.max_batch)
            intake.feed(intake.buf.nbytes)
            return intake
        if length > self.config.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.config.max_body_bytes, actual_size=length)
        # Memory only once the body starts: a connection that announces a length and sends
        # nothing holds none.
        chunk = await _next_chunk(request.content)
        if not chunk:
            raise WireError(f"request body ended before its first byte (Content-Length {length})")
        buf = await self._receive_buffer(length)
        raise_limit = getattr(request.content, "set_read_chunk_size", None)
        if raise_limit is not None:  # aiohttp >= 3.13: else the socket pauses every 64 KiB
            raise_limit(min(length, _READ_CHUNK))
        intake = BodyIntake(buf, self.config.max_batch)
        got = 0
        while True:
            if not chunk or got + len(chunk) > length:
                raise WireError(f"request body does not match its Content-Length {length} ({got + len(chunk)} bytes)")
            buf[got:got + len(chunk)] = chunk
            got += len(chunk)
            intake.feed(got)
            if got == length:
                return intake
            chunk = await _next_chunk(request.content)

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

    async def put(self, request: web.Request) -> web.Response:
        principal: Principal = request["principal"]
        intake = await self._intake(request)
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

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ready") if self.ready else web.Response(text="shutting down", status=503)

    async def metrics_view(self, request: web.Request) -> web.Response:
        """The operator's view (every tenant's usage): an admin key on the main port, or none on
        the ``--metrics-port`` listener, which binds to loopback unless told otherwise."""
        principal = request.get("principal")
        if principal is not None and not principal.admin:
            return error_response(403, "/metrics needs an admin key (or scrape the --metrics-port listener)")
        resp = web.Response(body=generate_latest(self.metrics.registry))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    async def openapi_view(self, _request: web.Request) -> web.Response:
        return web.json_response(openapi(), dumps=lambda d: json.dumps(d, indent=1))

    # ---- app -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=self.config.max_body_bytes)
        r = app.router
        for path, handler in (("/v1/exists", self.exists), ("/v1/lookup", self.lookup), ("/v1/get", self.get),
                              ("/v1/put", self.put), ("/v1/pin", self.pin), ("/v1/unpin", self.unpin),
                              ("/v1/delete", self.delete), ("/v1/clear", self.clear),
                              ("/v1/tool/started", self.tool_started), ("/v1/tool/finished", self.tool_finished)):
            r.add_post(path, handler)
        r.add_get("/v1/stats", self.stats)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics_view)
        r.add_get("/openapi.json", self.openapi_view)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        if self.config.lmcache_port is not None:
            from kvstore.service.lmcache_server import LMCacheListener

            self.lmcache = LMCacheListener(self.store, self.config.lmcache_tenant, self.config.max_body_bytes,
                                           self.keys.quotas.get(self.config.lmcache_tenant), self.metrics)
            try:
                self.lmcache.start(self.config.lmcache_host, self.config.lmcache_port)
            except OSError as exc:
                raise _bind_error(self.config.lmcache_host, self.config.lmcache_port, exc, "--lmcache-port") from None
        if self.config.metrics_port is not None:
            metrics_app = web.Application()
            metrics_app.router.add_get("/metrics", self.metrics_view)
            self._metrics_runner = web.AppRunner(metrics_app, access_log=None)
            await self._metrics_runner.setup()
            try:
                await web.TCPSite(self._metrics_runner, self.config.metrics_host, self.config.metrics_port).start()
            except OSError as exc:
                raise _bind_error(self.config.metrics_host, self.config.metrics_port, exc, "--metrics-port") from None

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.ready = False
        if getattr(self, "lmcache", None) is not None:
            self.lmcache.stop()
        if getattr(self, "_metrics_runner", None) is not None:
            await self._metrics_runner.cleanup()

    async def _on_cleanup(self, _app: web.Application) -> None:
        # In-flight requests are done; flush queued disk writes so a restart serves them again.
        await self._run(self.store.close)
        if not self.listening:
            return
        served = sum(int(s.value) for m in self.metrics.requests.collect() for s in m.samples
                     if s.name.endswith("_total"))
        log.info("kvstore daemon stopped after %.0f s and %d requests; queued writes flushed",
                 time.monotonic() - self.started, served)


def serve(config: ServeConfig) -> None:
    """Run the daemon until SIGINT/SIGTERM. Raises ConfigError (one line for the CLI) for a
    configuration it must not serve and for a port it cannot listen on."""
    keys = KeyFile.load(config.key_file)
    startup.check(config, keys)
    startup.limit_malloc_arenas()
    daemon = Daemon(config, keys)

    def listening(_aiohttp_banner: str) -> None:  # called once the port is bound
        daemon.listening = True
        log.info("%s", startup.started_line(config, keys))

    try:
        web.run_app(daemon.app(), host=config.host, port=config.port, shutdown_timeout=30, print=listening,
                    access_log=None, ssl_context=startup.tls_context(config))
    except OSError as exc:  # the bind: a port in use, an address this host does not have
        raise _bind_error(config.host, config.port, exc, "--port") from None


def _bind_error(host: str, port: int, exc: OSError, flag: str) -> ConfigError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return ConfigError(f"cannot listen on {host}:{port} ({flag}): {reason}")
