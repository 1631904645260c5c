"""A PUT body checked while it arrives: each object's header is parsed and its payload hashed
chunk by chunk as the chunks land in the receive buffer.

Why: the checksum pass over a whole 2 MiB body after the last byte was a tenth of a PUT's time
on the daemon's one event-loop thread, reading memory that had left the cache; hashing each
chunk right after it is copied reads it from cache, while the client is still sending the rest.
The result is the same check as :meth:`kvstore.blobstore.BlobStore.verify` (the same header
parse, the same digest, the same key and size checks): only its timing differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from kvstore.blobstore import BlobStore
from kvstore.errors import CorruptObjectError, InvalidInputError
from kvstore.objects import Header, NeedMore, ObjectMeta, parse_header
from kvstore.wire import WireError, batch_header_end, object_spans, parse_batch_header


@dataclass
class _Pending:
    key: bytes
    start: int
    end: int
    header: Header | None = None
    hashed: int = 0  # absolute offset hashed up to
    hasher: xxhash.xxh3_64 | None = None
    error: str | None = None


class BodyIntake:
    """Follows a batch body (kvstore.wire) as ``feed(got)`` reports how many bytes of ``buf``
    are filled, in order. ``finish()`` then returns the checked objects, or raises the first
    problem (WireError for the batch layout, InvalidInputError for an object) exactly as the
    checks after a whole body would: an error never interrupts the receive, so the connection
    stays in step and the client gets its 400."""

    def __init__(self, buf: memoryview, max_keys: int) -> None:
        self.buf = buf
        self.max_keys = max_keys
        self.got = 0
        self._objects: list[_Pending] | None = None
        self._at = 0  # index of the first object not fully hashed
        self._error: WireError | None = None  # a bad batch header: raised by finish()

    def feed(self, got: int) -> None:
        self.got = got
        if self._error is not None:
            return
        if self._objects is None:
            try:
                if not self._layout():
                    return
            except WireError as exc:
                # Kept without its traceback: its frames hold this intake, whose buffer is an
                # arena region, in a cycle that only the garbage collector would break.
                self._error = exc.with_traceback(None)
                return
        assert self._objects is not None
        while self._at < len(self._objects):
            obj = self._objects[self._at]
            if not self._advance(obj):
                return
            self._at += 1

    def _layout(self) -> bool:
        """Parse the batch header once it is all here; False while it is not."""
        end = batch_header_end(self.buf[:self.got])
        if end is None or self.got < min(end, self.buf.nbytes):
            return False
        keys, sizes, off = parse_batch_header(self.buf[:self.got], self.max_keys)  # raises WireError
        objects = []
        for key, span in object_spans(keys, sizes, off, self.buf.nbytes):
            if span is None:
                raise WireError(f"put batch has no object for key {key.hex()}")
            objects.append(_Pending(key, span.start, span.stop))
        self._objects = objects
        return True

    def _advance(self, obj: _Pending) -> bool:
        """Hash what has arrived of ``obj``; True once it is done (checked or failed)."""
        if obj.error is not None:
            return self.got >= obj.end
        if obj.header is None:
            try:
                obj.header = parse_header(self.buf[obj.start:min(self.got, obj.end)], obj.end - obj.start)
            except NeedMore:
                return False
            except CorruptObjectError as exc:
                obj.error = str(exc)
                return self.got >= obj.end
            obj.hashed = obj.start + obj.header.payload_offset
            obj.hasher = xxhash.xxh3_64()
        assert obj.hasher is not None
        upto = min(self.got, obj.end)
        if upto > obj.hashed:
            obj.hasher.update(self.buf[obj.hashed:upto])
            obj.hashed = upto
        if upto < obj.end:
            return False
        if obj.hasher.intdigest() != obj.header.payload_sum:
            obj.error = "payload checksum mismatch"
        return True

    def finish(self) -> list[tuple[bytes, memoryview, ObjectMeta]]:
        """(key, object view, meta) per object, all checked; the body must be complete."""
        self.feed(self.got)
        if self._error is not None:
            error, self._error = self._error, None  # not kept: the raise gives it a traceback
            raise error
        if self._objects is None or self._at < len(self._objects):
            raise WireError(f"request body ended at {self.got} of {self.buf.nbytes} bytes")
        out = []
        for obj in self._objects:
            if obj.error is not None:
                raise InvalidInputError(f"object for key {obj.key.hex()} is not a valid kvstore object: {obj.error}")
            assert obj.header is not None
            view = self.buf[obj.start:obj.end]
            BlobStore.check(obj.header.meta, view.nbytes - obj.header.payload_offset, obj.key)
            out.append((obj.key, view, obj.header.meta))
        return out
