"""LMCache 0.5.x legacy remote-server protocol (``remote_url: lm://host:port``), as read from
``lmcache/v1/protocol.py`` and ``lmcache/v1/server/__main__.py`` in the lmcache 0.5.6 wheel.

Request: 186-byte header ``iiiiiiiii150s`` in native order (little-endian on x86-64): command,
payload length, memory format, dtype code, location, four shape dims (zero padded), then the key
``model@world_size@worker_id@chunk_hash@dtype[@tag%value...]`` right-padded with spaces to 150
bytes. PUT is followed by ``length`` payload bytes and gets no reply. Reply: 36-byte header
``iiiiiiiii``: code (200/400), length, format, dtype, four shape dims, location (last here), then
``length`` bytes for a GET hit. LIST is not implemented by LMCache's server either.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

REQUEST = struct.Struct("<iiiiiiiii150s")
REPLY = struct.Struct("<iiiiiiiii")
KEY_LENGTH = 150


class Command(IntEnum):
    PUT = 1
    GET = 2
    EXIST = 3
    LIST = 4
    HEALTH = 5


SUCCESS = 200
FAIL = 400


class ProtocolError(ValueError):
    """A request this listener will not serve; the connection is closed."""


@dataclass(frozen=True)
class Request:
    command: Command
    length: int
    fmt: int
    dtype: int
    location: int
    shape: tuple[int, int, int, int]
    key: str


@dataclass(frozen=True)
class ObjectInfo:
    """What LMCache sent with a PUT and expects back on GET."""

    fmt: int
    dtype: int
    shape: tuple[int, int, int, int]

    _PACK = struct.Struct("<iiiiii")

    def pack(self) -> bytes:
        return self._PACK.pack(self.fmt, self.dtype, *self.shape)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> "ObjectInfo":
        fmt, dtype, *shape = cls._PACK.unpack_from(buf, 0)
        return cls(fmt, dtype, tuple(shape))  # type: ignore[arg-type]

    @classmethod
    def size(cls) -> int:
        return cls._PACK.size


def parse_request(header: bytes, max_length: int) -> Request:
    if len(header) != REQUEST.size:
        raise ProtocolError(f"header is {len(header)} bytes, expected {REQUEST.size}")
    command, length, fmt, dtype, location, s0, s1, s2, s3, raw_key = REQUEST.unpack(header)
    try:
        cmd = Command(command)
    except ValueError:
        raise ProtocolError(f"unknown command {command}") from None
    if not 0 <= length <= max_length:
        raise ProtocolError(f"payload length {length} outside [0, {max_length}]")
    try:
        key = raw_key.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ProtocolError("key is not ASCII") from None
    if cmd in (Command.PUT, Command.GET, Command.EXIST):
        fields = key.split("@")
        if len(fields) < 5 or not all(fields[:5]) or not key.isprintable():
            raise ProtocolError(f"unparsable key {key[:60]!r} (want model@world_size@worker_id@hash@dtype)")
    return Request(cmd, length, fmt, dtype, location, (s0, s1, s2, s3), key)


def reply(code: int, length: int = 0, info: ObjectInfo | None = None) -> bytes:
    info = info or ObjectInfo(1, 2, (0, 0, 0, 0))
    return REPLY.pack(code, length, info.fmt, info.dtype, *info.shape, 0)
