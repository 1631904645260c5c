"""The daemon's control plane: pins, deletes, clears, stats and agent sessions.

A mixin of :class:`kvstore.service.server.Daemon` (it uses the daemon's store, key file,
config and helpers), kept apart from the data plane so each file has one job. Every handler
that may block (pins and deletes reach every tier, Redis included) runs in the thread pool.
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from kvstore.agents import AgentSessions, AgentStats, ToolTTLConfig, check_age, check_name
from kvstore.client import TENANT_HEADER
from kvstore.service.auth import Principal, storage_key
from kvstore.service.http_messages import Request, Response, error_response, json_response
from kvstore.wire import MSGPACK_CONTENT_TYPE, WireError, pack_control

if TYPE_CHECKING:
    from kvstore.blobstore import BlobStore
    from kvstore.service.auth import KeyFile
    from kvstore.service.server import ServeConfig



def msgpack_response(data: dict[str, Any]) -> Response:
    return Response(body=pack_control(data), content_type=MSGPACK_CONTENT_TYPE)


class TenantSessions:
    """Agent sessions (kvstore.agents) kept per tenant: each tenant's tool durations are learned
    from all its engines, and never from (or visible to) another tenant. Thread-safe."""

    def __init__(self, store: "BlobStore", config: ToolTTLConfig) -> None:
        self._store = store
        self._config = config
        self._lock = threading.Lock()
        self._tenants: dict[str, AgentSessions] = {}

    def of(self, tenant: str) -> AgentSessions:
        with self._lock:
            sessions = self._tenants.get(tenant)
            if sessions is None:
                turnover = self._store.stack.turnover
                # The stack's pin: tool_started below hands over only keys found present.
                stack = self._store.stack
                sessions = self._tenants[tenant] = AgentSessions(
                    functools.partial(stack.pin, session=True),
                    functools.partial(stack.unpin, session=True), self._config,
                    turnover=turnover.seconds if turnover is not None else None)
            return sessions

    def tool_started(self, tenant: str, session: str, tool: str, keys: list[bytes], ago_s: float) -> float:
        """Blocking (the store's index, Redis below it). Only keys the store holds are kept and
        pinned: a tenant cannot make the daemon hold keys it never stored."""
        present = [k for k, there in zip(keys, self._store.exists(keys)) if there] if keys else []
        return self.of(tenant).tool_started(session, tool, present, ago_s)

    def stats(self, tenant: str | None = None) -> dict[str, AgentStats]:
        """Per tenant (every one, or just ``tenant``)."""
        with self._lock:
            chosen = dict(self._tenants) if tenant is None else {tenant: self._tenants[tenant]} \
                if tenant in self._tenants else {}
        return {name: sessions.stats() for name, sessions in chosen.items()}


class ControlPlane:
    config: "ServeConfig"
    keys: "KeyFile"
    store: "BlobStore"
    sessions: TenantSessions
    _run: Callable[..., Awaitable[Any]]
    _control: Callable[[Request], dict[str, Any]]
    _keys: Callable[[dict[str, Any], Principal], tuple[list[bytes], list[bytes]]]

    async def pin(self, request: Request) -> Response:
        body = self._control(request)
        _keys, skeys = self._keys(body, request.principal)
        ttl = body.get("ttl_s")
        limit = self.config.store.max_pin_ttl_s
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl <= limit:
            raise WireError(f"'ttl_s' must be a number in (0, {limit}]")
        return msgpack_response({"pinned": await self._run(self.store.pin, skeys, float(ttl))})

    async def unpin(self, request: Request) -> Response:
        _keys, skeys = self._keys(self._control(request), request.principal)
        return msgpack_response({"unpinned": await self._run(self.store.unpin, skeys)})

    async def delete(self, request: Request) -> Response:
        _keys, skeys = self._keys(self._control(request), request.principal)
        return msgpack_response({"deleted": await self._run(self.store.delete, skeys)})

    async def clear(self, request: Request) -> Response:
        """Everything (admin), or one tenant's objects (``{"tenant": NAME}``, admin)."""
        if not request.principal.admin:
            return error_response(403, "clear needs an admin key")
        # With an acting tenant (X-Kvstore-Tenant) a clear is that tenant's, never everyone's.
        tenant = self._control(request).get("tenant") or request.headers.get(TENANT_HEADER)
        if tenant is None:
            await self._run(self.store.clear)
            return msgpack_response({"cleared": True})
        if not isinstance(tenant, str) or not tenant:
            raise WireError("'tenant' must be a tenant name")
        return msgpack_response({"cleared": True, "deleted": await self._run(self.store.clear_owner, tenant)})

    async def tool_started(self, request: Request) -> Response:
        """An agent session of the caller's tenant paused on a tool: its keys are pinned for the
        TTL learned from the tenant's calls of that tool (``{"ttl_s": 0.0}``: nothing pinned).
        A pin the pinned-bytes cap refuses is counted, not an error: the engine goes on."""
        body = self._control(request)
        principal: Principal = request.principal
        session, tool = check_name("session", body.get("session")), check_name("tool", body.get("tool"))
        ago = check_age(body.get("ago_s", 0.0))
        _keys, skeys = self._keys({"keys": body.get("keys", [])}, principal)
        ttl = await self._run(self.sessions.tool_started, principal.tenant, session, tool, skeys, ago)
        return msgpack_response({"ttl_s": ttl})

    async def tool_finished(self, request: Request) -> Response:
        """The session's next turn: the tool's duration is learned and the pins released."""
        body = self._control(request)
        principal: Principal = request.principal
        session, ago = check_name("session", body.get("session")), check_age(body.get("ago_s", 0.0))
        took = await self._run(self.sessions.of(principal.tenant).tool_finished, session, True, ago)
        return msgpack_response({"took_s": took})

    async def stats(self, request: Request) -> Response:
        """An admin sees the tiers and every tenant; a tenant sees only its own usage: tier-wide
        hits, objects and bytes would tell it what other tenants do."""
        principal: Principal = request.principal
        st = await self._run(self.store.stats)
        tenants = st["tenants"]
        for tenant, quota in self.keys.quotas.items():
            tenants.setdefault(tenant, {"bytes": 0, "objects": 0})["quota"] = quota
        agents = self.sessions.stats(None if principal.admin else principal.tenant)
        sessions = {tenant: vars(s) for tenant, s in agents.items()}
        if principal.admin:
            return json_response({**st, "sessions": sessions})
        own = tenants.get(principal.tenant, {"bytes": 0, "objects": 0})
        return json_response({"tenant": principal.tenant, **own, "tenants": {principal.tenant: own},
                                  "sessions": sessions})
