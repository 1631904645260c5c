"""The self-describing stored object: what disk, Redis and the daemon keep for every chunk.

Layout: ``preamble | header | payload``
  preamble  struct ``<4sHIQ``: magic ``KVSO``, format version, header length, xxh3_64(header)
  header    msgpack map: codec, dtype, shape, fingerprint, key, token count, partial flag,
            payload length, xxh3_64(payload)
  payload   the codec's bytes

A reader verifies everything (magic, version, both checksums, lengths, and that key, fingerprint
and shape are the ones it asked for) before the payload reaches a decoder. Memory tiers skip this
byte form: they hold the tensor and an :class:`ObjectMeta`, and an object gets its checksum when
it leaves process memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import msgpack
import xxhash

from kvstore.errors import CorruptObjectError, MismatchedObjectError

if TYPE_CHECKING:
    import torch

# Encoding and decoding tensors (codecs, dtypes) need torch; the daemon only moves verified
# bytes, so those imports happen inside the functions that use them.

MAGIC = b"KVSO"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<4sHIQ")
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What a chunk object says about itself."""

    key: bytes
    fingerprint: bytes
    shape: tuple[int, ...]
    dtype: str
    num_tokens: int
    partial: bool
    codec: str = "raw"


def encode_object(meta: ObjectMeta, kv: torch.Tensor, codec: str | None = None) -> list[bytes | memoryview]:
    """Serialise a chunk; returns parts (header, payload) so writers can avoid one big copy."""
    from kvstore.codecs import get_codec

    codec_name = codec or meta.codec
    return pack_object(meta, get_codec(codec_name).for_model(meta.fingerprint).encode(kv), codec_name)


def pack_object(meta: ObjectMeta, payload: bytes | bytearray | memoryview, codec_name: str) -> list[bytes | memoryview]:
    """Header + payload parts for an already-encoded payload (no copy of the payload)."""
    view = memoryview(payload).cast("B")
    header = msgpack.packb({
        "codec": codec_name, "dtype": meta.dtype, "shape": list(meta.shape), "fp": meta.fingerprint,
        "key": meta.key, "ntok": meta.num_tokens, "partial": meta.partial, "plen": view.nbytes,
        "psum": xxhash.xxh3_64_intdigest(view),
    }, use_bin_type=True)
    pre = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), xxhash.xxh3_64_intdigest(header))
    return [pre + header, view]


def join_parts(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed, header-verified object header; the payload is not checked yet."""

    meta: ObjectMeta
    payload_offset: int
    payload_len: int
    payload_sum: int


def parse_header(buf: bytes | bytearray | memoryview, total_len: int) -> Header:
    """Verify preamble and header checksum from the first bytes of an object of ``total_len``.

    Raises CorruptObjectError; ``NeedMore(n)`` if ``buf`` is shorter than the header."""
    view = memoryview(buf).cast("B")
    if view.nbytes < _PREAMBLE.size:
        if total_len < _PREAMBLE.size:
            raise CorruptObjectError(f"object truncated: {total_len} bytes, preamble needs {_PREAMBLE.size}")
        raise NeedMore(_PREAMBLE.size)
    magic, version, hlen, hsum = _PREAMBLE.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptObjectError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptObjectError(f"unsupported object format version {version} (this build reads {FORMAT_VERSION})")
    end = _PREAMBLE.size + hlen
    if hlen > MAX_HEADER_BYTES or end > total_len:
        raise CorruptObjectError(f"header length {hlen} exceeds the object ({total_len} bytes)")
    if view.nbytes < end:
        raise NeedMore(end)
    hbytes = view[_PREAMBLE.size:end]
    if xxhash.xxh3_64_intdigest(hbytes) != hsum:
        raise CorruptObjectError("header checksum mismatch")
    try:
        h = msgpack.unpackb(hbytes, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise CorruptObjectError(f"malformed object header: {exc}") from exc
    meta, plen, psum = _header_fields(h)
    if total_len - end != plen:
        raise CorruptObjectError(f"payload is {total_len - end} bytes, header says {plen} (torn write?)")
    return Header(meta, end, plen, psum)


_MAX_DIMS = 8
_MAX_DIM = 1 << 40


def _header_fields(h: Any) -> tuple[ObjectMeta, int, int]:
    """The header's fields, each of the type and range encode writes: a header is checksummed,
    not signed, so anyone can send one, and a value of another type must be a clear error, not
    an exception from deep inside (``bytes(2**63)``) or an allocation it sizes (``[0] * 10**9``)."""
    if not isinstance(h, dict):
        raise CorruptObjectError("malformed object header: not a map")

    def field(name: str, kind: type | tuple[type, ...], ok: Callable[[Any], bool] = lambda v: True) -> Any:
        if name not in h:
            raise CorruptObjectError(f"malformed object header: no {name!r}")
        value = h[name]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int or not ok(value):
            raise CorruptObjectError(f"malformed object header: bad {name!r}")
        return value

    shape = field("shape", (list, tuple), lambda v: len(v) <= _MAX_DIMS and all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in v))
    meta = ObjectMeta(key=field("key", bytes, lambda v: 0 < len(v) <= 64),
                      fingerprint=field("fp", bytes, lambda v: len(v) <= 64), shape=tuple(shape),
                      dtype=field("dtype", str, lambda v: len(v) <= 32), num_tokens=field("ntok", int, lambda v: v >= 0),
                      partial=field("partial", bool), codec=field("codec", str, lambda v: len(v) <= 32))
    return meta, field("plen", int, lambda v: v >= 0), field("psum", int, lambda v: 0 <= v < 1 << 64)


class NeedMore(Exception):
    """parse_header needs the first ``args[0]`` bytes of the object."""


def read_meta(blob: bytes | bytearray | memoryview) -> tuple[ObjectMeta, memoryview]:
    """Parse and verify an object; returns its meta and a zero-copy view of the payload."""
    view = memoryview(blob).cast("B")
    try:
        header = parse_header(view, view.nbytes)
    except NeedMore as exc:  # cannot happen with the whole object in hand
        raise CorruptObjectError(f"object truncated at {exc.args[0]} bytes") from None
    payload = view[header.payload_offset:]
    if xxhash.xxh3_64_intdigest(payload) != header.payload_sum:
        raise CorruptObjectError("payload checksum mismatch")
    return header.meta, payload


ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1}
"""Bytes per element of each dtype name objects record (kvstore.spec.DTYPES), without torch."""


def tensor_nbytes(meta: ObjectMeta) -> int | None:
    """Bytes of the tensor an object describes (its raw payload), without torch; None for a dtype
    name this module does not know."""
    if meta.dtype not in ITEM_BYTES:
        return None
    nbytes = ITEM_BYTES[meta.dtype]
    for dim in meta.shape:
        nbytes *= dim
    return nbytes


def recode(blob: bytes | bytearray | memoryview, codec_name: str) -> list[bytes | memoryview]:
    """The same verified object in byte codec ``codec_name`` (raw <-> lz4), without torch: how the
    daemon applies a tier's lossless codec to objects it never decodes. An object in a codec that
    is not a byte codec (lossy ones: their bytes are not the tensor's) is returned as it came."""
    from kvstore.codecs import CodecError, get_codec, is_bytewise

    meta, payload = read_meta(blob)
    nbytes = tensor_nbytes(meta)
    if meta.codec == codec_name or not is_bytewise(meta.codec) or nbytes is None:
        return [blob]
    src, dst = get_codec(meta.codec), get_codec(codec_name)
    try:
        raw = src.decode_bytes(payload, nbytes)
    except CodecError as exc:
        raise CorruptObjectError(f"codec {meta.codec!r} failed: {exc}") from exc
    return pack_object(meta, dst.encode_bytes(memoryview(raw)), codec_name)


def check_meta(meta: ObjectMeta, expect: ObjectMeta) -> None:
    """A well-formed object for another chunk or model is as wrong as a corrupt one."""
    for name in ("key", "fingerprint", "shape", "dtype", "num_tokens"):
        got, want = getattr(meta, name), getattr(expect, name)
        if got != want:
            got_s, want_s = (v.hex() if isinstance(v, (bytes, bytearray)) else repr(v) for v in (got, want))
            raise MismatchedObjectError(f"object {name} {got_s} does not match the requested {want_s}")


def decode_object(blob: bytes | bytearray | memoryview, expect: ObjectMeta) -> torch.Tensor:
    """Verify ``blob`` is exactly the object ``expect`` describes and decode its tensor."""
    meta, payload = read_meta(blob)
    check_meta(meta, expect)
    return decode_payload(meta, payload)


def decode_payload(meta: ObjectMeta, payload: bytes | memoryview) -> torch.Tensor:
    """The tensor of a payload already verified against ``meta``; a codec failure is corruption."""
    from kvstore.codecs import CodecError, get_codec
    from kvstore.spec import dtype_from_name

    dtype = dtype_from_name(meta.dtype)
    try:
        kv = get_codec(meta.codec).decode(payload, meta.shape, dtype)
    except CodecError as exc:
        raise CorruptObjectError(f"codec {meta.codec!r} failed: {exc}") from exc
    # A codec's word is not enough: a tensor of another shape would be broadcast into the
    # engine's buffer (one layer copied into all of them) instead of failing.
    if tuple(kv.shape) != tuple(meta.shape) or kv.dtype != dtype:
        raise CorruptObjectError(f"codec {meta.codec!r} decoded {tuple(kv.shape)} {kv.dtype}; the header says "
                                 f"{tuple(meta.shape)} {dtype}")
    return kv


def meta_for(key: bytes, fingerprint: bytes, kv: torch.Tensor, partial: bool, codec: str = "raw") -> ObjectMeta:
    from kvstore.spec import dtype_name

    return ObjectMeta(key=key, fingerprint=fingerprint, shape=tuple(kv.shape), dtype=dtype_name(kv.dtype),
                      num_tokens=int(kv.shape[2]), partial=partial, codec=codec)
