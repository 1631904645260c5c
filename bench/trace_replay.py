"""Replay Mooncake request traces through a KVStore and report the prefix-hit token ratio.

Each trace line has 512-token block hash ids; equal ids at the same position are a reusable
prefix. Every id becomes 512 deterministic token ids, the last block is cut to the input length.
Per request: ``lookup`` (the hit), then ``put`` of the whole input (what an engine does after
prefill). Capacities are given in tokens; the KV shape is tiny so a trace replays in about a
minute. The upper bound is the same replay with room for every token of the trace.

    python bench/trace_replay.py [--trace conversation] [--cpu-tokens 2M,8M,...] [--disk-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kvstore import KVSpec, KVStore

BLOCK = 512
SPEC = KVSpec(model_id="bench/trace", num_layers=1, num_kv_heads=1, head_size=4, dtype=torch.float16)
TRACES = Path(__file__).resolve().parent.parent.parent / "shared" / "traces"
LLAMA3_8B_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2


def load_trace(name: str, limit: int | None) -> list[dict]:
    path = Path(name)
    if not path.exists():
        path = TRACES / f"{name}_trace.jsonl"
    if not path.exists():
        sys.exit(f"trace not found: {name} (looked for {path}); see ../shared/traces/README.md")
    with open(path) as f:
        reqs = [json.loads(line) for line in f if line.strip()]
    return reqs[:limit] if limit else reqs


def request_tokens(req: dict) -> np.ndarray:
    ids = np.asarray(req["hash_ids"], dtype=np.uint64)
    pos = np.arange(BLOCK, dtype=np.uint64)
    toks = ((ids[:, None] * np.uint64(BLOCK) + pos[None, :]) * np.uint64(2654435761)) % np.uint64(2**31 - 1)
    return toks.reshape(-1)[:int(req["input_length"])].astype(np.int64)


def replay(reqs: list[dict], cpu_tokens: int, disk_tokens: int, chunk: int, workdir: str,
           desc: str) -> tuple[float, float]:
    bpt = SPEC.bytes_per_token
    tiers: dict = {"cpu": {"capacity": max(cpu_tokens, chunk) * bpt}}
    if disk_tokens:
        # Disk objects carry a ~200-byte header on top of the KV.
        tiers["disk"] = {"path": os.path.join(workdir, desc), "capacity": disk_tokens * (bpt + 200 / chunk)}
    hit = total = 0
    t0 = time.perf_counter()
    kv_buf = torch.zeros(SPEC.chunk_shape(max(int(r["input_length"]) for r in reqs)), dtype=SPEC.dtype)
    with KVStore(SPEC, {"chunk_size": chunk, "tiers": tiers, "promote": True}) as store:
        for req in tqdm(reqs, desc=desc, unit="req", leave=False, mininterval=0.5):
            toks = request_tokens(req)
            # What an engine does: ask, load the hit, prefill the rest, store the prompt.
            n = store.lookup(toks)
            got, _ = store.get(toks, out=kv_buf)
            assert got == n, (got, n)
            hit += got
            total += len(toks)
            store.put(toks, kv_buf[:, :, :len(toks)])
    return hit / max(total, 1), time.perf_counter() - t0


def unique_tokens(reqs: list[dict]) -> int:
    seen: set[tuple[int, int]] = set()
    n = 0
    for req in reqs:
        ids = req["hash_ids"]
        for i, h in enumerate(ids):
            if (i, h) not in seen:
                seen.add((i, h))
                n += BLOCK if i < len(ids) - 1 else int(req["input_length"]) - BLOCK * (len(ids) - 1)
    return n


def parse_tokens(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="conversation", help="conversation, synthetic or a path (default conversation)")
    ap.add_argument("--limit", type=int, help="replay only the first N requests")
    ap.add_argument("--cpu-tokens", default="0.5M,1M,2M,4M,8M,16M,32M", help="comma-separated CPU capacities in tokens")
    ap.add_argument("--disk-tokens", default="0", help="disk tier capacity in tokens (0: no disk tier)")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--png", default=None, help="where to write the plot (default bench/out/trace_<name>.png)")
    args = ap.parse_args()

    reqs = load_trace(args.trace, args.limit)
    total = sum(int(r["input_length"]) for r in reqs)
    uniq = unique_tokens(reqs)
    caps = [parse_tokens(c) for c in args.cpu_tokens.split(",") if c.strip()]
    disk = parse_tokens(args.disk_tokens)
    print(f"trace {args.trace}: {len(reqs)} requests, {total / 1e6:.1f}M input tokens, {uniq / 1e6:.2f}M unique "
          f"block tokens; chunk {args.chunk_size}")
    workdir = tempfile.mkdtemp(prefix="kvstore-trace-")
    try:
        bound, secs = replay(reqs, uniq + len(reqs) * args.chunk_size, 0, args.chunk_size, workdir, "upper bound")
        print(f"infinite capacity (upper bound): hit ratio {bound:.4f}  ({secs:.1f} s, {len(reqs) / secs:.0f} req/s)")
        rows = []
        for cap in caps:
            ratio, secs = replay(reqs, cap, disk, args.chunk_size, workdir, f"cpu {cap / 1e6:g}M tokens")
            rows.append((cap, ratio))
            extra = f" + disk {disk / 1e6:g}M" if disk else ""
            print(f"cpu {cap / 1e6:>7g}M tokens{extra} (= {cap * LLAMA3_8B_BYTES_PER_TOKEN / 2**30:7.1f} GiB of "
                  f"Llama-3-8B KV): hit ratio {ratio:.4f} = {ratio / bound if bound else 0:.3f} of the bound "
                  f"({secs:.1f} s)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    png = Path(args.png) if args.png else Path(__file__).resolve().parent / "out" / f"trace_{Path(args.trace).stem}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[dev]'): no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([c / 1e6 for c, _ in rows], [r for _, r in rows], "o-", label="kvstore (LRU cpu tier)")
    ax.axhline(bound, color="gray", linestyle="--", label=f"infinite capacity ({bound:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("CPU tier capacity (million tokens)")
    ax.set_ylabel("prefix-hit token ratio")
    ax.set_title(f"Mooncake {Path(args.trace).stem} trace, {len(reqs)} requests")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
