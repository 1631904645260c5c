"""What the daemon's HTTP server (service.http) and the application it serves exchange: the
parsed request, the answer, routes, the application's interface, limits, and the request-head
parser. Apart from the connection's state machine so that each file has one job."""

from __future__ import annotations

import asyncio
import json
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence, Union

MAX_HEAD = 32 << 10
"""Largest request line plus headers (aiohttp allowed 8 KiB per line)."""
MAX_HEADERS = 100
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_timeout = getattr(asyncio, "timeout", None)


class Sink(Protocol):
    """Where a body is received: ``buf`` of exactly the body's length, and ``feed(got)`` called
    each time more of it has landed (``got`` bytes from the start), e.g. to check it as it comes."""

    buf: memoryview

    def feed(self, got: int) -> None: ...


class PlainSink:
    """A body into a bytearray of its length, nothing done as it arrives."""

    def __init__(self, length: int) -> None:
        self.buf = memoryview(bytearray(length))

    def feed(self, got: int) -> None:
        pass


class Headers(dict):
    """Header names in lower case; lookups by any case."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())


@dataclass
class Response:
    """What a handler answers. ``parts`` (objects' bytes) follow ``body`` and are sent in slices,
    each once the socket has taken the one before, so a slow reader never makes the daemon hold a
    second copy of an object."""

    status: int = 200
    body: bytes | memoryview = b""
    content_type: str = "text/plain; charset=utf-8"
    parts: Sequence[Any] = ()
    headers: Mapping[str, str] | None = None

    @property
    def length(self) -> int:
        return memoryview(self.body).nbytes + sum(memoryview(p).nbytes for p in self.parts)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode(), "application/json")


SinkFactory = Callable[["Request", int], Union[Sink, Awaitable[Sink]]]


@dataclass
class Route:
    handler: Callable[["Request"], Awaitable[Response]]
    name: str  # its label in metrics
    open: bool = False  # answered without an API key
    sink: SinkFactory | None = None  # where its body goes (PlainSink when None); may be async
    max_body: int | None = None  # its largest body (Limits.max_body_bytes when None)


@dataclass(eq=False)
class Request:
    method: str
    path: str
    query: str
    version: str
    headers: Headers
    transport: asyncio.BaseTransport
    route: Route | None = None
    content_length: int = 0
    sink: Sink | None = None  # the body as received (set before the handler runs)
    principal: Any = None  # who is asking (set by Application.admit)
    started: float = field(default_factory=time.perf_counter)
    notes: dict[str, Any] = field(default_factory=dict)  # the application's own, e.g. memory it reserved
    head_only: bool = False  # a HEAD request, answered as its GET without the body

    @property
    def body(self) -> memoryview:
        return self.sink.buf if self.sink is not None else memoryview(b"")

    def gone(self) -> bool:
        """The client closed the connection (asked by long handlers between steps)."""
        return self.transport.is_closing()


class Application(ABC):
    """What a :class:`HttpServer` serves. The server does the HTTP; the application decides who
    may ask (``admit``), answers (``handle``, which never raises) and counts (``finished``)."""

    routes: Mapping[str, Mapping[str, Route]]  # path -> method -> route

    @abstractmethod
    def admit(self, request: Request) -> Response | None:
        """Called once the head is parsed, before any of the body is read: None to go on, or the
        answer (e.g. 401). Must not block."""

    @abstractmethod
    async def handle(self, request: Request) -> Response:
        """The body is in ``request.sink``: the answer. Errors are answers, never exceptions."""

    @abstractmethod
    def failed(self, request: Request, exc: BaseException) -> Response:
        """The answer when the route's sink factory raised (e.g. no memory for the body)."""

    @abstractmethod
    def finished(self, request: Request | None, status: int) -> None:
        """A request is over: answered with ``status``, or 499 when the client left first (also
        mid-body); called once per request. ``request`` is None for one too malformed to route."""


@dataclass
class Limits:
    max_body_bytes: int = 2 * 1024**3
    request_timeout_s: float = 120.0  # from the head to the last byte of the body
    keepalive_s: float = 75.0  # an idle kept-alive connection is closed after this
    head_timeout_s: float = 30.0  # a started head must be complete within this
    linger_s: float = 10.0  # a refused body is read and dropped for this long, then the connection closed
    max_connections: int = 10000  # more are closed at once (each holds a file descriptor and a few KiB)


class HeadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(data: bytes, transport: asyncio.BaseTransport) -> Request:
    """A request line and headers (without the blank line that ends them); raises HeadError."""
    lines = data.split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise HeadError(431, f"more than {MAX_HEADERS} header fields")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise HeadError(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HeadError(505 if version.startswith(b"HTTP/") else 400, "only HTTP/1.1 and HTTP/1.0 are served")
    if target.startswith(b"http://") or target.startswith(b"https://"):  # absolute form
        slash = target.find(b"/", target.index(b"//") + 2)
        target = target[slash:] if slash >= 0 else b"/"
    if not target.startswith(b"/"):
        raise HeadError(400, "request target must be a path")
    path, _, query = target.partition(b"?")
    headers = Headers()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):  # also a folded line (it starts with a space)
            raise HeadError(400, "malformed header field")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise HeadError(400, "conflicting Content-Length fields")
            if key in ("content-length", "host", "authorization"):
                continue
            text = f"{dict.__getitem__(headers, key)}, {text}"
        dict.__setitem__(headers, key, text)
    request = Request(method.decode("ascii"), path.decode("latin-1"), query.decode("latin-1"),
                      version.decode("ascii"), headers, transport)
    if "transfer-encoding" in headers:
        raise HeadError(411, "chunked request bodies are not accepted: send Content-Length")
    length = headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()) or len(length) > 18:
            raise HeadError(400, f"invalid Content-Length {length!r}")
        request.content_length = int(length)
    return request


def response_head(status: int, content_type: str, length: int, close: bool,
                  extra: Mapping[str, str] | None = None, http10: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", "Server: kvstore",
             f"Content-Type: {content_type}", f"Content-Length: {length}"]
    if close:
        lines.append("Connection: close")
    elif http10:  # HTTP/1.0 closes unless told otherwise
        lines.append("Connection: keep-alive")
    if extra:
        lines.extend(f"{k}: {v}" for k, v in extra.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_response(status: int, message: str) -> Response:
    """An error answer: ``{"error": message}`` as JSON, what every client reads the message from."""
    return json_response({"error": message}, status)


async def bounded(awaitable: Awaitable[Response], seconds: float) -> Response:
    """``awaitable`` under a deadline (asyncio.TimeoutError past it) without a task per call
    where Python has ``asyncio.timeout`` (3.11+)."""
    if _timeout is not None:
        async with _timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)
