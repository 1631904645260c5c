"""An optional JSONL log of what a store is asked (``access_log: path``), for ``kvstore plan``.

One line per lookup, get, put and pin: the time, the chunk keys (hex), the tokens and the KV bytes
per token, so a replay sees the same prefix sharing the engine saw. Written by a thread of its
own: the engine's call only appends to a bounded queue (never waits on the file); when the
queue is full the event is dropped and counted, and a failed write is said once and ends the
log, never the engine's request. Lines go out in whole batches, one ``write`` on a file opened
for appending, so processes sharing one log (vLLM's scheduler and worker) never split a line.
"""

from __future__ import annotations

import json
import logging
import os
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
        # An unwritable path fails here, at start.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
        done = False
        while not done:
            lines = [self._q.get()]
            while len(lines) < 4096 and not self._q.empty():
                lines.append(self._q.get_nowait())
            if None in lines:
                done = True
                lines = lines[:lines.index(None)]
            if failed or not lines:
                continue
            data = ("\n".join(lines) + "\n").encode()  # type: ignore[arg-type]
            try:
                while data:
                    data = data[os.write(self._fd, data):]
            except OSError as exc:
                failed = True
                log.warning("access log %s: %s; no more events are written", self.path, exc)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(10)
        try:
            os.close(self._fd)
        except OSError:
            pass
        if self.dropped:
            log.warning("access log %s: %d events dropped (the log could not keep up)", self.path, self.dropped)
