"""LZ4 block compression of the raw bytes.

fp16 KV is mostly mantissa noise, so expect a small gain; it is here as the cheap general-purpose
option and as a baseline for the KV-aware codecs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import lz4.block

from kvstore.codecs.base import Codec, CodecError, register_codec, tensor_bytes, tensor_from_bytes

if TYPE_CHECKING:
    import torch


class LZ4Codec(Codec):
    name = "lz4"
    bytewise = True

    def encode(self, kv: torch.Tensor) -> bytes:
        return self.encode_bytes(tensor_bytes(kv))

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        import torch

        return tensor_from_bytes(self.decode_bytes(payload, math.prod(shape) * torch.empty((), dtype=dtype).element_size()),
                                 shape, dtype)

    def encode_bytes(self, raw: memoryview) -> bytes:
        return lz4.block.compress(raw, store_size=False)

    def decode_bytes(self, payload: memoryview, nbytes: int) -> bytes:
        try:
            # The size comes from the verified header, never from the payload: corrupt bytes
            # cannot make us allocate more than the chunk needs.
            raw = lz4.block.decompress(payload, uncompressed_size=nbytes)
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"lz4 payload is corrupt: {exc}") from exc
        if len(raw) != nbytes:
            raise CodecError(f"lz4 payload decodes to {len(raw)} bytes, the header needs {nbytes}")
        return raw


register_codec(LZ4Codec())
