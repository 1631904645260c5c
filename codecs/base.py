"""The codec interface and its registry.

torch is imported only where a tensor is made or read: the daemon applies byte codecs (raw, lz4)
to objects it never decodes, and must not pay for torch (RSS 53 -> 239 MiB) to do so.
"""

from __future__ import annotations

import importlib
import math
import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
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
    # A lossless transform of the tensor's bytes (raw, lz4): it implements encode_bytes and
    # decode_bytes, and a store of opaque objects (the daemon) can apply it without torch.
    bytewise: ClassVar[bool] = False

    def encode_bytes(self, raw: memoryview) -> bytes | memoryview:
        raise CodecError(f"codec {self.name!r} does not work on bytes")

    def decode_bytes(self, payload: memoryview, nbytes: int) -> bytes | memoryview:
        """The tensor's ``nbytes`` bytes back (``nbytes`` from the verified header, never the payload)."""
        raise CodecError(f"codec {self.name!r} does not work on bytes")

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> bytes | memoryview: ...

    def configured(self, option: str) -> "Codec":
        """A variant selected by ``name:option``; codecs without options reject any."""
        raise CodecError(f"codec {self.name!r} takes no options (got {option!r})")

    def for_model(self, fingerprint: bytes) -> "Codec":
        """The variant to encode this model's KV with (a lossy codec may tune itself to a
        calibrated profile, kvstore.codecs.profiles); the payload must decode the same with
        any variant. Default: this codec."""
        return self

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


_BUILTIN = {"cachegen": "kvstore.codecs.cachegen", "fp8": "kvstore.codecs.fp8", "int8": "kvstore.codecs.int8",
            "lz4": "kvstore.codecs.lz4", "raw": "kvstore.codecs.raw"}
"""Built-in codecs, imported (and so registered) when first asked for: the lossy ones need torch."""


PRESETS = {"lossless": "lz4", "balanced": "cachegen:balanced", "compact": "cachegen:compact",
           "aggressive": "cachegen:aggressive"}
"""Names by what users choose, for the codec that gives it (what each costs: the README)."""


def get_codec(name: str) -> Codec:
    """A codec by name; ``base:option`` (e.g. ``cachegen:low``) selects a configured variant,
    and a preset (``compact``...) the codec it stands for."""
    name = PRESETS.get(name, name)
    codec = _REGISTRY.get(name) or _CONFIGURED.get(name)
    if codec is not None:
        return codec
    base, sep, option = name.partition(":")
    if base not in _REGISTRY and base in _BUILTIN:
        importlib.import_module(_BUILTIN[base])
        if name in _REGISTRY:
            return _REGISTRY[name]
    if base not in _REGISTRY:
        raise CodecError(f"unknown codec {name!r}; available: {', '.join(available_codecs())}")
    if not sep or not option:
        raise CodecError(f"malformed codec name {name!r}")
    codec = _REGISTRY[base].configured(option)
    _CONFIGURED[name] = codec
    return codec


_BYTEWISE_BUILTINS = frozenset({"raw", "lz4"})


def is_bytewise(name: str) -> bool:
    """Whether codec ``name`` is a byte codec, answered without importing one that is not (a lossy
    codec's module needs torch, which the daemon must not load for an object that merely names it)."""
    name = PRESETS.get(name, name)
    codec = _REGISTRY.get(name) or _CONFIGURED.get(name)
    if codec is not None:
        return codec.bytewise
    return name in _BYTEWISE_BUILTINS


def available_codecs() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN) | set(PRESETS))


def tensor_bytes(kv: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (copies only when it is on a device or strided).

    Goes through uint8 so dtypes numpy lacks (bfloat16, float8) work too.
    """
    import torch

    flat = kv.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def tensor_from_bytes(buf: bytes | bytearray | memoryview, shape: tuple[int, ...],
                      dtype: torch.dtype) -> torch.Tensor:
    """A tensor viewing ``buf`` after checking its size matches ``shape`` and ``dtype``."""
    import torch

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
