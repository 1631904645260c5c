"""The identity codec: the tensor's bytes. Fastest, and the baseline every codec is measured against."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore.codecs.base import Codec, CodecError, register_codec, tensor_bytes, tensor_from_bytes

if TYPE_CHECKING:
    import torch


class RawCodec(Codec):
    name = "raw"
    bytewise = True

    def encode(self, kv: torch.Tensor) -> memoryview:
        return tensor_bytes(kv)

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return tensor_from_bytes(payload, shape, dtype)

    def encode_bytes(self, raw: memoryview) -> memoryview:
        return raw

    def decode_bytes(self, payload: memoryview, nbytes: int) -> memoryview:
        if len(payload) != nbytes:
            raise CodecError(f"raw payload is {len(payload)} bytes, the header needs {nbytes}")
        return payload


register_codec(RawCodec())
