"""The daemon's wire format, used by both server and client (one definition, two users).

Control bodies are msgpack maps (keys as 16-byte binary). Object batches (PUT bodies and GET
responses) are a msgpack header followed by the raw objects back to back, so tensors never pass
through base64 or JSON and large responses can be streamed object by object:

    u32 little-endian header length | msgpack {"v": 1, "keys": [bin16...], "sizes": [int...]} | objects

A size of -1 marks a key that is absent (GET responses only).
"""

from __future__ import annotations

import struct
from typing import Any, Iterator, Sequence

import msgpack

WIRE_VERSION = 1
KEY_BYTES = 16
BATCH_CONTENT_TYPE = "application/x-kvstore-batch"
MSGPACK_CONTENT_TYPE = "application/msgpack"
_LEN = struct.Struct("<I")
MAX_HEADER = 16 * 1024 * 1024


class WireError(ValueError):
    """A request or response body that does not follow this format; the message says how."""


def pack_control(data: dict[str, Any]) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def unpack_control(body: bytes) -> dict[str, Any]:
    try:
        data = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"body is not valid msgpack: {exc}") from None
    if not isinstance(data, dict):
        raise WireError("body must be a msgpack map")
    return data


def check_keys(keys: Any, max_keys: int) -> list[bytes]:
    if not isinstance(keys, list):
        raise WireError("'keys' must be a list of 16-byte binary keys")
    if len(keys) > max_keys:
        raise WireError(f"batch of {len(keys)} keys exceeds the limit of {max_keys}")
    for i, key in enumerate(keys):
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise WireError(f"keys[{i}] must be {KEY_BYTES} bytes of binary, got {type(key).__name__}"
                            f"{f' of length {len(key)}' if isinstance(key, (bytes, str)) else ''}")
    return keys


def batch_header(keys: Sequence[bytes], sizes: Sequence[int]) -> bytes:
    head = msgpack.packb({"v": WIRE_VERSION, "keys": list(keys), "sizes": list(sizes)}, use_bin_type=True)
    return _LEN.pack(len(head)) + head


Blob = bytes | memoryview
"""An object as one buffer, or as a tuple of its parts in order (header, payload: never joined
just to send or write them)."""


def as_parts(blob: Blob | tuple[Blob, ...]) -> tuple[Blob, ...]:
    return blob if isinstance(blob, tuple) else (blob,)


def parts_nbytes(parts: Sequence[Blob]) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def pack_batch(items: Sequence[tuple[bytes, Blob | tuple[Blob, ...] | None]]) -> list[Blob]:
    """Parts of a batch body (write them in order; nothing is concatenated)."""
    objects = [None if blob is None else as_parts(blob) for _, blob in items]
    sizes = [-1 if obj is None else parts_nbytes(obj) for obj in objects]
    parts: list[Blob] = [batch_header([k for k, _ in items], sizes)]
    for obj in objects:
        if obj is not None:
            parts.extend(obj)
    return parts


def batch_header_end(buf: bytes | memoryview) -> int | None:
    """Where a batch body's header ends (the offset of its first object), from its first four
    bytes; None with fewer (a body still arriving)."""
    view = memoryview(buf)
    if view.nbytes < _LEN.size:
        return None
    return _LEN.size + _LEN.unpack_from(view, 0)[0]


def parse_batch_header(buf: bytes | memoryview, max_keys: int) -> tuple[list[bytes], list[int], int]:
    """(keys, sizes, offset of the first object) from the start of a batch body."""
    view = memoryview(buf)
    if view.nbytes < _LEN.size:
        raise WireError("batch body truncated before its header length")
    (hlen,) = _LEN.unpack_from(view, 0)
    if hlen > MAX_HEADER or _LEN.size + hlen > view.nbytes:
        raise WireError(f"batch header length {hlen} exceeds the body")
    try:
        head = msgpack.unpackb(view[_LEN.size:_LEN.size + hlen], raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"batch header is not valid msgpack: {exc}") from None
    if not isinstance(head, dict) or head.get("v") != WIRE_VERSION:
        raise WireError(f"batch header must be a map with v={WIRE_VERSION}")
    keys = check_keys(head.get("keys"), max_keys)
    sizes = head.get("sizes")
    if not isinstance(sizes, list) or len(sizes) != len(keys) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= -1 for s in sizes):
        raise WireError("batch 'sizes' must list one integer >= -1 per key")
    return keys, sizes, _LEN.size + hlen


def object_spans(keys: Sequence[bytes], sizes: Sequence[int], offset: int,
                 total: int) -> list[tuple[bytes, slice | None]]:
    """Where each object of a batch lies in its body of ``total`` bytes (None: absent), from
    its header; WireError unless the objects fill the body exactly."""
    spans: list[tuple[bytes, slice | None]] = []
    for key, size in zip(keys, sizes):
        if size < 0:
            spans.append((key, None))
            continue
        if offset + size > total:
            raise WireError(f"batch body truncated: object for {key.hex()} needs {size} bytes at offset {offset}")
        spans.append((key, slice(offset, offset + size)))
        offset += size
    if offset != total:
        raise WireError(f"{total - offset} trailing bytes after the batch's objects")
    return spans


def unpack_batch(body: bytes | memoryview, max_keys: int = 1 << 20) -> list[tuple[bytes, memoryview | None]]:
    keys, sizes, off = parse_batch_header(body, max_keys)
    view = memoryview(body)
    return [(key, None if span is None else view[span]) for key, span in object_spans(keys, sizes, off, view.nbytes)]


def iter_chunks(parts: Sequence[bytes | memoryview], chunk: int = 4 << 20) -> Iterator[memoryview]:
    for part in parts:
        view = memoryview(part).cast("B")
        for i in range(0, view.nbytes, chunk):
            yield view[i:i + chunk]
