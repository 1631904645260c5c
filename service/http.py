"""The daemon's HTTP/1.1 server: an ``asyncio.BufferedProtocol`` that receives a body straight
into the buffer its route chose (a region of the memory tier's arena for a PUT).

Why not aiohttp's server: a PUT body went kernel -> a fresh ``bytes`` per socket read (asyncio)
-> another fresh ``bytes`` per HTTP piece (aiohttp's parser) -> the arena, three copies and two
allocations per byte on the daemon's one event-loop thread, against Redis's one copy. Here the
kernel writes into the arena and nothing copies it again: with 8 clients a 2 MiB PUT ran at
1.7-2.2x raw redis-py where the aiohttp daemon ran at 0.84-0.98x (same run, same client).

What it speaks: HTTP/1.1 and 1.0 with keep-alive and pipelining (one request at a time per
connection, answered in order), HEAD, ``Content-Length`` bodies, ``Expect: 100-continue``, TLS
through ``ssl=``. A chunked request body is refused with 411 (every kvstore client, curl with a
file and aiohttp with bytes all send a length). The head is limited to :data:`MAX_HEAD` bytes;
a body refused before it was read (401, 404, 413, ...) is read and dropped for up to
``linger_s`` so that the client, which sends its whole body before it reads, sees the answer,
and a connection is closed the lingering way (FIN, then what the client still sends is dropped)
for the same reason. The application (:class:`Application`) never sees a malformed request, and
its handlers never write to the socket: they return a :class:`Response`, which the connection
sends with back-pressure.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, Awaitable, Mapping

from kvstore.service.http_messages import (MAX_HEAD, Application, HeadError, Limits, PlainSink, Request, Response,
                                           Sink, error_response, parse_head, response_head)

log = logging.getLogger(__name__)

_HEAD_START = 4 << 10  # a connection's head buffer to begin with (most heads are a few hundred bytes) ...
_HEAD_ROOM = 64 << 10  # ... grown up to this for a long head (MAX_HEAD and its end) or pipelined requests
_SEND_SLICE = 256 << 10  # response parts are written in slices of this size (see Connection._send)


_IDLE, _HEAD, _BODY, _BUSY, _DISCARD_BODY, _CLOSING, _CLOSED = range(7)


class Connection(asyncio.BufferedProtocol):
    """One client connection: a state machine over the head buffer and the current body's sink.

    States: idle (waiting for a request; the keep-alive timer runs), head (part of a head is
    here; the head timer runs), body (receiving into the sink; the request's deadline runs),
    busy (the handler runs or the answer is being sent; what arrives meanwhile waits in the head
    buffer, and reading pauses when that is full), discard (a refused body is read and dropped).
    """

    def __init__(self, server: "HttpServer") -> None:
        self.server = server
        self.app = server.app
        self.limits = server.limits
        self.head = bytearray(_HEAD_START)
        self.n = 0  # bytes held in self.head
        self.state = _IDLE
        self.request: Request | None = None
        self.got = 0  # body bytes in the sink
        self.left = 0  # body bytes still to drop (discard)
        self.keep_alive = True
        self.expecting = False  # the request asked for 100 Continue and has not had it
        self.progress = 0.0  # when body bytes last arrived
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None  # cuts a close that does not finish
        self._task: asyncio.Task | None = None  # the handler, or a refusal being sent
        self._sink_task: asyncio.Task | None = None  # waiting for the memory a body goes into
        self._paused_reading = False
        self._paused_writing = False
        self._drained: asyncio.Future | None = None

    # ---- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.server.connections) >= self.limits.max_connections:
            self.server.refused_connection()
            self.state = _CLOSED
            transport.abort()
            return
        transport.set_write_buffer_limits(high=_SEND_SLICE)
        self.server.connections.add(self)
        self._arm(self.limits.keepalive_s)

    def connection_lost(self, exc: BaseException | None) -> None:
        receiving = self.request if self.state == _BODY else None
        self.state = _CLOSED
        self.server.connections.discard(self)
        self._disarm()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("client closed the connection"))
        if self._sink_task is not None:
            self._sink_task.cancel()  # waiting for memory for a body that will not come
        if receiving is not None:  # gone mid-body: counted, and what it reserved released
            self.app.finished(receiving, 499)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        self.progress = time.monotonic()
        if self.state == _BUSY and self._timer is not None:  # the client reads: its send deadline restarts
            self._arm(self.limits.request_timeout_s)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # the client is done: close (a half-closed client gets no answer, as in aiohttp)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.state == _BODY and self.request is not None and self.request.sink is not None:
            return self.request.sink.buf[self.got:]
        if self.state == _DISCARD_BODY:
            return memoryview(self.head)[:min(self.left, len(self.head))]
        if self.state == _CLOSING:  # what the client still sends is dropped
            return memoryview(self.head)
        return memoryview(self.head)[self.n:]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._received(nbytes)
        except Exception:  # a bug (ours or the application's sink): never the event loop's problem
            log.exception("error while receiving a request; closing the connection")
            self._refuse_malformed(500, "internal error (logged)")

    def _received(self, nbytes: int) -> None:
        if self.state == _BODY and self.request is not None and self.request.sink is not None:
            self.got += nbytes
            self.progress = time.monotonic()
            self.request.sink.feed(self.got)
            if self.got == self.request.content_length:
                self._body_done()
            return
        if self.state == _DISCARD_BODY:
            self.left -= nbytes
            if self.left == 0:
                self._next()
            return
        if self.state == _CLOSING:
            return
        self.n += nbytes
        self._step()

    # ---- the state machine ------------------------------------------------------------

    def _step(self) -> None:
        """Act on what the head buffer holds."""
        if self.state in (_IDLE, _HEAD):
            self._read_head()
        elif self.state == _BODY:
            if self.request is not None and self.request.sink is None and self.n and self._sink_task is None:
                self._start_body()
        if self.state in (_BUSY, _BODY) and self.n == len(self.head):
            self._pause()  # a pipelined request waits in the kernel until this one is answered

    def _read_head(self) -> None:
        if self.n and self.head[0] in b"\r\n":  # blank lines before a request are allowed
            self._consume(self.n - len(self.head[:self.n].lstrip(b"\r\n")))
        end = self.head.find(b"\r\n\r\n", 0, min(self.n, MAX_HEAD + 4))
        if end < 0:
            if self.head.find(b"\n\n", 0, min(self.n, MAX_HEAD + 2)) >= 0:
                self._refuse_malformed(400, "header lines must end with CRLF")
            elif self.n >= MAX_HEAD + 4:
                self._refuse_malformed(431, f"request head exceeds {MAX_HEAD} bytes")
            else:
                if self.n == len(self.head):  # a new buffer: asyncio still holds a view of this one
                    grown = bytearray(_HEAD_ROOM)
                    grown[:self.n] = self.head
                    self.head = grown
                if self.n and self.state == _IDLE:
                    self.state = _HEAD
                    self._arm(self.limits.head_timeout_s)
            return
        try:
            request = parse_head(bytes(self.head[:end]), self.transport)
        except HeadError as exc:
            self._refuse_malformed(exc.status, str(exc))
            return
        self._consume(end + 4)
        self.request = request
        self.got = 0
        conn = request.headers.get("connection", "").lower()
        self.keep_alive = "close" not in conn if request.version == "HTTP/1.1" else "keep-alive" in conn
        self._arm(self.limits.request_timeout_s)
        methods = self.app.routes.get(request.path)
        if methods is None:
            self._refuse(404, f"no such path {request.path}")
            return
        route = methods.get(request.method)
        if route is None and request.method == "HEAD" and "GET" in methods:
            route, request.head_only = methods["GET"], True
        if route is None:
            allowed = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
            self._refuse(405, f"{request.path} takes {allowed}", {"Allow": allowed})
            return
        request.route = route
        self.expecting = request.headers.get("expect", "").lower() == "100-continue" and request.content_length > 0
        answer = self.app.admit(request)
        if answer is not None:
            self._refuse_with(answer)
            return
        limit = self.limits.max_body_bytes if route.max_body is None else min(route.max_body, self.limits.max_body_bytes)
        if request.content_length > limit:
            self._refuse(413, f"request body exceeds the limit of {limit} bytes")
            return
        self.state = _BODY
        if request.content_length == 0:
            self._start_body()
            return
        if self.expecting:
            self.expecting = False
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.n:
            self._start_body()
        # else: memory for the body only once its first byte is here (a client that announces
        # a length and sends nothing holds none)

    def _start_body(self) -> None:
        request = self.request
        assert request is not None and request.route is not None
        factory = request.route.sink or (lambda _r, length: PlainSink(length))
        try:
            sink = factory(request, request.content_length)
        except Exception as exc:  # noqa: BLE001 - the application's answer, never the loop's
            self._refuse_with(self.app.failed(request, exc))
            return
        if inspect.isawaitable(sink):
            self._pause()
            self._sink_task = asyncio.ensure_future(self._await_sink(sink))
            return
        self._receive_into(sink)

    async def _await_sink(self, pending: Awaitable[Sink]) -> None:
        request = self.request
        assert request is not None
        try:
            sink = await pending
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001
            self._sink_task = None
            if not self._gone():
                self._refuse_with(self.app.failed(request, exc))
            return
        self._sink_task = None
        if self._gone():
            return
        self._receive_into(sink)
        self._resume()

    def _receive_into(self, sink: Sink) -> None:
        request = self.request
        assert request is not None
        request.sink = sink
        take = min(self.n, request.content_length)
        sink.buf[:take] = self.head[:take]
        self._consume(take)
        self.got = take
        sink.feed(take)
        if self.got == request.content_length:
            self._body_done()

    def _body_done(self) -> None:
        self.state = _BUSY
        self._disarm()
        self._task = asyncio.ensure_future(self._answer())

    async def _answer(self) -> None:
        request = self.request
        assert request is not None
        response = await self.app.handle(request)
        self._arm(self.limits.request_timeout_s)  # a client that does not read its answer is cut
        status = await self._send(response, not self.keep_alive or self.server.stopping)
        self._disarm()
        self._task = None
        self.app.finished(request, status)
        self._next()

    def _next(self) -> None:
        """The request is answered: close, or go on with the next one."""
        self.request = None
        if self._gone():
            return
        if not self.keep_alive or self.server.stopping:
            self._close()
            return
        self.state = _IDLE
        self._arm(self.limits.keepalive_s)
        self._resume()
        if self.n:
            self._step()

    # ---- refusals ---------------------------------------------------------------------

    def _refuse(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        response = error_response(status, message)
        response.headers = headers
        self._refuse_with(response)

    def _refuse_with(self, response: Response) -> None:
        """Answer before (or instead of) the body, then drop the body for up to linger_s so that
        the client reads the answer, then go on (or close if it would take longer)."""
        request = self.request
        assert request is not None
        self.state = _BUSY
        if self.expecting:  # refused before its 100 Continue: the client may or may not send the body
            self.keep_alive = False
        self._task = asyncio.ensure_future(self._refusal(request, response))

    async def _refusal(self, request: Request, response: Response) -> None:
        left = request.content_length - self.got
        status = await self._send(response, not self.keep_alive or self.server.stopping)
        self._task = None
        self.app.finished(request, status)
        request.sink = None
        if self._gone():
            return
        if self.expecting or self.server.stopping:
            self._close()
            return
        staged = min(self.n, left)
        self._consume(staged)
        self.left = left - staged
        if self.left == 0:
            self._next()
            return
        self.state = _DISCARD_BODY
        self._arm(self.limits.linger_s)
        self._resume()

    def _refuse_malformed(self, status: int, message: str) -> None:
        """A head that cannot be parsed: the stream is out of step, so answer and close."""
        self.keep_alive = False
        self.state = _BUSY
        self.n = 0
        self._say(error_response(status, message))
        self.app.finished(self.request, status)  # None when no request was parsed
        self.request = None
        self._close()

    # ---- I/O helpers ------------------------------------------------------------------

    async def _send(self, response: Response, close: bool) -> int:
        """Write the answer; its status, or 499 if the client left first."""
        if self._gone():
            return 499
        request = self.request
        head_only = request is not None and request.head_only
        body = b"" if head_only else response.body
        parts = () if head_only else response.parts
        head = response_head(response.status, response.content_type, response.length, close, response.headers,
                     request is not None and request.version == "HTTP/1.0")
        self.keep_alive = self.keep_alive and not close
        try:
            if memoryview(body).nbytes <= _SEND_SLICE:
                self._write(head + bytes(body))
            else:
                self._write(head)
                await self._write_slices(body)
            for part in parts:
                await self._write_slices(part)
            if self._paused_writing:
                await self._drain()
        except ConnectionError:
            return 499
        return 499 if self._gone() else response.status

    async def _write_slices(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        for at in range(0, view.nbytes, _SEND_SLICE):
            if self._paused_writing:
                await self._drain()
            if self._gone():
                raise ConnectionResetError("client closed the connection")
            self._write(view[at:at + _SEND_SLICE])

    async def _drain(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()
        try:
            await self._drained
        finally:
            self._drained = None

    def _gone(self) -> bool:
        """Closed or closing: nothing more is written, and a request in progress is abandoned."""
        return self.state in (_CLOSING, _CLOSED)

    def _say(self, response: Response) -> None:
        """A small answer written at once, the connection to be closed after it."""
        self._write(response_head(response.status, response.content_type, response.length, True) + bytes(response.body))

    def _write(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self._gone():
            self.transport.write(data)

    def _consume(self, nbytes: int) -> None:
        if nbytes:
            self.head[:self.n - nbytes] = self.head[nbytes:self.n]
            self.n -= nbytes

    def _pause(self) -> None:
        if not self._paused_reading and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            self._paused_reading = True

    def _resume(self) -> None:
        if self._paused_reading and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._paused_reading = False

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.state == _BUSY:  # the client does not read its answer: cut, and the answer's memory freed
            self._abort()
            return
        response = None
        if self.state == _BODY and self.request is not None:
            request, self.keep_alive = self.request, False
            got = self.got if request.sink is not None else 0
            response = error_response(408, f"request body not received within {self.limits.request_timeout_s}s "
                                   f"({got} of {request.content_length} bytes)")
            self.app.finished(request, 408)
            self.request = None
            if self._sink_task is not None:  # waiting for memory or room: no longer wanted
                self._sink_task.cancel()
                self._sink_task = None
        elif self.state == _HEAD:
            response = error_response(408, f"request head not received within {self.limits.head_timeout_s}s")
            self.app.finished(None, 408)
        if response is not None:
            self._say(response)
        self._close()

    def _close(self) -> None:
        """A lingering close: send what is written and a FIN, then read and drop what the client
        still sends until it closes too. Closing with unread bytes would make the kernel answer
        with a reset, and a client still sending its body would lose the answer written before
        it. Cut after linger_s (a client that reads nothing would otherwise hold the connection,
        and what it was sent, forever)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._gone():
            return
        idle = self.state == _IDLE and not self.n
        self.state = _CLOSING
        self._disarm()
        self.request = None
        self._linger = asyncio.get_running_loop().call_later(self.limits.linger_s, self._abort)
        if idle:  # nothing unread: a plain close
            transport.close()
        elif transport.can_write_eof():
            transport.write_eof()
            self._resume()
        else:  # TLS: close_notify, then asyncio waits for the client's
            transport.close()

    def _abort(self) -> None:
        if self.state != _CLOSED and self.transport is not None:
            self.transport.abort()

    def idle(self) -> bool:
        """Whether shutdown may close it now: no request in progress, or a body that has not
        started or has stalled for a second (it would hold the drain to its full timeout)."""
        if self._task is not None:  # answering: idle only if the client has stopped reading
            return self._paused_writing and time.monotonic() - self.progress > 1.0
        if self.state == _BODY and self.request is not None and self.request.sink is not None:
            return time.monotonic() - self.progress > 1.0
        return True


class HttpServer:
    """Listeners for one application; ``shutdown`` stops accepting, lets requests in progress
    finish (up to a timeout) and closes every connection."""

    def __init__(self, app: Application, limits: Limits) -> None:
        self.app = app
        self.limits = limits
        self.connections: set[Connection] = set()
        self.stopping = False
        self._servers: list[asyncio.AbstractServer] = []
        self._refused_at = 0.0

    async def listen(self, host: str, port: int, ssl: Any = None) -> None:
        """Raises OSError when the address cannot be bound."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Connection(self), host, port, ssl=ssl, reuse_address=True)
        self._servers.append(server)

    def refused_connection(self) -> None:
        now = time.monotonic()
        if now - self._refused_at > 60:  # said once a minute, not once per connection
            self._refused_at = now
            log.warning("%d connections open (max_connections): closing new ones until some close",
                        len(self.connections))

    async def shutdown(self, timeout_s: float) -> None:
        self.stopping = True
        for server in self._servers:
            server.close()
        deadline = time.monotonic() + timeout_s
        while True:
            busy = False
            for conn in list(self.connections):
                if conn.idle():
                    conn._close()
                else:
                    busy = True
            if not busy or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        # Closed connections flush their last answer; a TLS one also waits for the client's
        # close_notify, which a client that is gone never sends: cut what is left after a second.
        grace = time.monotonic() + 1.0
        while self.connections and time.monotonic() < grace:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn._abort()
        for server in self._servers:
            await server.wait_closed()
