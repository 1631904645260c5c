"""The identity codec: the tensor's bytes. Fastest, and the baseline every codec is measured against."""

from __future__ import annotations

import torch

from kvstore.codecs.base import Codec, register_codec, tensor_bytes, tensor_from_bytes


class RawCodec(Codec):
    name = "raw"

    def encode(self, kv: torch.Tensor) -> memoryview:
        return tensor_bytes(kv)

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return tensor_from_bytes(payload, shape, dtype)


register_codec(RawCodec())
