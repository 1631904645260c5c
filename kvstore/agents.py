"""Agent sessions paused on tool calls: pin the session's stored prefix for as long as the tool
is expected to take, so an LRU cache under pressure does not evict it just before the next turn.

A turn that ends in a tool call says ``tool_started(session, tool, keys)``; the keys are pinned
for a TTL predicted from that tool's observed durations (a high quantile of the last few
hundred, times a margin; a default for a tool never seen; never past ``max_ttl_s``). A tool
expected to take longer than a few turnovers of the memory tier (``Turnover``) is not pinned at
all: holding its context that long crowds out sessions that come back sooner, and where that
happens moves with the tier's size and traffic (measured in bench/agents.py). The next
turn says ``tool_finished(session)``: the duration is learned and the pins are released (keys
another paused session shares, such as a common system prompt, stay pinned for it). A pin the
tier's pinned-byte cap refuses is counted, never raised: the engine's turn goes on unpinned.
Durations are learned online, per process (a daemon learns from every engine it serves).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from kvstore.errors import ConfigError, InvalidInputError, PinLimitError

if TYPE_CHECKING:
    from kvstore.config import StoreConfig


@dataclass
class ToolTTLConfig:
    default_ttl_s: float = 30.0  # a tool never seen (or seen fewer than min_samples times)
    quantile: float = 0.9  # of the tool's recent durations
    margin: float = 1.25  # times that quantile: the pin outlives most calls a little
    max_ttl_s: float = 600.0  # no pin is longer
    # A tool expected to take longer than this many turnovers of the memory tier (the time it
    # takes new objects to fill it: about how long LRU keeps an object nobody asks for) is not
    # pinned: its context held that long would crowd out sessions that return sooner. The best
    # limit grows with the tier (bench/agents.py: 15-30 s at 150K tokens, 60 s at 300K, 60-120 s
    # at 600K, in step with the turnover). 0: a fixed limit, max_pause_s.
    pause_turnovers: float = 2.5
    max_pause_s: float = 60.0  # the limit while the turnover is not known yet (or pause_turnovers is 0)
    min_samples: int = 3
    history: int = 256  # durations kept per tool
    # Sessions paused at once; past it the longest-paused is forgotten (its pins run out by TTL).
    # Bounds the memory of agents that never come back.
    max_sessions: int = 100_000
    max_tools: int = 1024  # tool names whose durations are kept; past it the least recently learned goes
    max_pause_ttl_s: float = 600.0  # the pause limit never exceeds this (a quiet spell's long turnover)
    max_paused_keys: int = 1_000_000  # keys held by all paused sessions; past it the oldest are forgotten

    @classmethod
    def of(cls, config: "StoreConfig") -> "ToolTTLConfig":
        """The settings a store's config gives (``tool_*`` and ``max_pin_ttl_s``)."""
        return cls(default_ttl_s=config.tool_default_ttl_s, quantile=config.tool_ttl_quantile,
                   max_ttl_s=config.max_pin_ttl_s, max_pause_s=config.tool_max_pause_s,
                   pause_turnovers=config.tool_pause_turnovers)

    def __post_init__(self) -> None:
        if (not 0 < self.quantile <= 1 or self.margin < 1
                or min(self.max_sessions, self.max_tools, self.max_paused_keys) < 1
                or self.pause_turnovers < 0
                or min(self.default_ttl_s, self.max_ttl_s, self.max_pause_s) <= 0):
            raise ConfigError(f"tool TTL settings out of range (tool_default_ttl_s, tool_ttl_quantile, max_pin_ttl_s): {self}")


@dataclass
class _Paused:
    tool: str
    keys: tuple[bytes, ...]
    started: float
    ttl_s: float


@dataclass
class AgentStats:
    paused: int = 0  # sessions waiting on a tool now
    started: int = 0
    finished: int = 0
    refused: int = 0  # pins the pinned-byte cap refused
    skipped: int = 0  # calls of tools expected to outlast the pause limit: not pinned
    expired: int = 0  # tools that took longer than their pin
    per_tool: dict[str, dict[str, float]] = field(default_factory=dict)


class AgentSessions:
    """Thread-safe; ``pin(keys, ttl_s)`` and ``unpin(keys)`` are the store's (they may raise
    PinLimitError, which is counted). Both calls are cheap: no I/O of their own."""

    def __init__(self, pin: Callable[[Sequence[bytes], float], object], unpin: Callable[[Sequence[bytes]], object],
                 config: ToolTTLConfig | None = None, clock: Callable[[], float] = time.monotonic,
                 turnover: Callable[[], float | None] | None = None) -> None:
        self._pin, self._unpin = pin, unpin
        self.config = config or ToolTTLConfig()
        self._clock = clock
        self._turnover = turnover  # seconds the memory tier takes to turn over, None while unknown
        self._lock = threading.Lock()
        self._paused: dict[str, _Paused] = {}
        self._durations: OrderedDict[str, deque[float]] = OrderedDict()  # least recently learned first
        self._held: Counter[bytes] = Counter()  # key -> paused sessions holding it (release is O(own keys))
        self._paused_keys = 0
        self._stats = AgentStats()

    def predict(self, tool: str) -> float:
        """The pin TTL for a call of ``tool`` starting now."""
        c = self.config
        seen = self._durations.get(tool)
        if seen is None or len(seen) < c.min_samples:
            return min(c.default_ttl_s, c.max_ttl_s)
        ordered = sorted(seen)
        q = ordered[min(len(ordered) - 1, max(0, math.ceil(c.quantile * len(ordered)) - 1))]
        return min(max(q * c.margin, 1e-3), c.max_ttl_s)

    def pause_limit(self) -> float:
        """Tools expected to take longer than this are not pinned (see ToolTTLConfig). Never past
        ``max_pause_ttl_s``: after a quiet spell the turnover is long, but holding a context for
        hours would outlast the quiet."""
        c = self.config
        turnover = self._turnover() if self._turnover is not None and c.pause_turnovers else None
        limit = c.max_pause_s if turnover is None else c.pause_turnovers * turnover
        return min(limit, max(c.max_pause_s, c.max_pause_ttl_s))

    def tool_started(self, session: str, tool: str, keys: Sequence[bytes], ago_s: float = 0.0) -> float:
        """Pin ``keys`` (the session's stored prefix) for the predicted TTL; returns it (0.0 when
        the pin was refused or there is nothing to pin). A session already paused is resumed
        first (its previous call's end was never said). ``ago_s``: how long ago the call really
        started, for an engine that reports it late (vLLM's connector does, by a step)."""
        check_name("session", session)
        check_name("tool", tool)
        ago_s = check_age(ago_s)
        self.tool_finished(session, learn=False)
        predicted = self.predict(tool)
        ttl = predicted - ago_s
        pinned: tuple[bytes, ...] = tuple(keys)
        with self._lock:
            self._stats.started += 1
            if predicted > self.pause_limit():
                self._stats.skipped += 1
                pinned = ()
            elif ttl <= 0:
                pinned = ()
        if pinned:
            try:
                self._pin(list(pinned), ttl)
            except PinLimitError:
                with self._lock:
                    self._stats.refused += 1
                pinned = ()
        with self._lock:  # paused even when unpinned: its duration is still learned
            self._paused[session] = _Paused(tool, pinned, self._clock() - ago_s, predicted)
            self._held.update(pinned)
            self._paused_keys += len(pinned)
            forgotten = self._forget_oldest()
        if forgotten:
            self._unpin(forgotten)
        return ttl if pinned else 0.0

    def _forget_oldest(self) -> list[bytes]:
        """Past max_sessions, drop the longest-paused (under the lock); returns keys to unpin."""
        free: list[bytes] = []
        while len(self._paused) > self.config.max_sessions or self._paused_keys > self.config.max_paused_keys:
            oldest = next(iter(self._paused))  # dicts keep insertion order: the earliest pause
            free.extend(self._release(self._paused.pop(oldest).keys))
        return free

    def _release(self, keys: Sequence[bytes]) -> list[bytes]:
        """Under the lock: a session lets go of its keys; returns those no paused session holds."""
        free = []
        self._paused_keys -= len(keys)
        for k in keys:
            self._held[k] -= 1
            if self._held[k] <= 0:
                del self._held[k]
                free.append(k)
        return free

    def tool_finished(self, session: str, learn: bool = True, ago_s: float = 0.0) -> float | None:
        """The session's next turn has come: learn how long the tool took and release its pins
        (but not keys another paused session holds). Returns the duration, None if not paused.
        ``ago_s``: how long ago the turn really arrived."""
        check_name("session", session)
        ago_s = check_age(ago_s)
        with self._lock:
            paused = self._paused.pop(session, None)
            if paused is None:
                return None
            took = max(0.0, self._clock() - ago_s - paused.started)
            free = self._release(paused.keys)
            if learn:
                self._learn(paused.tool, took)
                self._stats.finished += 1
                self._stats.expired += bool(paused.keys) and took > paused.ttl_s
        if free:
            self._unpin(free)
        return took

    def _learn(self, tool: str, took: float) -> None:
        """Under the lock. Past max_tools, the tool learned least recently is forgotten: tool
        names come from callers, and a stream of new ones must not grow memory without bound."""
        seen = self._durations.get(tool)
        if seen is None:
            seen = self._durations[tool] = deque(maxlen=self.config.history)
            while len(self._durations) > self.config.max_tools:
                self._durations.popitem(last=False)
        else:
            self._durations.move_to_end(tool)
        seen.append(took)

    def stats(self) -> AgentStats:
        with self._lock:
            s = AgentStats(len(self._paused), self._stats.started, self._stats.finished, self._stats.refused,
                           self._stats.skipped, self._stats.expired)
            for tool, seen in self._durations.items():
                s.per_tool[tool] = {"calls": len(seen), "ttl_s": self.predict(tool)}
        return s


class Turnover:
    """How long a tier takes to turn over: its capacity over the rate new bytes arrive, the
    rate decayed over ``tau_s`` (under LRU and a steady stream of new objects, about how long an
    object nobody asks for again survives). Thread-safe; ``add`` is a few float operations."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic, tau_s: float = 120.0) -> None:
        self.capacity = capacity
        self._clock = clock
        self._tau = tau_s
        self._lock = threading.Lock()
        self._start: float | None = None
        self._last = 0.0
        self._sum = 0.0  # bytes, each decayed by exp(-age / tau)

    def add(self, nbytes: int) -> None:
        now = self._clock()
        with self._lock:
            if self._start is None:
                self._start = self._last = now
            self._sum = self._sum * math.exp(-max(0.0, now - self._last) / self._tau) + nbytes
            self._last = max(now, self._last)

    def seconds(self) -> float | None:
        """None until bytes have arrived over at least a second."""
        now = self._clock()
        with self._lock:
            if self._start is None or now - self._start < 1.0:
                return None
            decayed = self._sum * math.exp(-max(0.0, now - self._last) / self._tau)
            # The rate a steady stream since _start would give this decayed sum.
            rate = decayed / (self._tau * (1.0 - math.exp(-(now - self._start) / self._tau)))
        return self.capacity / rate if rate > 0 else None


MAX_NAME = 256  # longest session id or tool name (the daemon's limit too)


def check_name(what: str, value: object) -> str:
    """A session id or tool name: a string of 1..MAX_NAME characters (InvalidInputError)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise InvalidInputError(f"{what} must be a string of 1..{MAX_NAME} characters, got {value!r:.80}")
    return value  # type: ignore[return-value]


def check_age(ago_s: object) -> float:
    """How long ago an event happened: seconds in [0, 86400) (InvalidInputError)."""
    if not isinstance(ago_s, (int, float)) or isinstance(ago_s, bool) or not 0 <= ago_s < 86400:
        raise InvalidInputError(f"ago_s must be a number of seconds in [0, 86400), got {ago_s!r}")
    return float(ago_s)
