"""kvstore as SGLang's HiCache L3 against SGLang's own file backend (HiCacheFile), same pages,
same calls, one run.

Pages are Llama-3-8B-shaped HiCache pages: 2 x 32 layers x 64 tokens x 8 KV heads x 128 x bf16
= 8 MiB each. Each round starts every backend on an empty directory, backs the pages up into each
(random order, `os.sync()` between, so no backend's write-back lands on another's timing), then
reads them back through the tensor-per-page calls: once cold (each local backend's files dropped
from the page cache first; the daemon keeps its copy in memory, so n/a), then warm passes
interleaved in a fresh random order each.
Ratios are paired within a round against HiCacheFile and reported as the median with a 90%
bootstrap interval. Every read is checked bit-exact outside the timed region. A last table shows
what each local backend hands back after one byte of a stored page flips, and to an engine whose
host pool has another layout.

Runs in the venv scripts/test_sglang.sh builds:

    .venv-sglang/bin/python bench/sglang_storage.py [--pages 32] [--rounds 5] [--reads 3] [--no-daemon]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import median, ratio_interval, start_daemon, table
from kvstore.connectors.sglang import KVStoreHiCacheStorage
from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig

LAYERS, PAGE, HEADS, DIM = 32, 64, 8, 128
GIB = 2**30
BATCH = 8  # pages per storage call, as SGLang batches its backups and prefetches


def storage_config(extra: dict) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False,
                                model_name="bench/llama-3-8b-shaped", extra_config=extra)


def make_backends(root: str, daemon_url: str | None) -> dict[str, object]:
    backends: dict[str, object] = {
        "SGLang HiCacheFile": HiCacheFile(storage_config({}), file_path=os.path.join(root, DIRS["SGLang HiCacheFile"])),
        "kvstore disk": KVStoreHiCacheStorage(storage_config({"kvstore_config": {"tiers": {"disk": {
            "path": os.path.join(root, DIRS["kvstore disk"]), "capacity": "8GiB"}}}})),
    }
    if daemon_url:
        backends["kvstore daemon"] = KVStoreHiCacheStorage(storage_config({"kvstore_config": {"tiers": {
            "remote": {"url": daemon_url, "timeout_s": 60}}}}))
    return backends


LOCAL = ["SGLang HiCacheFile", "kvstore disk"]
DIRS = {"SGLang HiCacheFile": "file", "kvstore disk": "kvstore"}


def evict_page_cache(root: str) -> None:
    """Drop a backend's files from the page cache (clean pages: the round already synced), so the
    next read comes from the device: all clean pages when we may (root), else its files' pages."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return
    except OSError:
        pass
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def put_all(backend: object, keys: list[str], pages: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(keys), BATCH):
        assert backend.batch_set(keys[i:i + BATCH], pages[i:i + BATCH])
    if isinstance(backend, KVStoreHiCacheStorage):
        backend.pages.flush()
    return time.perf_counter() - t0


def get_all(backend: object, keys: list[str], outs: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(keys), BATCH):
        got = backend.batch_get(keys[i:i + BATCH], outs[i:i + BATCH])
        assert all(g is not None for g in got)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reads", type=int, default=3, help="read passes per round")
    ap.add_argument("--no-daemon", action="store_true", help="leave out kvstore with a `kvstore serve` tier")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    pages = [torch.randn(2 * LAYERS * PAGE * HEADS * DIM, generator=g).to(torch.bfloat16) for _ in range(args.pages)]
    keys = [f"{i:064x}" for i in range(args.pages)]
    nbytes = sum(p.numel() * p.element_size() for p in pages)
    print(f"{args.pages} pages of {pages[0].numel() * 2 / 2**20:.0f} MiB ({nbytes / GIB:.2f} GiB), "
          f"{args.rounds} rounds x {args.reads} reads, batches of {BATCH}")
    put_s: dict[str, list[float]] = {}
    get_s: dict[str, list[list[float]]] = {}
    exists_s: dict[str, list[float]] = {}
    cold_s: dict[str, list[float]] = {}
    rng = random.Random(1)
    for rnd in range(args.rounds):
        root = tempfile.mkdtemp(prefix="kvstore-sgl-bench-")
        daemon = None
        try:
            url = None
            if not args.no_daemon:
                daemon, url = start_daemon(root)
            backends = make_backends(root, url)
            names = list(backends)
            for name in rng.sample(names, len(names)):
                put_s.setdefault(name, []).append(put_all(backends[name], keys, pages))
                os.sync()
            outs = {name: [torch.empty_like(p) for p in pages] for name in names}
            for name in rng.sample(LOCAL, len(LOCAL)):  # cold: the pages leave the page cache first
                evict_page_cache(os.path.join(root, DIRS[name]))
                cold_s.setdefault(name, []).append(get_all(backends[name], keys, outs[name]))
            reads: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(args.reads):
                for name in rng.sample(names, len(names)):
                    reads[name].append(get_all(backends[name], keys, outs[name]))
            for name in names:
                assert all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                           for a, b in zip(pages, outs[name])), name
                get_s.setdefault(name, []).append(reads[name])
                t0 = time.perf_counter()
                for _ in range(20):
                    assert backends[name].batch_exists(keys) == len(keys)
                exists_s.setdefault(name, []).append((time.perf_counter() - t0) / 20)
            for backend in backends.values():
                if isinstance(backend, KVStoreHiCacheStorage):
                    backend.close()
        finally:
            if daemon is not None:
                daemon.terminate()
                daemon.wait(30)
            shutil.rmtree(root, ignore_errors=True)
        print(f"round {rnd + 1}/{args.rounds} done")

    base = "SGLang HiCacheFile"
    rows = [["backend", "backup GiB/s", "prefetch warm", "prefetch cold", f"exists ({args.pages} keys)",
             "backup vs file", "warm vs file", "cold vs file"]]
    for name, puts in put_s.items():
        gets = [median(r) for r in get_s[name]]
        cold = cold_s.get(name)
        row = [name, f"{nbytes / GIB / median(puts):.2f}", f"{nbytes / GIB / median(gets):.2f}",
               f"{nbytes / GIB / median(cold):.2f}" if cold else "n/a", f"{median(exists_s[name]) * 1e3:.2f} ms"]
        for mine, theirs in ((puts, put_s[base]), (gets, [median(r) for r in get_s[base]]),
                             (cold, cold_s[base])):
            if not mine:
                row.append("n/a")
                continue
            ratios = [t / m for m, t in zip(mine, theirs)]
            lo, hi = ratio_interval(ratios)
            row.append(f"{median(ratios):.2f}x [{lo:.2f}-{hi:.2f}]")
        rows.append(row)
    print(table(rows))
    print("ratios: paired per round against HiCacheFile, median and 90% bootstrap interval (>1 = faster)")
    print()
    print(safety(pages[:2], keys[:2]))


def safety(pages: list[torch.Tensor], keys: list[str]) -> str:
    """What each local backend hands back (a) after one byte of a stored page flips on disk and
    (b) to an engine whose host pool uses another layout (same model, same rank)."""
    rows = [["backend", "after a flipped byte", "to a page_first pool"]]
    for name in ("SGLang HiCacheFile", "kvstore disk"):
        root = tempfile.mkdtemp(prefix="kvstore-sgl-safety-")
        try:
            backend = make_backends(root, None)[name]
            assert backend.batch_set(keys, pages)
            if isinstance(backend, KVStoreHiCacheStorage):
                backend.pages.flush()
            other_cfg = storage_config({} if name.startswith("SGLang") else backend.storage_config.extra_config)
            other_cfg.is_page_first_layout = True
            other = (HiCacheFile(other_cfg, file_path=os.path.join(root, "file")) if name.startswith("SGLang")
                     else KVStoreHiCacheStorage(other_cfg))
            wrong = other.batch_get(keys, [torch.empty_like(p) for p in pages])[0] is not None
            victim = max((os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs), key=os.path.getsize)
            with open(victim, "r+b") as f:
                f.seek(os.path.getsize(victim) - 1000)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0x55]))
            outs = [torch.empty_like(p) for p in pages]
            got = backend.batch_get(keys, outs)
            served = [g is not None and not torch.equal(g.view(torch.int16), p.view(torch.int16))
                      for g, p in zip(got, pages)]
            rows.append([name, "served corrupt KV" if any(served) else "miss (counted)",
                         "served in the wrong layout" if wrong else "miss"])
            for b in (backend, other):
                if isinstance(b, KVStoreHiCacheStorage):
                    b.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return table(rows)


if __name__ == "__main__":
    main()
