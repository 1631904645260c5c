"""Shared payload plumbing for the lossy codecs: a small struct header describing the chunk and
helpers to move tensors in and out of byte strings with bounds checks."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
import xxhash

from kvstore.codecs.base import CodecError

_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
_HEAD = struct.Struct("<4sBBHHHHH")  # magic, version, dtype, layers, planes, tokens, heads, head_size


@dataclass(frozen=True)
class ChunkLayout:
    """``[layers, planes, tokens, heads, head_size]``; MLA chunks use heads=1."""

    layers: int
    planes: int
    tokens: int
    heads: int
    head_size: int
    dtype: torch.dtype

    @classmethod
    def of(cls, kv: torch.Tensor) -> "ChunkLayout":
        if kv.dim() == 4:
            layers, planes, tokens, width = kv.shape
            heads, head = 1, width
        elif kv.dim() == 5:
            layers, planes, tokens, heads, head = kv.shape
        else:
            raise CodecError(f"KV must be 4-D or 5-D, got shape {tuple(kv.shape)}")
        if kv.dtype not in _DTYPES:
            raise CodecError(f"lossy codecs take float16/bfloat16/float32 KV, got {kv.dtype}")
        if min(layers, planes, tokens, heads, head) < 1 or max(layers, planes, tokens, heads, head) > 0xFFFF:
            raise CodecError(f"KV shape {tuple(kv.shape)} out of range")
        return cls(layers, planes, tokens, heads, head, kv.dtype)

    @property
    def channels(self) -> int:
        return self.heads * self.head_size

    def pack(self, magic: bytes, version: int) -> bytes:
        return _HEAD.pack(magic, version, _DTYPES.index(self.dtype), self.layers, self.planes, self.tokens,
                          self.heads, self.head_size)

    @classmethod
    def unpack(cls, buf: memoryview, magic: bytes, version: int) -> tuple["ChunkLayout", int]:
        if buf.nbytes < _HEAD.size:
            raise CodecError(f"payload truncated: {buf.nbytes} bytes, header needs {_HEAD.size}")
        got_magic, ver, dt, layers, planes, tokens, heads, head = _HEAD.unpack_from(buf, 0)
        if got_magic != magic:
            raise CodecError(f"bad codec magic {bytes(got_magic)!r}, expected {magic!r}")
        if ver != version:
            raise CodecError(f"unsupported codec payload version {ver}")
        if dt >= len(_DTYPES) or 0 in (layers, planes, tokens, heads, head):
            raise CodecError("corrupt codec header")
        return cls(layers, planes, tokens, heads, head, _DTYPES[dt]), _HEAD.size

    def check(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        mine = ((self.layers, self.planes, self.tokens, self.heads, self.head_size) if len(shape) == 5
                else (self.layers, self.planes, self.tokens, self.head_size))
        if tuple(shape) != mine or dtype != self.dtype:
            raise CodecError(f"payload holds {mine} {self.dtype}, the header asked for {tuple(shape)} {dtype}")


class Reader:
    """Sequential, bounds-checked reads of tensors from a payload."""

    def __init__(self, buf: memoryview, offset: int = 0) -> None:
        self.buf = buf
        self.pos = offset

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.buf.nbytes:
            raise CodecError(f"payload truncated: need {n} bytes at offset {self.pos}, have {self.buf.nbytes - self.pos}")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def tensor(self, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        count = math.prod(shape)
        size = count * torch.empty((), dtype=dtype).element_size()
        raw = self.take(size)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)

    def struct(self, fmt: struct.Struct) -> tuple:
        return fmt.unpack(self.take(fmt.size))

    def done(self) -> None:
        if self.pos != self.buf.nbytes:
            raise CodecError(f"{self.buf.nbytes - self.pos} trailing bytes after the payload")


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


_SEAL = struct.Struct("<Q")


def seal(payload: bytes) -> bytes:
    """Append xxh3_64 so a lossy payload is verifiable on its own (codecs are usable without the
    store's object format, and a bit flip in a scale would otherwise decode to plausible garbage)."""
    return payload + _SEAL.pack(xxhash.xxh3_64_intdigest(payload))


def unseal(payload: memoryview) -> memoryview:
    buf = memoryview(payload).cast("B")
    if buf.nbytes < _SEAL.size:
        raise CodecError(f"payload truncated: {buf.nbytes} bytes")
    body = buf[:-_SEAL.size]
    (want,) = _SEAL.unpack(buf[-_SEAL.size:])
    if xxhash.xxh3_64_intdigest(body) != want:
        raise CodecError("payload checksum mismatch (corrupt or truncated)")
    return body
