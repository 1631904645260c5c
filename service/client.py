"""Clients of the kvstore daemon.

``connect(url)`` gives a ``KVStoreClient`` for one daemon or a ``DaemonGroup`` for several
(``kvstore://a:8765,b:8765``, keys spread by rendezvous hashing). ``KVStoreClient`` is the
synchronous client (standard-library HTTP, one keep-alive connection per thread; it lives in
the core package so the remote tier can use it without aiohttp).
``AsyncKVStoreClient`` is its asyncio twin on an aiohttp connection pool. Both speak
kvstore.wire and retry with exponential back-off on connection failures; every call is
idempotent (a put of a key always carries the same bytes).
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import aiohttp

from kvstore.client import DaemonClient as KVStoreClient
from kvstore.client import ServiceError, decode_result, parse_url, tls_context
from kvstore.spread import DaemonGroup, connect
from kvstore.wire import BATCH_CONTENT_TYPE, MSGPACK_CONTENT_TYPE, pack_batch, pack_control, unpack_batch

__all__ = ["AsyncKVStoreClient", "DaemonGroup", "KVStoreClient", "ServiceError", "connect"]


class AsyncKVStoreClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0, retries: int = 2,
                 backoff_s: float = 0.1, pool_size: int = 16, tls_ca: str | None = None) -> None:
        host, port, tls = parse_url(url)
        self.base = f"{'https' if tls else 'http'}://{host}:{port}"
        self._ssl = tls_context(tls_ca) if tls else None
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = retries
        self.backoff_s = backoff_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "AsyncKVStoreClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self.headers,
                                                  connector=aiohttp.TCPConnector(limit=self._pool_size,
                                                                                 ssl=self._ssl or True))
        return self._session

    async def _request(self, method: str, path: str, body: bytes, content_type: str) -> tuple[int, str, bytes]:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                async with self._sess().request(method, self.base + path, data=body,
                                                headers={"Content-Type": content_type}) as resp:
                    return resp.status, resp.headers.get("Content-Type", ""), await resp.read()
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                if attempt == self.retries:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        status, ctype, data = await self._request("POST", path, pack_control(payload), MSGPACK_CONTENT_TYPE)
        return decode_result(status, ctype, data)

    async def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return (await self._call("/v1/exists", {"keys": list(keys)}))["present"]

    async def lookup(self, keys: Sequence[bytes]) -> int:
        return int((await self._call("/v1/lookup", {"keys": list(keys)}))["hits"])

    async def get(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        status, ctype, data = await self._request("POST", "/v1/get", pack_control({"keys": list(keys)}),
                                                  MSGPACK_CONTENT_TYPE)
        if status >= 400 or ctype != BATCH_CONTENT_TYPE:
            decode_result(status, ctype, data)
            raise ServiceError(status, f"unexpected content type {ctype!r}")
        got = dict(unpack_batch(data))
        return [got.get(k) for k in keys]

    async def put(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> int:
        body = b"".join(pack_batch(items))
        status, ctype, data = await self._request("POST", "/v1/put", body, BATCH_CONTENT_TYPE)
        return int(decode_result(status, ctype, data)["stored"])

    async def pin(self, keys: Sequence[bytes], ttl_s: float) -> int:
        return int((await self._call("/v1/pin", {"keys": list(keys), "ttl_s": ttl_s}))["pinned"])

    async def unpin(self, keys: Sequence[bytes]) -> int:
        return int((await self._call("/v1/unpin", {"keys": list(keys)}))["unpinned"])

    async def tool_started(self, session: str, tool: str, keys: Sequence[bytes], ago_s: float = 0.0) -> float:
        """An agent session paused on ``tool`` (see kvstore.client.DaemonClient.tool_started)."""
        body = {"session": session, "tool": tool, "keys": list(keys), "ago_s": ago_s}
        return float((await self._call("/v1/tool/started", body))["ttl_s"])

    async def tool_finished(self, session: str, ago_s: float = 0.0) -> float | None:
        took = (await self._call("/v1/tool/finished", {"session": session, "ago_s": ago_s}))["took_s"]
        return None if took is None else float(took)

    async def delete(self, keys: Sequence[bytes]) -> int:
        return int((await self._call("/v1/delete", {"keys": list(keys)}))["deleted"])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
