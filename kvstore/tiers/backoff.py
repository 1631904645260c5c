"""Degrade-to-miss for network tiers: after a connection failure, skip the backend for a back-off
period that doubles up to a cap, so an outage costs the engine nothing but misses."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class Backoff:
    def __init__(self, what: str, initial_s: float = 0.5, max_s: float = 30.0) -> None:
        self.what = what
        self.initial_s = initial_s
        self.max_s = max_s
        self._delay = initial_s
        self._until = 0.0
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._until

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._until = time.monotonic() + self._delay
            log.warning("%s unreachable (%s); serving misses for %.1fs", self.what, exc, self._delay)
            self._delay = min(self._delay * 2, self.max_s)

    def succeeded(self) -> None:
        if self._delay != self.initial_s:
            with self._lock:
                self._delay = self.initial_s
            log.info("%s reachable again", self.what)
