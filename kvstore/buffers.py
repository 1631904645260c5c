"""Memory to receive objects into: unzeroed buffers, and a pre-faulted arena for the daemon's
memory tier.

Why: receiving a 32 MiB object into a fresh ``bytearray`` costs more than the copy itself, because
the kernel faults the new pages in one by one inside ``recv_into`` (measured here: 16 LMCache
chunks land in 0.6 s into fresh memory, 0.3-0.4 s into memory touched once before). The arena is
one allocation of the tier's whole budget, touched once at start, and objects are carved out of it.
(Transparent huge pages were tried first: faster in a tight loop, 2x slower in the server, where
every fresh 2 MiB page must be found and zeroed inside the socket read.)

Safety: a region returns to the free list only when the last reference to it is gone, never when
the tier "drops" it: the tier evicts while a GET may still be sending the bytes or a disk writer
still writing them. Each region is its own numpy array viewing the arena; every memoryview or
tensor made from it keeps that array alive, and a weakref callback frees the range when it dies.
So an evicted object's memory cannot be handed to a new object while anyone can still read it.
"""

from __future__ import annotations

import bisect
import collections
import mmap
import sys
import threading
import weakref

import numpy as np

ALIGN = 64  # cache-line aligned regions
PAGE = 4096


# glibc serves allocations below its largest dynamic mmap threshold from the heap, where freed
# memory is reused with its pages already mapped; at or above it every allocation is a fresh
# mapping of its own anyway.
_HEAP_MAX = 32 << 20
# Linux 5.14+: fault a range in with one call (Python 3.11's mmap module lacks the names).
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def unzeroed(nbytes: int, *, transient: bool = False, populate: bool = True) -> memoryview:
    """Writable memory to receive into, its contents undefined until written.

    From ``_HEAP_MAX`` up, an anonymous mapping the kernel populates in one call. It beat both
    alternatives in paired A/B runs on 32 MiB objects: ``bytearray(n)`` memsets what the socket
    then overwrites, and ``numpy.empty`` gets transparent huge pages, which stalled daemon PUTs on
    memory compaction (numpy 0.79x of bytearray, populate 1.09x; client GETs 1.27x).

    Below it, heap memory: mappings per object would run into ``vm.max_map_count`` in a daemon
    keeping tens of thousands of objects. Without ``populate`` a mapping's pages are faulted in
    as they are written (memory for data a peer has only announced). ``transient`` (a client's response buffer, dropped
    soon): ``numpy.empty``, reused heap memory that needs no zeroing (a fresh populated mapping
    was 0.53x for 2 MiB GETs). Kept memory is new either way, and ``bytearray`` measured the
    same as a mapping for 2 MiB PUTs."""
    if nbytes < _HEAP_MAX:
        return memoryview(np.empty(nbytes, dtype=np.uint8) if transient or not populate else bytearray(nbytes))
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0)
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(-1, nbytes, flags=flags))


class Arena:
    def __init__(self, nbytes: int, prefault: bool = True) -> None:
        if nbytes <= 0:
            raise ValueError(f"arena size must be positive, got {nbytes}")
        self.nbytes = nbytes
        # An anonymous mapping: address space only, until a page is first written. Without
        # ``prefault`` the process grows as objects arrive (like any allocator), but a freed region
        # keeps its pages, so once the tier has filled, every put lands in memory already mapped:
        # fresh pages cost a 2 MiB put more than its copy (measured: 0.6 vs 1.0 GB/s).
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0)
        if prefault:  # the kernel maps the whole budget now, not during puts
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        else:  # no commit charge for pages never written
            flags |= _NORESERVE
        self._buf = mmap.mmap(-1, nbytes, flags=flags)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # see unzeroed(): huge pages stall puts on compaction
            self._buf.madvise(mmap.MADV_NOHUGEPAGE)
        self._addr = np.frombuffer(self._buf, dtype=np.uint8).ctypes.data
        if prefault and not hasattr(mmap, "MAP_POPULATE"):  # one write per page instead
            np.frombuffer(self._buf, dtype=np.uint8)[::PAGE] = 0
        # Below this offset every page has been mapped. First fit hands out low ranges first, so
        # it only grows; a region above it is populated in one call when handed out (a 2 MiB
        # region: 0.5 ms instead of 0.9 ms of page faults inside the socket read).
        self._mapped = nbytes if prefault else 0
        self._populate = _POPULATE_WRITE
        self._lock = threading.Lock()
        self._starts: list[int] = [0]          # free ranges, sorted by start
        self._sizes: dict[int, int] = {0: nbytes}
        self._free_bytes = nbytes
        self._refs: dict[int, weakref.ref] = {}   # start -> weakref of the live region
        self._classes: list[int] = []  # region sizes in use, sorted (see _size_class)
        # Filled by weakref callbacks, which may run in any thread, even one holding our lock:
        # appending to a deque is atomic, and allocate() does the real work.
        self._freed: collections.deque[tuple[int, int]] = collections.deque()

    def owns(self, view: memoryview) -> bool:
        """Whether ``view`` is memory of this arena (a region allocate() handed out)."""
        obj = view.obj
        if not isinstance(obj, np.ndarray):
            return False
        addr = obj.ctypes.data
        return self._addr <= addr < self._addr + self.nbytes

    @staticmethod
    def region_bytes(view: memoryview) -> int:
        """Size of the region ``view`` (of this arena, see :meth:`owns`) lies in."""
        return int(view.obj.nbytes)

    @property
    def free_bytes(self) -> int:
        with self._lock:
            self._drain()
            return self._free_bytes

    def allocate(self, nbytes: int) -> memoryview | None:
        """A writable view of ``nbytes`` arena bytes (contents undefined), or None when no free
        range is large enough."""
        if nbytes <= 0:
            raise ValueError(f"allocation size must be positive, got {nbytes}")
        with self._lock:
            size = self._size_class(nbytes)
            self._drain()
            start = self._take(size)
            if start is None:
                return None
            region = np.frombuffer(self._buf, dtype=np.uint8, count=nbytes, offset=start)
            freed = self._freed
            self._refs[start] = weakref.ref(region, lambda _r, s=start, n=size: freed.append((s, n)))
            end = min(start + size, self.nbytes)
            fresh = max(start, self._mapped) // PAGE * PAGE
            self._mapped = max(self._mapped, end)
        if fresh < end and self._populate is not None:  # outside the lock: the range is ours
            try:
                self._buf.madvise(self._populate, fresh, end - fresh)
            except OSError:  # an older kernel: the pages fault in as they are written
                self._populate = None
        return memoryview(region)

    def _take(self, size: int) -> int | None:
        """The start of a free range of ``size`` bytes, now in use. Caller holds the lock."""
        for i, start in enumerate(self._starts):  # first fit: ranges are few (objects are big)
            have = self._sizes[start]
            if have < size:
                continue
            del self._sizes[start]
            if have == size:
                del self._starts[i]
            else:
                self._starts[i] = start + size
                self._sizes[start + size] = have - size
            self._free_bytes -= size
            return start
        return None

    def _size_class(self, nbytes: int) -> int:
        """The region size for a request: similar sizes share one class (the largest asked, at most
        1/16 above the smallest). A chunk object and a request body holding one differ by a header
        of a few hundred bytes; with exact sizes every range an evicted object frees would be a
        little short of the next body (measured: 6,444 arena misses in 20 s of the load test)."""
        size = -(-nbytes // ALIGN) * ALIGN
        classes = self._classes
        i = bisect.bisect_left(classes, size)
        if i < len(classes) and classes[i] <= size + size // 16:
            return classes[i]
        if i > 0 and classes[i - 1] + classes[i - 1] // 16 >= size:  # a little above a class: grow it
            classes[i - 1] = size
            return size
        if len(classes) < 256:
            classes.insert(i, size)
        return size

    def _drain(self) -> None:
        while self._freed:
            start, size = self._freed.popleft()
            del self._refs[start]
            self._free_bytes += size
            i = bisect.bisect_left(self._starts, start)
            # Merge with the following and the preceding free range: no fragments of free space.
            if i < len(self._starts) and start + size == self._starts[i]:
                size += self._sizes.pop(self._starts[i])
                del self._starts[i]
            if i > 0 and self._starts[i - 1] + self._sizes[self._starts[i - 1]] == start:
                self._sizes[self._starts[i - 1]] += size
            else:
                self._starts.insert(i, start)
                self._sizes[start] = size
