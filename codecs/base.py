"""The codec interface and its registry."""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class CodecError(ValueError):
    """Bytes a codec cannot decode (truncated, corrupt, foreign) or a tensor it cannot encode."""


class Codec(ABC):
    """Encodes one chunk tensor to bytes and back.

    Implementations are stateless: the same instance serves every thread. ``decode`` may return a
    tensor that views ``payload`` (zero-copy); callers copy it into their own buffers.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool] = True

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> bytes | memoryview: ...

    def configured(self, option: str) -> "Codec":
        """A variant selected by ``name:option``; codecs without options reject any."""
        raise CodecError(f"codec {self.name!r} takes no options (got {option!r})")

    @abstractmethod
    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...

    # A codec whose payload splits into independently decodable layer groups ("frames") says so
    # and implements the two methods below: a layer-wise load then hands layer 0 over after the
    # first frame, not after the whole chunk.
    layer_frames: ClassVar[bool] = False

    def frames(self, payload: memoryview) -> tuple[object, list[memoryview]]:
        """``(layout, frames)``: what ``decode_frame`` takes, frames in layer order."""
        raise CodecError(f"codec {self.name!r} has no layer frames")

    def decode_frame(self, layout: object, frame: memoryview) -> tuple[int, torch.Tensor]:
        """``(first layer, kv of the frame's layers)``."""
        raise CodecError(f"codec {self.name!r} has no layer frames")


_REGISTRY: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    if codec.name in _REGISTRY:
        raise ValueError(f"codec {codec.name!r} is already registered")
    _REGISTRY[codec.name] = codec
    return codec


def unregister_codec(name: str) -> None:
    """Forget a codec (and its configured variants); objects written with it become misses."""
    _REGISTRY.pop(name, None)
    for variant in [v for v in _CONFIGURED if v.partition(":")[0] == name]:
        del _CONFIGURED[variant]


_CONFIGURED: dict[str, Codec] = {}


def get_codec(name: str) -> Codec:
    """A codec by name; ``base:option`` (e.g. ``cachegen:low``) selects a configured variant."""
    codec = _REGISTRY.get(name) or _CONFIGURED.get(name)
    if codec is not None:
        return codec
    base, sep, option = name.partition(":")
    if base not in _REGISTRY:
        raise CodecError(f"unknown codec {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    if not sep or not option:
        raise CodecError(f"malformed codec name {name!r}")
    codec = _REGISTRY[base].configured(option)
    _CONFIGURED[name] = codec
    return codec


def available_codecs() -> list[str]:
    return sorted(_REGISTRY)


def tensor_bytes(kv: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (copies only when it is on a device or strided).

    Goes through uint8 so dtypes numpy lacks (bfloat16, float8) work too.
    """
    flat = kv.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def tensor_from_bytes(buf: bytes | bytearray | memoryview, shape: tuple[int, ...],
                      dtype: torch.dtype) -> torch.Tensor:
    """A tensor viewing ``buf`` after checking its size matches ``shape`` and ``dtype``."""
    view = memoryview(buf).cast("B")
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if view.nbytes != expected:
        raise CodecError(f"payload is {view.nbytes} bytes, shape {tuple(shape)} {dtype} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # Read-only buffers (bytes from Redis) are fine: callers copy out, never write in place.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8).view(dtype).reshape(shape)
