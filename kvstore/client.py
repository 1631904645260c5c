"""Synchronous client of the kvstore daemon (``kvstore serve``).

Standard library HTTP (one keep-alive connection per thread) plus the shared wire module, so the
core package can talk to the daemon without a web framework. Idempotent calls (all of them: a
put of the same key writes the same bytes) are retried with exponential back-off on connection
failures; HTTP errors are raised as :class:`ServiceError` with the server's message.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from typing import Any, NamedTuple, Sequence
from urllib.parse import urlsplit

from kvstore.buffers import unzeroed
from kvstore.errors import KVStoreError
from kvstore.wire import (BATCH_CONTENT_TYPE, MSGPACK_CONTENT_TYPE, Blob, pack_batch, pack_control, parts_nbytes,
                          unpack_batch, unpack_control)


TENANT_HEADER = "X-Kvstore-Tenant"
"""Sent with an admin key: act on that tenant's objects (its keys, its usage)."""


class ServiceError(KVStoreError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class DaemonUnreachable(KVStoreError, ConnectionError):
    """No answer from the daemon (down, wrong address, connection cut). A ConnectionError, so
    code that retries on OSError still does; its message names the daemon's URL."""

    def __init__(self, url: str, cause: BaseException) -> None:
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else (str(cause) or type(cause).__name__)
        super().__init__(f"cannot reach the kvstore daemon at {url}: {reason}")
        self.url = url


def _read_body(resp: http.client.HTTPResponse) -> bytes | memoryview:
    """The whole body; with a Content-Length, read straight into one buffer (``read()`` collects
    chunks and joins them: an extra copy of every multi-MiB object), and not zeroed first."""
    length = resp.getheader("Content-Length")
    if length is None or int(length) < 65536:
        return resp.read()
    view = unzeroed(int(length), transient=True)
    got = 0
    while got < view.nbytes:
        n = resp.readinto(view[got:])
        if not n:
            raise http.client.IncompleteRead(bytes(view[:got]), view.nbytes - got)
        got += n
    return view


def decode_result(status: int, ctype: str, data: bytes | memoryview) -> Any:
    """A control response's body, or ServiceError with the server's message."""
    data = data.tobytes() if isinstance(data, memoryview) else data  # a large body arrives as a view
    if status >= 400:
        try:
            message = json.loads(data).get("error", data.decode(errors="replace"))
        except ValueError:
            message = data.decode(errors="replace")
        raise ServiceError(status, message)
    if ctype.startswith(MSGPACK_CONTENT_TYPE):
        return unpack_control(data)
    if ctype.startswith("application/json"):
        return json.loads(data)
    return data


class Address(NamedTuple):
    host: str
    port: int
    tls: bool


TLS_SCHEMES = ("kvstores", "https")

MAX_PUT_BYTES = 256 * 2**20
"""Largest body one put request carries (the daemon's default --max-body-bytes is 2 GiB)."""


def parse_url(url: str) -> Address:
    """``kvstore://host:port`` / ``http://`` (plain), ``kvstores://`` / ``https://`` (TLS)."""
    if "," in url:
        raise KVStoreError(f"{url!r} names several daemons: use kvstore.spread.connect(url), which spreads keys "
                           "over them, or one URL per client")
    parts = urlsplit(url if "://" in url else f"kvstore://{url}")
    try:
        port = parts.port or 8765
    except ValueError:  # not a number, or out of range
        port = 0
    if parts.scheme not in ("kvstore", "http", *TLS_SCHEMES) or not parts.hostname or not port:
        raise KVStoreError(f"daemon URL must look like kvstore://host:port (kvstores:// for TLS), got {url!r}")
    return Address(parts.hostname, port, parts.scheme in TLS_SCHEMES)


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verifying the daemon's certificate and name, against ``ca_file`` or the system's CAs."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise KVStoreError(f"cannot load the CA file {ca_file}: {exc}") from None


class DaemonClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0, retries: int = 2,
                 backoff_s: float = 0.1, tenant: str | None = None, tls_ca: str | None = None) -> None:
        self.host, self.port, tls = parse_url(url)
        self.url = f"{'kvstores' if tls else 'kvstore'}://{self.host}:{self.port}"
        self._tls = tls_context(tls_ca) if tls else None
        self.api_key = api_key
        self.tenant = tenant  # with an admin key: act as this tenant
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._local = threading.local()

    # ---- transport -----------------------------------------------------------------------

    def _conn(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it has served a request before (a kept-alive
        connection the daemon may have dropped, by a restart or an idle timeout)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = (
                http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s, context=self._tls)
                if self._tls is not None else http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s))
            self._local.used = False
        return conn, self._local.used

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, path: str, body: bytes | Sequence[bytes | memoryview] | None = None,
                content_type: str = MSGPACK_CONTENT_TYPE) -> tuple[int, str, bytes | memoryview]:
        headers = {"Content-Type": content_type}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.tenant:
            headers[TENANT_HEADER] = self.tenant
        if isinstance(body, (list, tuple)):
            headers["Content-Length"] = str(sum(memoryview(p).nbytes for p in body))
        delay = self.backoff_s
        attempt = 0
        while True:
            conn, reused = self._conn()
            try:
                if isinstance(body, (list, tuple)):
                    conn.putrequest(method, path)
                    for k, v in headers.items():
                        conn.putheader(k, v)
                    conn.endheaders()
                    for part in body:
                        conn.send(part)
                else:
                    conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                result = resp.status, resp.getheader("Content-Type", ""), _read_body(resp)
                self._local.used = True
                return result
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if reused:  # a stale kept-alive connection: one fresh one at once, not a failure
                    continue
                if attempt == self.retries:
                    raise DaemonUnreachable(self.url, exc) from exc
                attempt += 1
                time.sleep(delay)
                delay *= 2

    def _call(self, path: str, payload: dict[str, Any] | None = None, method: str = "POST") -> Any:
        status, ctype, data = self.request(method, path, None if payload is None else pack_control(payload))
        return self._result(status, ctype, data)

    @staticmethod
    def _result(status: int, ctype: str, data: bytes | memoryview) -> Any:
        return decode_result(status, ctype, data)

    # ---- API -----------------------------------------------------------------------------

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return self._call("/v1/exists", {"keys": list(keys)})["present"]

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are stored."""
        return int(self._call("/v1/lookup", {"keys": list(keys)})["hits"])

    def get(self, keys: Sequence[bytes]) -> list[bytes | memoryview | None]:
        status, ctype, data = self.request("POST", "/v1/get", pack_control({"keys": list(keys)}))
        if status >= 400 or ctype != BATCH_CONTENT_TYPE:
            self._result(status, ctype, data)
            raise ServiceError(status, f"unexpected content type {ctype!r}")
        got = dict(unpack_batch(data))
        return [got.get(k) for k in keys]

    def put(self, items: Sequence[tuple[bytes, Blob | tuple[Blob, ...]]]) -> int:
        """Store (key, object) pairs; an object may be given as its parts, sent without joining.
        A batch goes in requests of at most ``MAX_PUT_BYTES``, and one the daemon finds too large
        (413: its ``--max-body-bytes``) is split in halves and sent again, so a large prompt's
        objects are stored rather than refused together; an object alone too large is refused."""
        stored, batch, size = 0, [], 0
        for key, obj in items:
            n = parts_nbytes(obj if isinstance(obj, tuple) else (obj,))
            if batch and size + n > MAX_PUT_BYTES:
                stored += self._put(batch)
                batch, size = [], 0
            batch.append((key, obj))
            size += n
        return stored + (self._put(batch) if batch else 0)

    def _put(self, items: Sequence[tuple[bytes, Blob | tuple[Blob, ...]]]) -> int:
        status, ctype, data = self.request("POST", "/v1/put", pack_batch(items), BATCH_CONTENT_TYPE)
        if status == 413 and len(items) > 1:
            half = len(items) // 2
            return self._put(items[:half]) + self._put(items[half:])
        return int(self._result(status, ctype, data)["stored"])

    def pin(self, keys: Sequence[bytes], ttl_s: float) -> int:
        return int(self._call("/v1/pin", {"keys": list(keys), "ttl_s": ttl_s})["pinned"])

    def unpin(self, keys: Sequence[bytes]) -> int:
        return int(self._call("/v1/unpin", {"keys": list(keys)})["unpinned"])

    def tool_started(self, session: str, tool: str, keys: Sequence[bytes], ago_s: float = 0.0) -> float:
        """An agent session paused on ``tool`` (kvstore.agents, kept by the daemon per tenant):
        the daemon pins ``keys`` for the TTL it predicts from every engine's calls of that tool
        and returns it (0.0: nothing pinned)."""
        body = {"session": session, "tool": tool, "keys": list(keys), "ago_s": ago_s}
        return float(self._call("/v1/tool/started", body)["ttl_s"])

    def tool_finished(self, session: str, ago_s: float = 0.0) -> float | None:
        """The session's next turn arrived: the daemon learns the duration (returned; None if
        it did not know the session as paused) and releases the pins."""
        took = self._call("/v1/tool/finished", {"session": session, "ago_s": ago_s})["took_s"]
        return None if took is None else float(took)

    def delete(self, keys: Sequence[bytes]) -> int:
        return int(self._call("/v1/delete", {"keys": list(keys)})["deleted"])

    def clear(self, tenant: str | None = None) -> int | None:
        """Everything, or one tenant's objects (returns how many were deleted); admin only."""
        return self._call("/v1/clear", {} if tenant is None else {"tenant": tenant}).get("deleted")

    def stats(self) -> dict[str, Any]:
        return self._call("/v1/stats", method="GET")

    def healthy(self) -> bool:
        try:
            return self.request("GET", "/healthz")[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def close(self) -> None:
        self._drop()
