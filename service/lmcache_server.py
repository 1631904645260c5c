"""The optional LMCache listener of ``kvstore serve --lmcache-port``: LMCache engines configured
with ``remote_url: lm://host:port`` store into, and load from, the daemon's own tiers (bounded,
persistent, evicting, metered), not a process-local dict.

LMCache payloads are wrapped in kvstore objects (their format/dtype/shape as a small prefix of
the payload, model fingerprint "lmcache-legacy"), so they get the same checksums, eviction, pins
and restart survival as everything else. Bad input closes that connection only, with a log line
and a counter; other clients and stored data are untouched.
"""

from __future__ import annotations

import asyncio
import logging

import torch
import xxhash

from kvstore.blobstore import BlobStore, QuotaExceededError, StoredObject
from kvstore.objects import encode_object, join_parts, meta_for, read_meta
from kvstore.service.auth import storage_key
from kvstore.service.lmcache_protocol import (FAIL, REQUEST, SUCCESS, Command, ObjectInfo, ProtocolError, Request,
                                              parse_request, reply)

log = logging.getLogger(__name__)
FINGERPRINT = xxhash.xxh3_128_digest(b"lmcache-legacy-v1")


def object_key(lm_key: str) -> bytes:
    return xxhash.xxh3_128_digest(b"lmcache\0" + lm_key.encode())


class LMCacheListener:
    def __init__(self, store: BlobStore, tenant: str, max_length: int, quota: int | None, metrics=None) -> None:
        self.store = store
        self.tenant = tenant
        self.max_length = max_length
        self.quota = quota
        self.metrics = metrics
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, host, port)
        log.info("LMCache listener on %s:%d (tenant %s)", host, port, self.tenant)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.lmcache.labels(what).inc()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    header = await reader.readexactly(REQUEST.size)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise ProtocolError("peer disconnected inside a header") from None
                    return  # clean disconnect between requests
                req = parse_request(header, self.max_length)
                self._count(req.command.name.lower())
                if req.command is Command.PUT:
                    try:
                        data = await reader.readexactly(req.length)
                    except asyncio.IncompleteReadError:
                        raise ProtocolError(f"peer disconnected mid-payload ({req.length} bytes announced)") from None
                    await self._put(req, data)  # PUT gets no reply
                elif req.command is Command.GET:
                    info, payload = await self._get(req.key)
                    if payload is None:
                        writer.write(reply(FAIL))
                    else:
                        writer.write(reply(SUCCESS, len(payload), info))  # one write: LMCache does recv(36)
                        writer.write(payload)
                elif req.command is Command.EXIST:
                    present = await self._run(self.store.exists, [self._skey(req.key)])
                    writer.write(reply(SUCCESS if present[0] else FAIL))
                elif req.command is Command.HEALTH:
                    writer.write(reply(SUCCESS))
                else:
                    raise ProtocolError("LIST is not supported (LMCache's own server does not implement it)")
                await writer.drain()
        except ProtocolError as exc:
            log.warning("LMCache client %s: %s; closing the connection", peer, exc)
            self._count("bad_request")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def _skey(self, lm_key: str) -> bytes:
        return storage_key(self.tenant, object_key(lm_key))

    async def _put(self, req: Request, data: bytes) -> None:
        info = ObjectInfo(req.fmt, req.dtype, req.shape)
        payload = torch.frombuffer(bytearray(info.pack() + data), dtype=torch.uint8)
        key = object_key(req.key)
        meta = meta_for(key, FINGERPRINT, payload.view(1, 1, -1), partial=False)
        blob = join_parts(encode_object(meta, payload.view(1, 1, -1)))
        try:
            await self._run(self.store.put, [StoredObject(self._skey(req.key), read_meta(blob)[0], blob)],
                            self.tenant, self.quota)
        except QuotaExceededError as exc:
            log.warning("LMCache put of %s dropped: %s", req.key, exc)
            self._count("quota_exceeded")

    async def _get(self, lm_key: str) -> tuple[ObjectInfo | None, memoryview | None]:
        got = (await self._run(self.store.get, [self._skey(lm_key)], [object_key(lm_key)]))[0]
        if got is None:
            return None, None
        _meta, payload = read_meta(got)
        if payload.nbytes < ObjectInfo.size():
            return None, None
        return ObjectInfo.unpack(payload), payload[ObjectInfo.size():]
