"""LMCache 0.5.6's CacheGen serializer, driven from bench/codec_quality.py across a pipe.

Runs in LMCache's own venv (scripts/test_lmcache.sh makes it: lmcache pins packages the main
environment must not get), so the bench cannot import it. Its serializer is used as LMCache
configures it for the model (``CacheGenConfig.from_model_name`` on the model's directory: for
30 layers, keys in 32 bins on layers 0-9 and 16 after, values 32 on layers 0-1 and 16 after;
it has no other setting), on CPU through its numba kernels.

Protocol on stdin/stdout, every message a 4-byte little-endian length and that many bytes:
  request  ``e`` + shape (5 x uint32) + fp16 KV bytes  -> the serialized payload
  request  ``d`` + shape (5 x uint32) + a payload      -> the decoded KV, fp16 bytes
"""

from __future__ import annotations

import struct
import sys
from types import SimpleNamespace

import numpy as np
import torch


def main() -> int:
    model_dir = sys.argv[1]
    from lmcache.storage_backend.serde.cachegen_decoder import CacheGenDeserializer
    from lmcache.storage_backend.serde.cachegen_encoder import CacheGenSerializer

    torch.set_num_threads(1)
    meta = SimpleNamespace(model_name=model_dir)
    config = SimpleNamespace(chunk_size=256)
    ser = CacheGenSerializer(config, meta)
    des = CacheGenDeserializer(config, meta, torch.float16)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return 0
        msg = inp.read(struct.unpack("<I", head)[0])
        op, shape, body = msg[:1], struct.unpack_from("<5I", msg, 1), msg[21:]
        if op == b"e":
            kv = torch.from_numpy(np.frombuffer(body, np.float16).copy()).reshape(shape)
            reply = bytes(ser.to_bytes(kv))
        else:
            reply = des.from_bytes(body).to(torch.float16).contiguous().numpy().tobytes()
        out.write(struct.pack("<I", len(reply)) + reply)
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
