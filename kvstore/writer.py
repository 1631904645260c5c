"""Asynchronous write-down to one slower tier through a bounded queue.

The engine's put returns after the fastest tier has the chunk; encoding and disk/network writes
happen here. When the queue is full the policy decides: ``block`` waits up to the put budget
(back-pressure) and then drops, ``drop`` drops at once; every drop is counted, never silent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from kvstore.objects import ObjectMeta, encode_object, join_parts, recode
from kvstore.wire import parts_nbytes
from kvstore.stats import Counters
from kvstore.tiers.base import BlobTier

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_BATCH = 16
_REMOTE_BATCH = 64
_LINGER_S = 0.002


@dataclass
class PendingWrite:
    """A chunk waiting to be written: a tensor to encode with the tier's codec, or an object
    already encoded (passed through as is). ``tensor`` stays valid until ``release`` is called
    (it is a leased memory-tier slot or a tensor nobody else writes to)."""

    meta: ObjectMeta
    tensor: torch.Tensor | None = None
    release: Callable[[], None] | None = None
    blob: list[bytes | memoryview] | None = None
    recode: str | None = None  # write ``blob`` in this byte codec (an opaque store's tier codec)
    # Told once whether the tier holds the object after its write (False: dropped, failed, or
    # refused): a put that acknowledges only durable objects waits on it (WriteAcks).
    on_written: Callable[[bool], None] | None = None

    @property
    def nbytes(self) -> int:
        if self.blob is not None:
            return parts_nbytes(self.blob)
        return 0 if self.tensor is None else self.tensor.numel() * self.tensor.element_size()

    def done(self, held: bool = False) -> None:
        if self.release is not None:
            self.release()
            self.release = None
        if self.on_written is not None:
            self.on_written(held)
            self.on_written = None


class WriteAcks:
    """Counts queued writes until each has an outcome: how a put waits for its objects to reach
    a durable tier before it answers (the daemon's ``serve.ack: disk``). What the tier holds
    afterwards, not what a write reported, decides what is acknowledged (BlobStore.held_durably)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting = 0
        self._callbacks: list[Callable[[], None]] = []

    def expect(self, key: bytes) -> Callable[[bool], None]:
        """A callback for one queued write of ``key`` (PendingWrite.on_written)."""
        with self._cond:
            self._waiting += 1

        def written(_held: bool) -> None:
            with self._cond:
                self._waiting -= 1
                done = self._waiting == 0
                callbacks = self._callbacks if done else []
                if done:
                    self._callbacks = []
                self._cond.notify_all()
            for fn in callbacks:
                fn()
        return written

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until every expected write has an outcome; False if ``timeout_s`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting == 0, timeout=timeout_s)

    def when_done(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once every expected write has an outcome (now, if none is out): from the
        writer thread that finished last, so an event loop can await it without a thread."""
        with self._cond:
            if self._waiting:
                self._callbacks.append(fn)
                return
        fn()


class TierWriter:
    def __init__(self, tier: BlobTier, counters: Counters, queue_size: int, block: bool,
                 timeout_s: float, max_bytes: int | None = None) -> None:
        self.tier = tier
        self.counters = counters
        self.block = block
        self.timeout_s = timeout_s
        self._q: queue.Queue[PendingWrite | None] = queue.Queue(maxsize=queue_size)
        # Queued writes hold memory the tiers' budgets do not count (an evicted object on its way
        # down, a write-through copy): bounded in bytes too, so the process stays near its budget.
        self.max_bytes = max_bytes
        self._bytes = 0
        self._failed = False  # a batch failed already: later failures are counted, not logged
        # A remote tier pays a round trip per batch, and an engine queues a put's objects one by
        # one, microseconds apart: wait a moment for the rest, so a 64-chunk prompt is one
        # pipeline per node rather than 64 round trips.
        self._linger_s = _LINGER_S if tier.is_remote else 0.0
        self._batch = _REMOTE_BATCH if tier.is_remote else _BATCH
        self._room = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"kvstore-writer-{tier.name}", daemon=True)
        self._thread.start()

    def submit(self, item: PendingWrite) -> bool:
        size = item.nbytes
        if self.max_bytes is not None:
            with self._room:  # one item always fits, however large
                if not self._room.wait_for(lambda: self._bytes == 0 or self._bytes + size <= self.max_bytes,
                                           timeout=self.timeout_s if self.block else 0):
                    return self._drop(item)
                self._bytes += size
        try:
            if self.block:
                self._q.put(item, timeout=self.timeout_s)
            else:
                self._q.put_nowait(item)
            return True
        except queue.Full:
            self._written(size)
            return self._drop(item)

    def _drop(self, item: PendingWrite) -> bool:
        item.done()
        self.counters.tier(self.tier.name, "dropped_writes")
        return False

    def _written(self, size: int) -> None:
        if self.max_bytes is not None:
            with self._room:
                self._bytes -= size
                self._room.notify_all()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            batch = [item]
            until = time.monotonic() + self._linger_s
            while item is not None and len(batch) < self._batch:
                try:
                    wait = until - time.monotonic()
                    nxt = self._q.get(timeout=wait) if wait > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                batch.append(nxt)
            stop = any(b is None for b in batch)
            work = [b for b in batch if b is not None]
            try:
                self._write(work)
            finally:
                for _ in batch:
                    self._q.task_done()
            if stop:
                return

    def _write(self, work: list[PendingWrite]) -> None:
        if not work:
            return
        codec = self.tier.config.codec
        t0 = time.perf_counter()
        try:
            encoded = []
            for w in work:
                try:
                    if w.blob is not None:
                        parts = recode(join_parts(w.blob), w.recode) if w.recode else w.blob
                    else:
                        assert w.tensor is not None, "a pending write carries a tensor or an encoded object"
                        parts = encode_object(w.meta, w.tensor, codec)
                except Exception as exc:  # one object that cannot be encoded fails alone
                    log.warning("tier %s: object %s not written: %s", self.tier.name, w.meta.key.hex(), exc)
                    self.counters.tier(self.tier.name, "write_errors")
                    continue
                encoded.append((w.meta, parts))
            self.tier.put_blobs(encoded)
            self.counters.tier(self.tier.name, "write_seconds", time.perf_counter() - t0)
            waited = [w for w in work if w.on_written is not None]
            if waited:  # what the tier holds now is the outcome (a refusal or a failed file is not)
                for w, held in zip(waited, self.tier.contains([w.meta.key for w in waited])):
                    w.done(held)
        except Exception as exc:  # never let one bad write kill the writer thread
            # The first failure with its traceback (a bug shows where), later ones counted only:
            # a backend that keeps failing must not flood the log.
            if not self._failed:
                self._failed = True
                log.exception("writer for tier %s failed on a batch of %d (later failures are counted as "
                              "write_errors, not logged)", self.tier.name, len(work))
            else:
                log.debug("writer for tier %s failed on a batch of %d: %r", self.tier.name, len(work), exc)
            self.counters.tier(self.tier.name, "write_errors", len(work))
        finally:
            for w in work:
                self._written(w.nbytes)
                w.done()

    def has_room(self, nbytes: int, items: int = 1) -> bool:
        """Whether ``items`` submits of ``nbytes`` in all would be taken now without waiting. A
        snapshot (another thread may fill the queue first), for a caller choosing between doing a
        put on its own thread and handing it to one that may block."""
        if self._q.maxsize and self._q.qsize() + items > self._q.maxsize:
            return False
        if self.max_bytes is None:
            return True
        with self._room:
            return self._bytes == 0 or self._bytes + nbytes <= self.max_bytes

    @property
    def pending(self) -> int:
        return self._q.unfinished_tasks

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far is written."""
        if timeout_s is None:
            self._q.join()
            return True
        deadline = time.monotonic() + timeout_s
        while self._q.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
