"""Chunk objects as files: atomic writes, an index rebuilt from the directory, an LRU byte budget.

Why it survives SIGKILL: a file only gets its final name through ``os.replace`` after all its
bytes are written, so a killed writer leaves at most a ``*.tmp`` file, which start-up deletes.
Any final file that is still bad (disk corruption, a power loss without fsync) fails the object
checksum on read and is removed, so a torn write is a miss, never data.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import xxhash

from kvstore.config import TierConfig, format_size
from kvstore.errors import ConfigError, CorruptObjectError
from kvstore.objects import NeedMore, ObjectMeta, check_meta, parse_header
from kvstore.tiers.base import BlobTier, ReadResult, TierContext, TierStats

log = logging.getLogger(__name__)
_SUFFIX = ".kvo"
_LAYOUT = "v1"  # directory layout version, bumped if file naming ever changes


class DiskTier(BlobTier):
    is_durable = True

    def __init__(self, config: TierConfig, context: TierContext) -> None:
        super().__init__(config, context)
        namespace, pins, on_evict = context.namespace, context.pins, context.on_evict
        self._on_lost = context.on_lost
        # One directory per model+tenant namespace: stores of different models can share a cache
        # dir, and clear() removes only this namespace. The capacity applies per namespace.
        self.root = os.path.join(os.path.expanduser(str(config.path)), _LAYOUT, namespace.hex()[:16])
        self.capacity = int(config.capacity or 0)
        self._pins = pins
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, LRU first
        self._used = 0
        self._reserved = 0
        # Writes failed in a row (a full or broken disk): said when they start (at most once a
        # minute, should they fail and succeed by turns) and when they succeed again.
        self._failing = 0
        self._failing_said = False
        self._failing_said_at = -1e9
        self._local = threading.local()
        self._made: set[str] = set()  # shard directories known to exist (_write_file)
        try:
            os.makedirs(self.root, exist_ok=True)
            probe = os.path.join(self.root, f".probe-{os.getpid()}.tmp")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as exc:  # a read-only mount, a path under a file, no permission
            raise ConfigError(f"tiers.disk.path {config.path}: cannot write there ({exc.strerror or exc})") from None
        self._rebuild_index()
        self._warn_if_short_of_space()

    def _warn_if_short_of_space(self) -> None:
        """A budget beyond the free space fails later, one write at a time: say so now."""
        free = shutil.disk_usage(self.root).free
        if self.capacity > free + self._used:
            log.warning("tiers.disk.capacity %s exceeds the %s free at %s: writes will fail once the disk fills",
                        format_size(self.capacity), format_size(free), self.config.path)

    # ---- start-up ------------------------------------------------------------------------

    def _rebuild_index(self) -> None:
        """Index every complete object file, oldest first; delete leftovers of killed writers."""
        found: list[tuple[float, bytes, int]] = []
        removed_tmp = 0
        for shard in os.scandir(self.root):
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard.path):
                name = entry.name
                if name.endswith(".tmp"):
                    _unlink(entry.path)
                    removed_tmp += 1
                    continue
                if not name.endswith(_SUFFIX):
                    continue
                try:
                    key = bytes.fromhex(name[:-len(_SUFFIX)])
                    st = entry.stat()
                except (ValueError, OSError):
                    continue
                found.append((st.st_mtime, key, st.st_size))
        found.sort()
        for _mtime, key, size in found:
            self._index[key] = size
            self._used += size
        if removed_tmp:
            log.info("disk tier %s: removed %d partial writes left by a killed process", self.root, removed_tmp)
        victims = self._evict_locked(0)
        self._drop(victims)
        log.debug("disk tier %s: indexed %d objects, %d bytes", self.root, len(self._index), self._used)

    # ---- reads ---------------------------------------------------------------------------

    def path_of(self, key: bytes) -> str:
        hexkey = key.hex()
        return os.path.join(self.root, hexkey[:2], hexkey + _SUFFIX)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        index = self._index
        found = [k in index for k in keys]
        if self.config.shared:
            for i, key in enumerate(keys):
                if not found[i]:
                    found[i] = self._adopt(key)
        return found

    def _adopt(self, key: bytes) -> bool:
        """A ``shared`` directory is also written by other processes (another engine, or vLLM's
        worker beside its scheduler): a file we have not indexed may exist. Adopting it is safe
        because files appear only by atomic rename and every read verifies its checksum."""
        try:
            size = os.stat(self.path_of(key)).st_size
        except OSError:
            return False
        with self._lock:
            if key not in self._index:
                self._index[key] = size
                self._used += size
        return True

    def get_blobs(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        return [self._read(key, None) for key in keys]

    def iter_blobs(self, keys: Sequence[bytes]) -> Iterator[memoryview | None]:
        scratch = self._scratch
        for key in keys:
            yield self._read(key, scratch)

    @property
    def _scratch(self) -> "_Scratch":
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = _Scratch()
        return scratch

    def _read(self, key: bytes, scratch: "_Scratch | None") -> memoryview | None:
        try:
            with open(self.path_of(key), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                # np.empty skips the zero-fill a bytearray would do; the scratch buffer also skips
                # the page faults of a fresh allocation, which cost more than reading the file.
                buf = scratch.get(size) if scratch is not None else self._buffer(size)
                view = memoryview(buf)[:size]
                got = 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except FileNotFoundError:
            self._forget(key)
            return None
        except OSError as exc:
            log.warning("disk tier: cannot read %s: %s", self.path_of(key), exc)
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        return view[:got]

    def _buffer(self, size: int) -> memoryview | np.ndarray:
        view = self.read_buffers(size) if self.read_buffers is not None and size else None
        return view if view is not None else np.empty(size, dtype=np.uint8)

    def read_into(self, key: bytes, expect: ObjectMeta, segments: list[memoryview]) -> ReadResult:
        """Read a raw-codec object's payload straight into ``segments`` (the caller's buffer, in
        payload order) and verify it there: no intermediate buffer and no extra copy.

        On CORRUPT the segments hold garbage; the caller must not use them (its hit ends before).
        FALLBACK means the object is fine but not raw: decode it through :meth:`get_blobs`."""
        path = self.path_of(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._forget(key)
            return ReadResult.MISSING
        except OSError as exc:
            log.warning("disk tier: cannot open %s: %s", path, exc)
            return ReadResult.MISSING
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 4096, 0)
            try:
                header = parse_header(head, size)
            except NeedMore as more:
                header = parse_header(os.pread(fd, more.args[0], 0), size)
            check_meta(header.meta, expect)
            if header.meta.codec != "raw":
                return ReadResult.FALLBACK
            want = sum(seg.nbytes for seg in segments)
            if header.payload_len != want:
                raise CorruptObjectError(f"payload is {header.payload_len} bytes, the chunk needs {want}")
            _preadv_all(fd, segments, header.payload_offset)
            h = xxhash.xxh3_64()
            for seg in segments:
                h.update(seg)
            if h.intdigest() != header.payload_sum:
                raise CorruptObjectError("payload checksum mismatch")
        except CorruptObjectError as exc:
            self.last_error = str(exc)
            return ReadResult.CORRUPT
        except OSError as exc:
            log.warning("disk tier: read of %s failed: %s", path, exc)
            return ReadResult.MISSING
        finally:
            os.close(fd)
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        return ReadResult.OK

    def _forget(self, key: bytes) -> None:
        """An indexed file is gone (deleted from outside): drop it, and say so to the stack."""
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size
        if size is not None and self._on_lost is not None:
            self._on_lost(key)

    # ---- writes --------------------------------------------------------------------------

    def put_blobs(self, items: Sequence[tuple[ObjectMeta, list[bytes | memoryview]]]) -> int:
        written = 0
        for meta, parts in items:
            size = sum(memoryview(p).nbytes for p in parts)
            with self._lock:
                if meta.key in self._index:
                    continue
                if size > self.capacity:
                    self.refuse(f"an object is larger than the whole capacity ({self.capacity} bytes)")
                    continue
                victims = self._evict_locked(size)
                if self._used + self._reserved + size > self.capacity:
                    self.refuse("what is left is pinned")
                    self._drop(victims)
                    continue
                self._reserved += size
            self._drop(victims)
            ok = self._write_file(meta.key, parts)
            with self._lock:
                self._reserved -= size
                if ok and meta.key not in self._index:
                    self._index[meta.key] = size
                    self._used += size
            if ok:
                written += 1
                self.counters.tier(self.name, "puts")
                self.counters.tier(self.name, "put_bytes", size)
        return written

    def _write_file(self, key: bytes, parts: list[bytes | memoryview]) -> bool:
        path = self.path_of(key)
        parent = os.path.dirname(path)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            # 256 shard directories, each made once rather than looked up on every write (three
            # system calls and a caught exception, on the thread that shares the GIL with a
            # daemon's event loop); one removed behind our back is made again.
            if parent not in self._made:
                os.makedirs(parent, exist_ok=True)
                self._made.add(parent)
            try:
                f = open(tmp, "wb", buffering=0)
            except FileNotFoundError:
                os.makedirs(parent, exist_ok=True)
                f = open(tmp, "wb", buffering=0)
            with f:
                for part in parts:
                    view = memoryview(part)
                    while view.nbytes:
                        n = f.write(view)
                        view = view[n:]
                if self.config.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self.config.fsync:
                _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            # A full disk fails every write until space returns: one line when it starts and one
            # when it ends, the count in between (write_errors). No partial file stays behind.
            _unlink(tmp, quiet=True)  # may never have been made (the failure says why, below)
            self.counters.tier(self.name, "write_errors")
            now = time.monotonic()
            with self._lock:
                self._failing += 1
                say = not self._failing_said and now - self._failing_said_at > 60  # at most once a minute
                if say:
                    self._failing_said, self._failing_said_at = True, now
            if say:
                log.warning("tier %s: writes under %s fail: %s (each counted as write_errors; said again when "
                            "writes succeed)", self.name, self.root, exc)
            return False
        with self._lock:
            failed, said = self._failing, self._failing_said
            self._failing, self._failing_said = 0, False
        if said:
            log.warning("tier %s: writes succeed again after %d failed", self.name, failed)
        return True

    # ---- eviction ------------------------------------------------------------------------

    def _evict_locked(self, incoming: int) -> list[tuple[bytes, int]]:
        """Pick LRU unpinned victims until ``incoming`` bytes fit; removes them from the index."""
        victims: list[tuple[bytes, int]] = []
        if self._used + self._reserved + incoming <= self.capacity:
            return victims
        for key in list(self._index):
            if self._used + self._reserved + incoming <= self.capacity:
                break
            if self._pins.is_pinned(key):
                continue
            size = self._index.pop(key)
            self._used -= size
            victims.append((key, size))
        return victims

    def _drop(self, victims: list[tuple[bytes, int]]) -> None:
        for key, _size in victims:
            self.counters.tier(self.name, "evictions")
            path = self.path_of(key)
            if self._on_evict is not None:
                self._on_evict(self, key, lambda p=path: _read_path(p))
            _unlink(path)

    def touch(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            entries = self._index
            for key in keys:
                if key in entries:
                    entries.move_to_end(key)

    def delete(self, keys: Sequence[bytes]) -> int:
        removed = 0
        for key in keys:
            with self._lock:
                size = self._index.pop(key, None)
                if size is not None:
                    self._used -= size
            _unlink(self.path_of(key))
            removed += size is not None
        return removed

    def clear(self) -> None:
        self.delete(list(self._index))

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(objects=len(self._index), bytes=self._used, capacity=self.capacity,
                             pinned_bytes=self.pinned_bytes_of(self._pins.active()))

    def pinned_bytes_of(self, keys: Sequence[bytes]) -> int:
        index = self._index
        return sum(index.get(k, 0) for k in keys)


_IOV_MAX = 512


def _preadv_all(fd: int, segments: list[memoryview], offset: int) -> None:
    """preadv until every segment is full; a short file is a CorruptObjectError."""
    pending = [memoryview(s).cast("B") for s in segments]
    while pending:
        batch = pending[:_IOV_MAX]
        n = os.preadv(fd, batch, offset)
        if n <= 0:
            raise CorruptObjectError("object shorter than its header says (torn write?)")
        offset += n
        while n and pending:
            first = pending[0]
            if n >= first.nbytes:
                n -= first.nbytes
                pending.pop(0)
            else:
                pending[0] = first[n:]
                n = 0


class _Scratch:
    """A per-thread read buffer that only grows."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)

    def get(self, size: int) -> np.ndarray:
        if self._buf.size < size:
            self._buf = np.empty(size, dtype=np.uint8)
        return self._buf


def _read_path(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _unlink(path: str, quiet: bool = False) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if not quiet:
            log.warning("cannot remove %s: %s", path, exc)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
