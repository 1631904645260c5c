"""Runs a real LMCache 0.5.6 engine on CPU against an lm:// server: ``store`` or ``retrieve``.

Used by test_lmcache_engine.py and bench/lmcache_compat.py in a separate process (LMCache keys
chunks with Python's ``hash`` when vLLM is absent, so both sides run with the same
PYTHONHASHSEED). LMCache's shipped mock connector moves no data; CPUCopyConnector below is the
small CPU copy connector that stands in for its GPU connector.

    python tests/lmcache_engine.py PORT store|retrieve TOKENS [--layers 4 --heads 2 --head-size 64] [--repeat N [--on-stdin]]
Prints one JSON line: {"lookup": n, "retrieved": n, "exact": bool, "seconds": s, "repeats": [s, ...], ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector import GPUConnectorInterface
from lmcache.v1.metadata import LMCacheMetadata


class CPUCopyConnector(GPUConnectorInterface):
    """The engine's KV is one CPU tensor ``[layers, 2, tokens, heads, head_size]``."""

    def __init__(self, kv_shape: tuple[int, ...]) -> None:
        self.kv_shape = kv_shape

    @staticmethod
    def _view(memory_obj, like: torch.Tensor) -> torch.Tensor:
        t = memory_obj.tensor
        if t.shape == like.shape:
            return t
        layers, two, tokens, heads, head = like.shape  # LMCache keeps [2, layers, tokens, heads*head]
        return t.view(two, layers, tokens, heads, head).transpose(0, 1)

    def from_gpu(self, memory_obj, start, end, **kw):
        src = kw["kvcaches"][:, :, start:end]
        self._view(memory_obj, src).copy_(src)

    def to_gpu(self, memory_obj, start, end, **kw):
        dst = kw["kvcaches"][:, :, start:end]
        dst.copy_(self._view(memory_obj, dst))

    def batched_from_gpu(self, memory_objs, starts, ends, **kw):
        for m, s, e in zip(memory_objs, starts, ends):
            self.from_gpu(m, s, e, **kw)

    def batched_to_gpu(self, memory_objs, starts, ends, **kw):
        for m, s, e in zip(memory_objs, starts, ends):
            self.to_gpu(m, s, e, **kw)

    def get_shape(self, num_tokens):
        layers, two, _c, heads, head = self.kv_shape
        return torch.Size([layers, two, num_tokens, heads, head])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("mode", choices=["store", "retrieve"])
    ap.add_argument("tokens", type=int)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="retrieves by this one engine (the first is cold; the rest are a warm engine's)")
    ap.add_argument("--on-stdin", action="store_true",
                    help="wait for a line on stdin before each retrieve and print its result as it ends, so a "
                         "benchmark can interleave engines on different servers retrieve by retrieve")
    args = ap.parse_args()
    chunk = 256
    shape = (args.layers, 2, chunk, args.heads, args.head_size)
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=chunk, local_cpu=False, max_local_cpu_size=2.0,
                                            remote_url=f"lm://127.0.0.1:{args.port}", remote_serde="naive")
    meta = LMCacheMetadata(model_name="kvstore-compat", world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=shape)
    engine = LMCacheEngineBuilder.get_or_create("kvstore-compat", cfg, meta, CPUCopyConnector(shape), None, None)
    engine.post_init()
    n = args.tokens
    tokens = (torch.arange(n) * 7919 + args.seed) % 50000
    kv = torch.randn(args.layers, 2, n, args.heads, args.head_size,
                     generator=torch.Generator().manual_seed(args.seed)).to(torch.bfloat16)
    slots = torch.arange(n)
    result: dict[str, object] = {}
    if args.mode == "store":
        t0 = time.perf_counter()
        engine.store(tokens, kvcaches=kv, slot_mapping=slots)
        # Puts are asynchronous in LMCache: wait until the server has every chunk.
        deadline = time.monotonic() + 120
        while engine.lookup(tokens) < n - n % chunk and time.monotonic() < deadline:
            time.sleep(0.005)  # coarse polling would dominate a sub-second store
        result["seconds"] = time.perf_counter() - t0
        result["lookup"] = engine.lookup(tokens)
    else:
        # The engine's KV cache exists before a request arrives (vLLM allocates it at start):
        # allocating and zeroing it is not part of a retrieve, and would add 512 MiB of page
        # faults of noise to the 0.3 s being measured.
        out = torch.zeros_like(kv)
        times, exact, got = [], True, 0
        if args.on_stdin:
            print(json.dumps({"ready": True}), flush=True)
        for i in range(args.repeat):
            if args.on_stdin and not sys.stdin.readline():
                break
            if i:
                out.zero_()  # each pass must really bring the KV back to be checked
            t0 = time.perf_counter()
            result["lookup"] = engine.lookup(tokens)
            mask = engine.retrieve(tokens, kvcaches=out, slot_mapping=slots)
            times.append(time.perf_counter() - t0)
            got = int(mask.sum())
            exact = exact and bool(torch.equal(out[:, :, :got], kv[:, :, :got]))
            if args.on_stdin:
                print(json.dumps({"seconds": times[-1], "retrieved": got, "exact": exact}), flush=True)
        result["seconds"], result["repeats"] = (times[0] if times else None), times
        lat = []
        for _ in range(20):
            t1 = time.perf_counter()
            engine.lookup(tokens)
            lat.append(time.perf_counter() - t1)
        result["lookup_ms_p50"] = 1e3 * sorted(lat)[len(lat) // 2]
        result["retrieved"] = got
        result["exact"] = exact
    result["bytes"] = kv.numel() * kv.element_size()
    LMCacheEngineBuilder.destroy("kvstore-compat")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
