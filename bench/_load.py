"""The daemon under load (``bench/service.py --load``): many concurrent clients doing a mix of
get, put and lookup over a working set twice the memory budget.

Reports throughput and p50/p99 per operation, errors (must be 0), wrong bytes (must be 0: every
GET is compared with the object that key always carries) and the daemon's peak RSS against its
memory budget plus its own size at start (goal: within 10%). Clients are processes (the GIL would
make threads measure the client): ``procs`` x ``tasks`` concurrent connections.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
import time

import numpy as np
import torch

from kvstore import KVSpec
from kvstore.client import DaemonClient
from kvstore.objects import encode_object, join_parts, meta_for

SPEC = KVSpec(model_id="bench/load", num_layers=32, num_kv_heads=8, head_size=128)
MIX = (("get", 0.6), ("put", 0.25), ("lookup", 0.15))


def make_object(i: int, tokens: int) -> tuple[bytes, bytes]:
    """Object ``i``: always the same bytes, so any reader can check what it got."""
    key = b"load" + i.to_bytes(12, "little")
    rng = np.random.default_rng(i)
    kv = torch.from_numpy(rng.standard_normal(SPEC.chunk_shape(tokens), dtype=np.float32)).half()
    return key, join_parts(encode_object(meta_for(key, SPEC.fingerprint, kv, tokens < 256), kv))


def _client(url: str, count: int, tokens: int, tasks: int, seconds: float, seed: int, out: mp.Queue) -> None:
    objects = dict(make_object(i, tokens) for i in range(count))
    keys = list(objects)
    lat: dict[str, list[float]] = {op: [] for op, _ in MIX}
    stats = {"errors": 0, "wrong": 0, "misses": 0, "error_text": ""}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        client = DaemonClient(url, retries=0, timeout_s=60)
        ops, weights = zip(*MIX)
        while time.monotonic() < deadline:
            op = rng.choices(ops, weights)[0]
            key = rng.choice(keys)
            t0 = time.perf_counter()
            try:
                if op == "put":
                    client.put([(key, objects[key])])
                elif op == "get":
                    got = client.get([key])[0]
                    with lock:
                        if got is None:
                            stats["misses"] += 1
                        elif bytes(got) != objects[key]:
                            stats["wrong"] += 1
                else:
                    start = rng.randrange(len(keys))
                    client.lookup(keys[start:start + 16])
            except Exception as exc:  # counted: the goal is zero
                with lock:
                    stats["errors"] += 1
                    stats["error_text"] = repr(exc)[:200]
                continue
            with lock:
                lat[op].append(time.perf_counter() - t0)
        client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(tasks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((lat, stats))


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_load(url: str, pid: int, budget: int, *, clients: int = 64, procs: int = 4, seconds: float = 120.0,
             tokens: int = 16) -> dict:
    """Drive the daemon at ``url`` (process ``pid``, memory budget ``budget`` bytes)."""
    size = len(make_object(0, tokens)[1])
    count = max(8, 2 * budget // size)  # a working set twice the memory budget
    base = rss_of(pid)  # the process before it holds any object
    seed = DaemonClient(url)
    for i in range(0, count, 16):  # start full: every key was put once
        seed.put([make_object(j, tokens) for j in range(i, min(count, i + 16))])
    seed.close()
    peak = [rss_of(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], rss_of(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out: mp.Queue = mp.get_context("spawn").Queue()
    ctx = mp.get_context("spawn")
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    workers = [ctx.Process(target=_client, args=(url, count, tokens, n, seconds, i, out)) for i, n in enumerate(per)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    results = [out.get() for _ in workers]
    for w in workers:
        w.join()
    wall = time.monotonic() - t0
    stop.set()
    lat: dict[str, list[float]] = {op: [] for op, _ in MIX}
    totals = {"errors": 0, "wrong": 0, "misses": 0, "error_text": ""}
    for part, stats in results:
        for op, values in part.items():
            lat[op] += values
        for k in ("errors", "wrong", "misses"):
            totals[k] += stats[k]
        totals["error_text"] = totals["error_text"] or stats["error_text"]
    return {"objects": count, "object_bytes": size, "wall_s": wall, "lat": lat, **totals,
            "base_rss": base, "peak_rss": peak[0], "budget": budget, "pid": os.getpid()}
