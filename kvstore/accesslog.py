"""An optional JSONL log of what a store is asked (``access_log: path``), for ``kvstore plan``.

One line per lookup, get, put and pin: the time, the chunk keys (hex), the tokens and the KV bytes
per token, so a replay sees the same prefix sharing the engine saw. Written by a thread of its
own: the engine's call only appends to a bounded queue (never waits on the file); when the
queue is full the event is dropped and counted, and a failed write is said once and ends the
log, never the engine's request.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Sequence

log = logging.getLogger(__name__)

_QUEUE = 65536


class AccessLog:
    def __init__(self, path: str, chunk_size: int, bytes_per_token: int) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self.bytes_per_token = bytes_per_token
        self.dropped = 0
        self._q: queue.Queue[str | None] = queue.Queue(_QUEUE)
        self._file = open(path, "a", encoding="utf-8")  # an unwritable path fails here, at start
        self._thread = threading.Thread(target=self._run, name="kvstore-access-log", daemon=True)
        self._thread.start()

    def record(self, op: str, keys: Sequence[bytes], tokens: int, **extra: float) -> None:
        """Never blocks: an event that does not fit the queue is dropped and counted."""
        event = {"t": round(time.time(), 6), "op": op, "chunk": self.chunk_size, "tokens": tokens,
                 "bytes_per_token": self.bytes_per_token, "keys": [k.hex() for k in keys], **extra}
        try:
            self._q.put_nowait(json.dumps(event, separators=(",", ":")))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        failed = False
        while True:
            line = self._q.get()
            if line is None:
                break
            if failed:
                continue
            try:
                self._file.write(line + "\n")
                if self._q.empty():
                    self._file.flush()
            except OSError as exc:
                failed = True
                log.warning("access log %s: %s; no more events are written", self.path, exc)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(10)
        try:
            self._file.close()
        except OSError:
            pass
        if self.dropped:
            log.warning("access log %s: %d events dropped (the log could not keep up)", self.path, self.dropped)
