"""LZ4 block compression of the raw bytes.

fp16 KV is mostly mantissa noise, so expect a small gain; it is here as the cheap general-purpose
option and as a baseline for the KV-aware codecs.
"""

from __future__ import annotations

import math

import lz4.block
import torch

from kvstore.codecs.base import Codec, CodecError, register_codec, tensor_bytes, tensor_from_bytes


class LZ4Codec(Codec):
    name = "lz4"

    def encode(self, kv: torch.Tensor) -> bytes:
        return lz4.block.compress(tensor_bytes(kv), store_size=False)

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        try:
            # The size comes from the verified header, never from the payload: corrupt bytes
            # cannot make us allocate more than the chunk needs.
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            raw = lz4.block.decompress(payload, uncompressed_size=size)
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"lz4 payload is corrupt: {exc}") from exc
        return tensor_from_bytes(raw, shape, dtype)


register_codec(LZ4Codec())
