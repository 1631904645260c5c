"""``kvstore demo``: a multi-turn chat workload against the configured tiers.

Until a real engine is wired in (connectors issue), "prefill" is a deterministic function of the
prefix, so every hit is checked against what prefill would have produced: the demo proves the
store returns the right KV, not just some KV.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kvstore.config import StoreConfig
from kvstore.spec import KVSpec
from kvstore.store import KVStore

LLAMA3_8B = KVSpec(model_id="kvstore-demo/llama-3-8b-shaped", num_layers=32, num_kv_heads=8, head_size=128,
                   dtype=torch.float16)
QUICK = KVSpec(model_id="kvstore-demo/quick", num_layers=4, num_kv_heads=2, head_size=64, dtype=torch.float16)


class FakePrefill:
    """KV as a causal function of the tokens: position p depends on tokens[0..p] only."""

    def __init__(self, spec: KVSpec, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.spec = spec
        self.pattern = torch.randn(spec.chunk_shape(1), generator=g).to(spec.dtype)

    def __call__(self, tokens: list[int], start: int = 0) -> torch.Tensor:
        t = torch.tensor(tokens, dtype=torch.int64)
        # A running hash of the prefix, mapped to a scale in [0.5, 1.5).
        h = torch.cumsum(t * 2654435761 % 1000003, 0) % 9973
        scale = (0.5 + h[start:].to(torch.float32) / 9973).to(self.spec.dtype)
        shape = [1] * self.pattern.dim()
        shape[2] = -1
        return self.pattern * scale.view(shape)


@dataclass
class TurnResult:
    user: int
    turn: int
    prompt_tokens: int
    hit_tokens: int
    get_s: float
    put_s: float


def _conversations(users: int, turns: int, system_len: int, msg_len: tuple[int, int], seed: int = 1):
    rng = random.Random(seed)
    system = [rng.randrange(128256) for _ in range(system_len)]
    convs = []
    for _u in range(users):
        msgs = []
        for _t in range(turns):
            user = [rng.randrange(128256) for _ in range(rng.randint(*msg_len))]
            reply = [rng.randrange(128256) for _ in range(rng.randint(*msg_len))]
            msgs.append((user, reply))
        convs.append(msgs)
    return system, convs


def _serve(store: KVStore, prefill: FakePrefill, prompt: list[int]) -> tuple[int, float, float]:
    t0 = time.perf_counter()
    hit, cached = store.get(prompt)
    t1 = time.perf_counter()
    expected_prefix = prefill(prompt[:hit]) if hit else None
    if hit and not torch.equal(cached, expected_prefix):
        raise AssertionError(f"kvstore returned wrong KV for a {hit}-token hit")
    kv = prefill(prompt) if not hit else torch.cat([cached, prefill(prompt, start=hit)], dim=2)
    t2 = time.perf_counter()
    store.put(prompt, kv)
    t3 = time.perf_counter()
    return hit, t1 - t0, t3 - t2


def _tier_table(store: KVStore) -> str:
    st = store.stats()
    rows = [f"{'tier':<6} {'hit chunks':>10} {'hit tokens':>10} {'objects':>8} {'stored MiB':>10} "
            f"{'load s':>7} {'write s':>8} {'evict':>6} {'demote':>6} {'promote':>7} {'corrupt':>7}"]
    for name, t in st["tiers"].items():
        objects = "-" if t["objects"] is None else str(t["objects"])
        stored = "-" if t["bytes"] is None else f"{t['bytes'] / 2**20:.1f}"
        rows.append(f"{name:<6} {int(t['hits']):>10} {int(t['hit_tokens']):>10} {objects:>8} "
                    f"{stored:>10} {t['load_seconds']:>7.2f} {t['write_seconds']:>8.2f} "
                    f"{int(t['evictions']):>6} {int(t['demotions']):>6} {int(t['promotions']):>7} {int(t['corrupt']):>7}")
    return "\n".join(rows)


def run_demo(config: StoreConfig, users: int = 4, turns: int = 4, quick: bool = False, keep: bool = False) -> int:
    spec = QUICK if quick else LLAMA3_8B
    system_len, msg_len = (512, (60, 200)) if quick else (2048, (150, 500))
    system, convs = _conversations(users, turns, system_len, msg_len)
    prefill = FakePrefill(spec)
    tiers = ", ".join(f"{k}({(t.capacity or 0) / 2**30:.1f} GiB)" if t.capacity else k
                      for k, t in config.tiers.items())
    print(f"kvstore demo: {spec.model_id}: {spec.num_layers} layers x {spec.num_kv_heads} KV heads x "
          f"{spec.head_size}, {spec.dtype}, {spec.bytes_per_token // 1024} KiB/token")
    print(f"tiers: {tiers}; chunk {config.chunk_size} tokens; {users} conversations x {turns} turns "
          f"sharing a {system_len}-token system prompt")

    results: list[TurnResult] = []
    histories = [list(system) for _ in range(users)]
    with KVStore(spec, config) as store:
        store.clear()  # the demo's own namespace only: other models' cache is untouched
        with tqdm(total=users * turns, desc="serving turns", unit="req", leave=False) as bar:
            for turn in range(turns):
                for u in range(users):
                    user_msg, reply = convs[u][turn]
                    prompt = histories[u] + user_msg
                    hit, get_s, put_s = _serve(store, prefill, prompt)
                    results.append(TurnResult(u, turn, len(prompt), hit, get_s, put_s))
                    histories[u] = prompt + reply
                    bar.update()
        store.flush()
        total = sum(r.prompt_tokens for r in results)
        hits = sum(r.hit_tokens for r in results)
        gb = hits * spec.bytes_per_token / 1e9
        get_s = sum(r.get_s for r in results)
        print(f"\nphase 1 (warm process): {len(results)} requests, {total} prompt tokens, {hits} served from "
              f"cache ({100 * hits / max(total, 1):.1f}%), {gb:.2f} GB of KV fetched in {get_s:.2f} s "
              f"({gb / max(get_s, 1e-9):.2f} GB/s), every hit verified")
        for turn in range(turns):
            rs = [r for r in results if r.turn == turn]
            print(f"  turn {turn + 1}: prompt {sum(r.prompt_tokens for r in rs) // len(rs):>6} tok avg, "
                  f"hit {100 * sum(r.hit_tokens for r in rs) / sum(r.prompt_tokens for r in rs):5.1f}%, "
                  f"get {1000 * sum(r.get_s for r in rs) / len(rs):7.1f} ms avg, "
                  f"put {1000 * sum(r.put_s for r in rs) / len(rs):7.1f} ms avg")
        print(_tier_table(store))

    if "disk" not in config.tiers:
        return 0
    print("\nphase 2: new process-like store over the same cache dir (memory tiers start empty)")
    with KVStore(spec, config) as store:
        again = []
        for u in range(users):
            prompt = histories[u]
            t0 = time.perf_counter()
            hit, cached = store.get(prompt)
            dt = time.perf_counter() - t0
            if hit and not torch.equal(cached, prefill(prompt[:hit])):
                raise AssertionError("wrong KV after restart")
            again.append((len(prompt), hit, dt))
        total = sum(a[0] for a in again)
        hits = sum(a[1] for a in again)
        secs = sum(a[2] for a in again)
        print(f"  {len(again)} full histories: {hits}/{total} tokens from cache ({100 * hits / max(total, 1):.1f}%), "
              f"{hits * spec.bytes_per_token / 1e9 / max(secs, 1e-9):.2f} GB/s, verified")
        print(_tier_table(store))
        if not keep:
            store.clear()
    return 0
