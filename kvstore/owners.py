"""Bytes and objects per owner (the daemon's tenants), kept across restarts.

Why a journal: an object's owner is not in the object (engines make objects; the daemon only
scopes their keys by tenant, one way), so after a restart the objects found on disk would count
against nobody and quotas would stop holding. Each change is appended as a msgpack record to a
file beside the disk tier; start-up replays it, keeps only keys some tier still holds, and
rewrites it compacted. A crash can lose the last records: those objects then count against no
one (as every object did before), never against the wrong tenant. A journal write that fails (a
full disk) never fails the put that made it: the ledger in memory stays right, the failure is
said once, and the journal is rewritten whole from memory once the disk takes writes again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from typing import Callable, Sequence

import msgpack

from kvstore.errors import ConfigError

log = logging.getLogger(__name__)
_RETRY_S = 2.0  # how often a failing journal is retried


def _is_add(record: object) -> bool:
    return (isinstance(record, list) and len(record) == 3 and isinstance(record[0], bytes) and len(record[0]) <= 64
            and isinstance(record[1], str) and isinstance(record[2], int) and 0 <= record[2] < 1 << 48)


class OwnerLedger:
    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._owner: dict[bytes, tuple[str, int]] = {}
        self._bytes: dict[str, int] = {}
        self._objects: dict[str, int] = {}
        # Journal I/O happens on a thread of its own: a put records its objects in memory and
        # goes on, so a disk that is slow, full or hung never holds up a put (nor, in the
        # daemon, its event loop). The thread appends what piles up, or rewrites the whole file.
        self._wake = threading.Condition(self._lock)
        self._pending: list[list] = []
        self._journal = None  # the open file: touched by the writer thread only (after load)
        self._records = 0  # records in the journal file, live or not
        self._failing_since: float | None = None  # a journal write failed: rewrite it when we can
        self._closing = False
        self._busy = False
        self._thread: threading.Thread | None = None

    # ---- persistence ---------------------------------------------------------------------

    def load(self, present: Callable[[Sequence[bytes]], list[bool]]) -> None:
        """Replay the journal, keep the keys ``present`` says a tier holds, rewrite it compacted,
        then start the writer thread."""
        if self.path is None:
            return
        entries: dict[bytes, tuple[str, int]] = {}
        skipped = 0
        try:
            with open(self.path, "rb") as f:
                for record in msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 20):
                    if _is_add(record):
                        entries[record[0]] = (record[1], record[2])
                    elif isinstance(record, list) and len(record) == 1 and isinstance(record[0], bytes):
                        entries.pop(record[0], None)
                    else:
                        skipped += 1
        except FileNotFoundError:
            pass
        except Exception as exc:  # a torn tail or garbage: keep what replayed, never fail the start
            log.warning("owner journal %s: stopped reading at a damaged record (%s)", self.path, exc)
        if skipped:
            log.warning("owner journal %s: skipped %d malformed records", self.path, skipped)
        keys = list(entries)
        held = present(keys) if keys else []
        with self._lock:
            for key, there in zip(keys, held):
                if there:
                    self._add_locked(key, *entries[key])
            snapshot = dict(self._owner)
        try:
            self._rewrite_file(snapshot)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):  # a path it cannot write: the operator's to fix
                raise ConfigError(f"owner journal {self.path}: cannot write it ({exc.strerror or exc})") from None
            self._failed(exc)  # a full disk: start anyway, serve what is stored
        if self._owner:
            log.info("owner journal: %d objects of %d tenants restored", len(self._owner), len(self._bytes))
        self._thread = threading.Thread(target=self._run, name="kvstore-owner-journal", daemon=True)
        self._thread.start()

    def _rewrite_file(self, snapshot: dict[bytes, tuple[str, int]]) -> None:
        """Replace the journal by the live entries only (at start, when it has grown 4x, and
        after a failed write). Raises OSError, leaving the old journal in place."""
        assert self.path is not None
        if self._journal is not None:
            journal, self._journal = self._journal, None
            with contextlib.suppress(OSError):  # unflushed bytes: the new file replaces them anyway
                journal.close()
        tmp = f"{self.path}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(tmp, "wb") as f:
                for key, (owner, size) in snapshot.items():
                    f.write(msgpack.packb([key, owner, size]))
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._journal = open(self.path, "ab")
        self._records = len(snapshot)
        if self._failing_since is not None:
            log.warning("owner journal %s: written again after %.0f s", self.path, time.monotonic() - self._failing_since)
            self._failing_since = None

    def _append(self, records: list[list]) -> None:
        """Queue records for the writer thread (the caller holds the lock)."""
        if self.path is not None and records:
            self._pending.extend(records)
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._wake.wait_for(lambda: bool(self._pending) or self._closing, timeout=_RETRY_S)
                if self._closing and not self._pending and self._failing_since is None:
                    return
                batch, self._pending = self._pending, []
                # While failing, the file may end in a torn record: only a rewrite repairs it. The
                # in-memory ledger already reflects every queued record, so a snapshot carries them.
                whole = self._failing_since is not None or self._records + len(batch) > max(10_000, 4 * len(self._owner))
                snapshot = dict(self._owner) if whole else None
                if not batch and snapshot is None:
                    continue
                self._busy = True
            try:
                if snapshot is not None:
                    self._rewrite_file(snapshot)
                else:
                    assert self._journal is not None
                    self._journal.write(b"".join(msgpack.packb(r) for r in batch))
                    self._journal.flush()
                    self._records += len(batch)
            except OSError as exc:
                self._failed(exc)
                if self._closing:
                    return  # a last try failed: what is not written counts against no one after a restart
            finally:
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()

    def _failed(self, exc: OSError) -> None:
        """A write failed, maybe halfway through a record: stop appending to this file (its end
        may be torn) and rewrite it whole from memory, retried every few seconds."""
        if self._journal is not None:
            with contextlib.suppress(OSError):
                self._journal.close()
            self._journal = None
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("owner journal %s: cannot write it (%s); tenants' usage is kept in memory and the journal "
                        "rewritten once the disk takes writes again", self.path, getattr(exc, "strerror", None) or exc)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued record is written (and a failing journal rewritten)."""
        with self._lock:
            return self._wake.wait_for(lambda: not self._pending and not self._busy and self._failing_since is None,
                                       timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (one last try) and stop the writer; a hung disk is given up on
        after ``timeout_s`` (those records then count against no one after a restart)."""
        thread = self._thread
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("owner journal %s: not written within %.0f s of stopping; giving up on it", self.path, timeout_s)
                return
        if self._journal is not None:
            with contextlib.suppress(OSError):
                self._journal.close()
            self._journal = None

    # ---- accounting ----------------------------------------------------------------------

    def _add_locked(self, key: bytes, owner: str, size: int) -> None:
        self._owner[key] = (owner, size)
        self._bytes[owner] = self._bytes.get(owner, 0) + size
        self._objects[owner] = self._objects.get(owner, 0) + 1

    def add(self, items: Sequence[tuple[bytes, str, int]], quota: int | None = None) -> int | None:
        """Record new objects of one owner, all or none: returns None if ``quota`` allows them,
        else the bytes the owner holds now (nothing recorded)."""
        if not items:
            return None
        owner = items[0][1]
        with self._lock:
            used = self._bytes.get(owner, 0)
            if quota is not None and used + sum(size for _k, _o, size in items) > quota:
                return used
            for key, who, size in items:
                if key not in self._owner:
                    self._add_locked(key, who, size)
            self._append([list(item) for item in items])
        return None

    def forget(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            gone = []
            for key in keys:
                entry = self._owner.pop(key, None)
                if entry is None:
                    continue
                owner, size = entry
                self._bytes[owner] = max(0, self._bytes.get(owner, 0) - size)
                self._objects[owner] = max(0, self._objects.get(owner, 0) - 1)
                gone.append([key])
            self._append(gone)

    def clear(self) -> None:
        with self._lock:
            self._append([[key] for key in self._owner])
            self._owner.clear()
            self._bytes.clear()
            self._objects.clear()

    def keys_of(self, owner: str) -> list[bytes]:
        with self._lock:
            return [k for k, (o, _size) in self._owner.items() if o == owner]

    def usage(self, owner: str) -> int:
        return self._bytes.get(owner, 0)

    def summary(self) -> dict[str, dict[str, int]]:
        """Per owner: bytes and objects held."""
        with self._lock:
            return {o: {"bytes": b, "objects": self._objects.get(o, 0)} for o, b in self._bytes.items()}
