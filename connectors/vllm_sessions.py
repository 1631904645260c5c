"""Agent sessions through vLLM: the scheduler sees them, the worker's store pins.

A request whose ``kv_transfer_params`` carry ``{"kvstore_session": ID}`` (and, when the caller
knows which tool the turn will call, ``"kvstore_tool": NAME``; else "any") ends its session's
pause when it arrives and starts a new one when it finishes (kvstore.agents). The scheduler
half records the events with their real times; they ride to the worker in the connector
metadata, so a pause reported a step late counts from when it began (one host: vLLM's
scheduler and workers share the monotonic clock). Bad values are logged once and ignored: a
cache hint never fails a request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from kvstore.agents import check_name
from kvstore.connectors.hooks import KVHooks
from kvstore.errors import InvalidInputError

log = logging.getLogger(__name__)
DEFAULT_TOOL = "any"  # the pause's tool when the request does not say: learned over all such pauses


@dataclass(frozen=True)
class SessionEvent:
    """A session's pause (``tool`` set: its turn ended) or its next turn (``tool`` None), at
    ``at`` on the scheduler's monotonic clock."""

    session: str
    tool: str | None
    tokens: tuple[int, ...]
    req_id: str
    at: float


def session_params(params: Any, logged: set[str]) -> tuple[str, str] | None:
    """(session, tool) from a request's kv_transfer_params, or None; a bad value is logged once
    per parameter (``logged`` remembers which) and ignored."""
    if not isinstance(params, dict) or "kvstore_session" not in params:
        return None
    session, tool = params.get("kvstore_session"), params.get("kvstore_tool", DEFAULT_TOOL)
    for name, value in (("kvstore_session", session), ("kvstore_tool", tool)):
        try:
            check_name(name, value)
        except InvalidInputError as exc:
            if name not in logged:
                logged.add(name)
                log.warning("kvstore: ignoring kv_transfer_params %s=%r: %s (said once)", name, value, exc)
            return None
    return session, tool


class SessionTracker:
    """Scheduler side: which running requests belong to sessions, and the events not yet sent."""

    def __init__(self) -> None:
        self._requests: dict[str, tuple[str, str]] = {}  # req_id -> (session, tool)
        self._events: list[SessionEvent] = []
        self._logged: set[str] = set()

    def arrived(self, req_id: str, params: Any) -> None:
        """A request was looked up. vLLM asks again for one it could not allocate for yet, or
        resumed: only its first arrival ends the session's pause."""
        if req_id in self._requests:
            return
        found = session_params(params, self._logged)
        if found is not None:
            self._requests[req_id] = found
            self._events.append(SessionEvent(found[0], None, (), req_id, time.monotonic()))

    def finished(self, req_id: str, prompt: Sequence[int] | None) -> None:
        """The request is done: its session now waits on a tool, with the prompt's chunks stored
        (``prompt`` None: nothing it computed may be pinned, e.g. computed over a failed load)."""
        session = self._requests.pop(req_id, None)
        if session is not None and prompt is not None:
            self._events.append(SessionEvent(session[0], session[1], tuple(prompt), req_id, time.monotonic()))

    def drain(self) -> list[SessionEvent]:
        events, self._events = self._events, []
        return events


def deliver(hooks: KVHooks, events: Sequence[SessionEvent]) -> None:
    """Worker side, after the step's saves were handed over (a pause then pins them too)."""
    for ev in events:
        ago = max(0.0, time.monotonic() - ev.at)
        if ev.tool is None:
            hooks.tool_finished(ev.session, ago_s=ago)
        else:
            hooks.tool_started(ev.session, ev.tool, ev.tokens, request_id=ev.req_id, ago_s=ago)
