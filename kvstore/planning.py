"""Capacity planning: how much memory and disk a workload needs, from its request trace.

Each request does what an engine does: look up its prompt (the prefix hit), load the hit, then
store the prompt. kvstore's own policy is measured by replaying through a real ``KVStore`` with
the tiers asked for (their real eviction, promotion and tail-first puts), at a tiny KV shape so
a trace replays in seconds; capacities are scaled by the model's KV bytes per token. FIFO, LRU
and Belady's offline optimum (MIN, with bypass: an object whose next use is farther than every
cached one's is not kept) are simulated over the same chunk keys with the memory and disk
capacities as one cache, for comparison. The infinite-capacity bound is the hit ratio with room
for everything.

Hit ratios count prompt tokens served by the cache over all prompt tokens ("prefix-hit token
ratio"); prefill saved is those tokens, and TTFT saved is them over a prefill throughput.
"""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from kvstore.traces import Request

POLICIES = ("kvstore", "lru", "fifo", "belady")

Progress = Callable[[Iterable[Request], str], Iterable[Request]]


@dataclass(frozen=True)
class PlanPoint:
    policy: str
    cpu_bytes: int
    disk_bytes: int
    hit_tokens: int
    total_tokens: int

    @property
    def ratio(self) -> float:
        return self.hit_tokens / max(self.total_tokens, 1)


@dataclass
class Plan:
    points: list[PlanPoint]
    bound: float  # the hit ratio with room for everything
    total_tokens: int
    requests: int
    bytes_per_token: int
    unique_bytes: int  # what infinite capacity needs: every chunk once


def chunk_keys(req: Request, chunk: int) -> list[tuple[int, int]]:
    """(key, tokens) of each chunk of a request's prompt, prefix-chained like kvstore's keys:
    a key stands for everything before it too. Python's hash of ints and tuples is not salted,
    so keys are the same in every process."""
    out: list[tuple[int, int]] = []
    key, b = 0, req.block_size
    for start in range(0, req.input_length, chunk):
        end = min(start + chunk, req.input_length)
        key = hash((key, req.blocks[start // b:(end - 1) // b + 1], start % b, end - start))
        out.append((key, end - start))
    return out


def _prefix_hit(chunks: list[tuple[int, int]], held: Callable[[int], bool]) -> int:
    hit = 0
    for key, n in chunks:
        if not held(key):
            break
        hit += n
    return hit


def simulate(requests: Sequence[Request], capacity_tokens: int, policy: str, chunk: int,
             keys: list[list[tuple[int, int]]] | None = None) -> int:
    """Prefix-hit tokens of ``policy`` (lru, fifo, belady) with room for ``capacity_tokens``."""
    keys = keys if keys is not None else [chunk_keys(r, chunk) for r in requests]
    if policy == "belady":
        return _belady(keys, capacity_tokens)
    cache: OrderedDict[int, int] = OrderedDict()
    used = hit = 0
    for chunks in keys:
        hit += _prefix_hit(chunks, cache.__contains__)
        for key, n in chunks:
            if key in cache:
                if policy == "lru":
                    cache.move_to_end(key)
                continue
            if n > capacity_tokens:
                continue
            cache[key] = n
            used += n
            while used > capacity_tokens:
                _k, size = cache.popitem(last=False)
                used -= size
    return hit


def _belady(keys: list[list[tuple[int, int]]], capacity_tokens: int) -> int:
    never = len(keys) + 1
    upcoming: dict[int, int] = {}
    next_use: list[list[int]] = [[] for _ in keys]
    for i in range(len(keys) - 1, -1, -1):
        nxt = []
        for key, _n in keys[i]:
            nxt.append(upcoming.get(key, never))
        for key, _n in keys[i]:
            upcoming[key] = i
        next_use[i] = nxt
    cached: dict[int, tuple[int, int]] = {}  # key -> (size, next use)
    heap: list[tuple[int, int]] = []  # (-next use, key), stale entries skipped
    used = hit = 0
    for i, chunks in enumerate(keys):
        hit += _prefix_hit(chunks, cached.__contains__)
        for (key, n), nxt in zip(chunks, next_use[i]):
            if key in cached:
                cached[key] = (n, nxt)
                heapq.heappush(heap, (-nxt, key))
                continue
            if nxt == never or n > capacity_tokens:
                continue
            while used + n > capacity_tokens:
                far, victim = heap[0]
                if victim not in cached or cached[victim][1] != -far:
                    heapq.heappop(heap)
                    continue
                if -far <= nxt:  # everything cached is needed sooner: do not keep this one
                    break
                heapq.heappop(heap)
                used -= cached.pop(victim)[0]
            if used + n <= capacity_tokens:
                cached[key] = (n, nxt)
                used += n
                heapq.heappush(heap, (-nxt, key))
    return hit


def replay_store(requests: Sequence[Request], cpu_tokens: int, disk_tokens: int, chunk: int,
                 progress: Progress = lambda it, _d: it, label: str = "kvstore") -> int:
    """Prefix-hit tokens of a real KVStore (cpu tier, and a disk tier when ``disk_tokens``)."""
    import torch  # here, not at the top: `kvstore serve` imports the CLI and must not load torch

    from kvstore.spec import KVSpec
    from kvstore.store import KVStore

    tiny = KVSpec(model_id="kvstore/plan", num_layers=1, num_kv_heads=1, head_size=4, dtype=torch.float16)
    bpt = tiny.bytes_per_token
    tiers: dict = {"cpu": {"capacity": max(cpu_tokens, chunk) * bpt}}
    workdir = tempfile.mkdtemp(prefix="kvstore-plan-") if disk_tokens else None
    if workdir:
        # A disk object carries a ~200-byte header beside its KV.
        tiers["disk"] = {"path": os.path.join(workdir, "disk"), "capacity": int(disk_tokens * (bpt + 200 / chunk))}
    longest = max(r.input_length for r in requests)
    buf = torch.zeros(tiny.chunk_shape(longest), dtype=tiny.dtype)
    hit = 0
    try:
        with KVStore(tiny, {"chunk_size": chunk, "tiers": tiers, "promote": True}) as store:
            for req in progress(requests, label):
                toks = req.tokens()
                got, _ = store.get(toks, out=buf)
                hit += got
                store.put(toks, buf[:, :, :len(toks)])
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return hit


def plan(requests: Sequence[Request], cpu: Sequence[int], disk: Sequence[int], bytes_per_token: int,
         chunk: int = 256, policies: Sequence[str] = POLICIES, progress: Progress = lambda it, _d: it) -> Plan:
    """Every policy at every (cpu, disk) capacity in bytes of the model's KV."""
    keys = [chunk_keys(r, chunk) for r in requests]
    total = sum(r.input_length for r in requests)
    unique: dict[int, int] = {}
    for chunks in keys:
        unique.update(chunks)
    unique_tokens = sum(unique.values())
    bound = simulate(requests, unique_tokens, "lru", chunk, keys) / max(total, 1)
    points = []
    for c in cpu:
        for d in disk:
            tokens_c, tokens_d = c // bytes_per_token, d // bytes_per_token
            for policy in policies:
                if policy == "kvstore":
                    hit = replay_store(requests, tokens_c, tokens_d, chunk, progress,
                                       f"cpu {human_bytes(c)}{f' + disk {human_bytes(d)}' if d else ''}")
                else:
                    hit = simulate(requests, tokens_c + tokens_d, policy, chunk, keys)
                points.append(PlanPoint(policy, c, d, hit, total))
    return Plan(points, bound, total, len(requests), bytes_per_token, unique_tokens * bytes_per_token)


def recommend(result: Plan, share: float = 0.95, policy: str = "kvstore") -> str:
    """The smallest grid point (memory first, then disk) whose ``policy`` reaches ``share`` of the bound."""
    mine = [p for p in result.points if p.policy == policy] or result.points
    good = sorted((p for p in mine if p.ratio >= share * result.bound), key=lambda p: (p.cpu_bytes, p.disk_bytes))
    if good:
        p = good[0]
        disk = f" + disk {human_bytes(p.disk_bytes)}" if p.disk_bytes else ""
        return (f"cpu {human_bytes(p.cpu_bytes)}{disk} reaches {p.ratio / result.bound:.0%} of the bound "
                f"(hit ratio {p.ratio:.3f} of {result.bound:.3f}); everything would fit in {human_bytes(result.unique_bytes)}")
    best = max(mine, key=lambda p: p.ratio)
    disk = f" + disk {human_bytes(best.disk_bytes)}" if best.disk_bytes else ""
    return (f"no capacity in the grid reaches {share:.0%} of the bound {result.bound:.3f}: the best, "
            f"cpu {human_bytes(best.cpu_bytes)}{disk}, reaches {best.ratio / result.bound:.0%}; "
            f"everything would fit in {human_bytes(result.unique_bytes)}")


def human_bytes(n: int) -> str:
    """1.5 GiB, 64 MiB, 3.81 TiB: capacities as the plan prints them."""
    if n >= 2**40:
        return f"{n / 2**40:.3g} TiB"
    if n >= 2**30:
        return f"{n / 2**30:.3g} GiB"
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n / 2**10:.3g} KiB"
