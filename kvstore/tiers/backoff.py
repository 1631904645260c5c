"""Degrade-to-miss for network tiers: after a connection failure, skip the backend for a back-off
period that doubles up to a cap, so an outage costs the engine nothing but misses."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

from kvstore.stats import Counters

T = TypeVar("T")

log = logging.getLogger(__name__)


class Backoff:
    def __init__(self, what: str, initial_s: float = 0.5, max_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self._clock = clock
        self.initial_s = initial_s
        self.max_s = max_s
        self._delay = initial_s
        self._until = 0.0
        self._failed_at = float("-inf")
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._clock()

    @property
    def available(self) -> bool:
        return self._clock() >= self._until

    def failed(self, exc: BaseException, started: float | None = None) -> None:
        """A call that began at ``started`` (this back-off's clock) failed. A call that began
        before the last recorded failure was in flight when the outage began: the same outage,
        not a longer one (eight threads whose calls fail together, or time out one after another,
        must not make the back-off 2^8 times longer)."""
        with self._lock:
            now = self._clock()
            if started is not None and started < self._failed_at:
                return
            self._failed_at = now
            self._until = now + self._delay
            log.warning("%s unreachable (%s); serving misses for %.1fs", self.what, exc, self._delay)
            self._delay = min(self._delay * 2, self.max_s)

    def succeeded(self) -> None:
        if self._delay != self.initial_s:
            with self._lock:
                self._delay = self.initial_s
            log.info("%s reachable again", self.what)


class GuardedCalls:
    """Mixin for network tiers: ``_call(fn, default)`` runs fn unless the backend is in back-off;
    transient failures start a back-off and count as ``unavailable``, backend errors count as
    ``write_errors``; either way the caller gets ``default`` (a miss), never an exception."""

    TRANSIENT: tuple[type[BaseException], ...] = (OSError,)
    ERRORS: tuple[type[BaseException], ...] = ()
    _backoff: Backoff
    counters: Counters
    name: str

    def _call(self, fn: Callable[[], T], default: T) -> T:
        if not self._backoff.available:
            self.counters.tier(self.name, "unavailable")
            return default
        started = self._backoff.now()
        try:
            result = fn()
        except self.TRANSIENT as exc:
            self._backoff.failed(exc, started)
            self.counters.tier(self.name, "unavailable")
            return default
        except self.ERRORS as exc:
            log.warning("%s: %s", self._backoff.what, exc)
            self.counters.tier(self.name, "write_errors")
            return default
        self._backoff.succeeded()
        return result
