"""Property tests: lookup/get agree with a model of "longest stored prefix" on random streams."""

import threading

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import causal_kv, mem_config
from kvstore import KVSpec, KVStore

SPEC = KVSpec(model_id="test/prop", num_layers=1, num_kv_heads=1, head_size=4, dtype=torch.float16)
CHUNK = 4


def model_hit(stored: list[list[int]], query: list[int]) -> int:
    """Reference: the longest prefix of ``query`` on the chunk grid (or ending in a stored tail)
    that is a prefix of a stored sequence, where stored sequences are cut into the same chunks."""
    best = 0
    for s in stored:
        full = len(s) - len(s) % CHUNK
        # full chunks shared with s
        n = 0
        while n + CHUNK <= min(full, len(query)) and query[n:n + CHUNK] == s[n:n + CHUNK]:
            n += CHUNK
        cand = n
        # the stored partial tail of s, if it sits right after those chunks and prefixes the query
        if n == full and len(s) > full and query[full:len(s)] == s[full:] and len(query) >= len(s):
            cand = len(s)
        best = max(best, cand)
    return best


streams = st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=18), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stored=streams, queries=streams)
def test_lookup_and_get_match_reference(stored, queries):
    with KVStore(SPEC, mem_config(chunk=CHUNK, cpu="1MiB", promote=False)) as store:
        for s in stored:
            if s:
                store.put(s, causal_kv(SPEC, s))
        for q in queries + stored:
            expected = model_hit([s for s in stored if s], q)
            assert store.lookup(q) == expected, (stored, q)
            hit, kv = store.get(q)
            assert hit == expected
            assert torch.equal(kv, causal_kv(SPEC, q)[:, :, :hit] if q else kv)


def test_concurrent_puts_and_gets_never_mix_sequences(tmp_path):
    """Many threads, a cache small enough to evict constantly: every hit must be exact."""
    spec = KVSpec(model_id="test/threads", num_layers=2, num_kv_heads=2, head_size=8)
    cfg = {"chunk_size": 16, "tiers": {"cpu": {"capacity": 40 * 2048},
                                       "disk": {"path": str(tmp_path), "capacity": 200 * 2500}}}
    errors: list[str] = []
    with KVStore(spec, cfg) as store:
        def worker(seed: int) -> None:
            import random
            rng = random.Random(seed)
            for _ in range(150):
                base = rng.randrange(12)
                toks = [base * 7] * 16 + [base * 1000 + j for j in range(rng.randrange(1, 80))]
                if rng.random() < 0.5:
                    store.put(toks, causal_kv(spec, toks))
                hit, kv = store.get(toks)
                if not torch.equal(kv, causal_kv(spec, toks)[:, :, :hit]):
                    errors.append(f"wrong KV for seed {seed}")
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        st_ = store.stats()
    assert not errors, errors[:3]
    assert st_["tiers"]["cpu"]["evictions"] > 0 and st_["get_hit_tokens"] > 0
