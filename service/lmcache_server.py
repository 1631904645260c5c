"""The optional LMCache listener of ``kvstore serve --lmcache-port``: LMCache engines configured
with ``remote_url: lm://host:port`` store into, and load from, the daemon's own tiers (bounded,
persistent, evicting, metered), not a process-local dict.

One thread per connection with blocking sockets, like LMCache's own server: its client is
synchronous per connection, payloads are tens of MiB, and ``recv_into`` a preallocated buffer
beats asyncio stream reads by several copies. LMCache payloads are wrapped in kvstore objects
(their format/dtype/shape as a small prefix of the payload, model fingerprint "lmcache-legacy"),
so they get the same checksums, eviction, pins and restart survival as everything else. Bad input
closes that connection only, with a log line and a counter; other clients and stored data are
untouched.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import xxhash

from kvstore.blobstore import BlobStore, QuotaExceededError, StoredObject
from kvstore.objects import ObjectMeta, join_parts, pack_object, parse_header
from kvstore.service.auth import storage_key
from kvstore.service.lmcache_protocol import (FAIL, REQUEST, SUCCESS, Command, ObjectInfo, ProtocolError, Request,
                                              parse_request, reply)

log = logging.getLogger(__name__)
FINGERPRINT = xxhash.xxh3_128_digest(b"lmcache-legacy-v1")
_INFO = ObjectInfo.size()
_HEADER_ROOM = 512  # an object header (preamble + msgpack) is ~200 bytes


def object_key(lm_key: str) -> bytes:
    return xxhash.xxh3_128_digest(b"lmcache\0" + lm_key.encode())


def _recv_into(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _send_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Header and payload in one gathered send: one syscall instead of two, and the 36-byte
    reply header never travels alone in its own segment (LMCache's client reads it with a single
    recv(36))."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


class LMCacheListener:
    def __init__(self, store: BlobStore, tenant: str, max_length: int, quota: int | None,
                 metrics: Any = None) -> None:
        self.store = store
        self.tenant = tenant
        self.max_length = max_length
        self.quota = quota
        self.metrics = metrics
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        # Objects are only ever looked at from local tiers here; a Redis tier would be a network
        # call per EXIST, which is still correct, just slower.

    def start(self, host: str, port: int) -> None:
        sock = socket.create_server((host, port), reuse_port=False)
        self._sock = sock
        threading.Thread(target=self._accept, name="kvstore-lmcache-accept", daemon=True).start()
        log.info("LMCache listener on %s:%d (tenant %s)", host, port, self.tenant)

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, peer), name="kvstore-lmcache-conn", daemon=True).start()

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.lmcache.labels(what).inc()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        header = bytearray(REQUEST.size)
        try:
            while True:
                if not _recv_into(conn, memoryview(header)):
                    return  # disconnect (a partial header is no request either)
                req = parse_request(bytes(header), self.max_length)
                self._count(req.command.name.lower())
                if req.command is Command.PUT:
                    # [room for the object header][info prefix][payload]: the object is built in place.
                    buf = self.store.allocate(_HEADER_ROOM + _INFO + req.length)
                    if not _recv_into(conn, buf[_HEADER_ROOM + _INFO:]):
                        raise ProtocolError(f"peer disconnected mid-payload ({req.length} bytes announced)")
                    self._put(req, buf)  # PUT gets no reply
                elif req.command is Command.GET:
                    info, payload = self._get(req.key)
                    if payload is None:
                        conn.sendall(reply(FAIL))
                    else:
                        _send_all(conn, [reply(SUCCESS, payload.nbytes, info), payload])
                elif req.command is Command.EXIST:
                    present = self.store.exists([self._skey(req.key)])[0]
                    conn.sendall(reply(SUCCESS if present else FAIL))
                elif req.command is Command.HEALTH:
                    conn.sendall(reply(SUCCESS))
                else:
                    raise ProtocolError("LIST is not supported (LMCache's own server does not implement it)")
        except ProtocolError as exc:
            log.warning("LMCache client %s: %s; closing the connection", peer, exc)
            self._count("bad_request")
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _skey(self, lm_key: str) -> bytes:
        return storage_key(self.tenant, object_key(lm_key))

    def _put(self, req: Request, buf: memoryview) -> None:
        buf[_HEADER_ROOM:_HEADER_ROOM + _INFO] = ObjectInfo(req.fmt, req.dtype, req.shape).pack()
        payload = buf[_HEADER_ROOM:]
        key = object_key(req.key)
        meta = ObjectMeta(key=key, fingerprint=FINGERPRINT, shape=(1, 1, payload.nbytes), dtype="uint8",
                          num_tokens=payload.nbytes, partial=False, codec="raw")
        head = pack_object(meta, payload, "raw")[0]
        if len(head) > _HEADER_ROOM:  # cannot happen with this header; keep correctness if it ever did
            blob: bytes | memoryview = join_parts([head, payload])
        else:
            start = _HEADER_ROOM - len(head)
            buf[start:_HEADER_ROOM] = head
            blob = buf[start:]  # no copy of the 32 MiB payload
        try:
            self.store.put([StoredObject(self._skey(req.key), meta, blob)], self.tenant, self.quota)
        except QuotaExceededError as exc:
            log.warning("LMCache put of %s dropped: %s", req.key, exc)
            self._count("quota_exceeded")

    def _get(self, lm_key: str) -> tuple[ObjectInfo | None, memoryview | None]:
        got = self.store.get([self._skey(lm_key)], [object_key(lm_key)])[0]
        if got is None:
            return None, None
        # store.get verified the object as its tier requires (checksum from disk, header in
        # memory): hashing 32 MiB again here would only slow the reply.
        view = memoryview(got)
        payload = view[parse_header(view, view.nbytes).payload_offset:]
        if payload.nbytes < _INFO:
            return None, None
        return ObjectInfo.unpack(payload), payload[_INFO:]
