"""Eviction, demotion, promotion and pins across cpu and disk tiers."""

import time

import pytest
import torch

from conftest import causal_kv, disk_config, mem_config, stall_writes
from kvstore import KVStore, PinLimitError

CHUNK_BYTES = 2 * 2 * 16 * 2 * 8 * 2  # the tiny spec's 16-token chunk


def seqs(n, length=16, base=0):
    return [[base + i * 1000 + j for j in range(length)] for i in range(n)]


def test_cpu_lru_eviction(spec):
    with KVStore(spec, mem_config(cpu=4 * CHUNK_BYTES)) as store:
        s = seqs(6)
        for t in s[:4]:
            store.put(t, causal_kv(spec, t))
        store.lookup(s[0])
        store.get(s[0])  # s[0] becomes most recently used
        store.put(s[4], causal_kv(spec, s[4]))
        assert [store.lookup(t) for t in s[:5]] == [16, 0, 16, 16, 16]
        assert store.stats()["tiers"]["cpu"]["evictions"] == 1


def test_eviction_demotes_to_disk_and_hit_promotes(spec, tmp_path):
    cfg = disk_config(tmp_path, cpu=2 * CHUNK_BYTES)
    cfg["tiers"]["disk"]["write"] = "demote"  # disk only receives what cpu evicts
    with KVStore(spec, cfg) as store:
        s = seqs(3)
        for t in s:
            store.put(t, causal_kv(spec, t))
        store.flush()
        st = store.stats()["tiers"]
        assert st["cpu"]["demotions"] == 1 and st["disk"]["objects"] == 1
        assert store.lookup(s[0]) == 16  # found on disk
        hit, kv = store.get(s[0])
        assert hit == 16 and torch.equal(kv, causal_kv(spec, s[0]))
        st = store.stats()["tiers"]
        assert st["disk"]["hits"] == 1 and st["cpu"]["promotions"] == 1
        assert store.get(s[0])[0] == 16 and store.stats()["tiers"]["cpu"]["hits"] == 1


def test_write_through_reaches_disk(spec, tmp_path):
    with KVStore(spec, disk_config(tmp_path)) as store:
        t = list(range(50))
        store.put(t, causal_kv(spec, t))
        store.flush()
        assert store.stats()["tiers"]["disk"]["objects"] == 4


def test_pinned_chunks_are_not_evicted(spec):
    with KVStore(spec, mem_config(cpu=4 * CHUNK_BYTES)) as store:
        s = seqs(8)
        store.put(s[0], causal_kv(spec, s[0]))
        assert store.pin(s[0], ttl_s=60) == 16
        for t in s[1:]:
            store.put(t, causal_kv(spec, t))
        assert store.lookup(s[0]) == 16
        assert store.stats()["tiers"]["cpu"]["pinned_bytes"] == CHUNK_BYTES
        assert store.unpin(s[0]) == 16
        for t in s[1:5]:
            store.put(t, causal_kv(spec, t))
        assert store.lookup(s[0]) == 0


def test_pin_expires(spec):
    with KVStore(spec, mem_config(cpu=2 * CHUNK_BYTES, pin_sweep_s=0.05)) as store:
        s = seqs(3)
        store.put(s[0], causal_kv(spec, s[0]))
        store.pin(s[0], ttl_s=1.0)  # long enough that a slow CI machine still puts twice within it
        store.put(s[1], causal_kv(spec, s[1]))
        store.put(s[2], causal_kv(spec, s[2]))  # evicts s[1], s[0] is pinned
        assert store.lookup(s[0]) == 16 and store.lookup(s[1]) == 0
        time.sleep(1.1)
        assert store.stats()["pinned_chunks"] == 0
        store.put(s[1], causal_kv(spec, s[1]))  # now s[0] is the LRU and unpinned
        assert store.lookup(s[0]) == 0


def test_pin_cap_is_enforced(spec):
    with KVStore(spec, mem_config(cpu=4 * CHUNK_BYTES)) as store:  # pin cap = 2 chunks
        t = list(range(48))
        store.put(t, causal_kv(spec, t))
        with pytest.raises(PinLimitError, match="tier 'cpu'"):
            store.pin(t, ttl_s=10)
        assert store.stats()["pinned_chunks"] == 0  # all or nothing
        assert store.pin(t[:32], ttl_s=10) == 32
        with pytest.raises(PinLimitError):
            store.pin(t, ttl_s=10)
        assert store.pin(t[:32], ttl_s=20) == 32  # re-pinning what is pinned needs no room


def test_put_when_everything_is_pinned_goes_down_a_tier(spec, tmp_path):
    cfg = disk_config(tmp_path, cpu=2 * CHUNK_BYTES)
    cfg["tiers"]["cpu"]["pin_fraction"] = 1.0
    with KVStore(spec, cfg) as store:
        s = seqs(3)
        for t in s[:2]:
            store.put(t, causal_kv(spec, t))
        store.pin(s[0], 60)
        store.pin(s[1], 60)
        store.put(s[2], causal_kv(spec, s[2]))
        store.flush()
        st = store.stats()["tiers"]
        assert st["cpu"]["rejected"] >= 1 and st["cpu"]["objects"] == 2
        hit, kv = store.get(s[2])
        assert hit == 16 and torch.equal(kv, causal_kv(spec, s[2]))


def test_disk_capacity_evicts_lru_files(spec, tmp_path):
    with KVStore(spec, disk_config(tmp_path, cpu=None, disk=3 * (CHUNK_BYTES + 300))) as store:
        s = seqs(5)
        for t in s:
            store.put(t, causal_kv(spec, t))
        st = store.stats()["tiers"]["disk"]
        assert st["objects"] == 3 and st["evictions"] == 2 and st["bytes"] <= st["capacity"]
        assert [store.lookup(t) for t in s] == [0, 0, 16, 16, 16]
        files = list(tmp_path.rglob("*.kvo"))
        assert len(files) == 3


def test_queue_full_drops_are_counted(spec, tmp_path):
    cfg = disk_config(tmp_path, queue_full="drop")
    cfg["tiers"]["disk"]["queue_size"] = 1
    with KVStore(spec, cfg) as store:
        with stall_writes(store.tiers[1]):  # the writer holds its first item: the queue (size 1) fills up
            for t in seqs(6):
                store.put(t, causal_kv(spec, t))
            _store, counters = store.counters.snapshot()
        store.flush()
        st = store.stats()["tiers"]
        dropped = counters["disk"]["dropped_writes"]
        assert dropped >= 3 and st["disk"]["objects"] == 6 - dropped
        assert st["disk"]["dropped_writes"] == dropped
        assert st["cpu"]["objects"] == 6  # the fast tier has everything regardless


def test_block_policy_applies_backpressure(spec, tmp_path):
    cfg = disk_config(tmp_path, queue_full="block", put_timeout_s=0.2)
    cfg["tiers"]["disk"]["queue_size"] = 1
    with KVStore(spec, cfg) as store:
        with stall_writes(store.tiers[1]):
            t0 = time.monotonic()
            for t in seqs(3):
                store.put(t, causal_kv(spec, t))
            waited = time.monotonic() - t0
        store.flush()
        assert waited >= 0.2  # put waited for room before giving up on one write
        assert store.stats()["tiers"]["disk"]["dropped_writes"] >= 1


def test_device_tier_demotes_to_cpu_and_promotes_back(spec):
    """The device tier is the same code on torch.device("cpu") here and CUDA where present."""
    cfg = {"chunk_size": 16, "tiers": {"device": {"capacity": 2 * CHUNK_BYTES, "device": "cpu"},
                                       "cpu": {"capacity": 8 * CHUNK_BYTES, "write": "demote"}}}
    with KVStore(spec, cfg) as store:
        assert store.tiers[0].device == torch.device("cpu")
        s = seqs(4)
        for t in s:
            store.put(t, causal_kv(spec, t))
        st = store.stats()["tiers"]
        assert st["device"]["objects"] == 2 and st["device"]["demotions"] == 2 and st["cpu"]["objects"] == 2
        hit, kv = store.get(s[0])
        assert hit == 16 and torch.equal(kv, causal_kv(spec, s[0]))
        st = store.stats()["tiers"]
        assert st["cpu"]["hits"] == 1 and st["device"]["promotions"] == 1
        for t in s:
            assert store.get(t)[0] == 16


def test_eviction_takes_tails_before_shared_prefixes(spec):
    """A prefix without its head is worthless: under pressure the tail chunks go first."""
    with KVStore(spec, mem_config(cpu=4 * CHUNK_BYTES)) as store:
        a, b = list(range(48)), list(range(1000, 1032))
        store.put(a, causal_kv(spec, a))
        store.put(b, causal_kv(spec, b))  # one of a's chunks must go
        assert store.lookup(a) == 32 and store.lookup(b) == 32
        store.get(a)  # using a refreshes its chunks: b's tail is now the oldest
        store.put(list(range(2000, 2016)), causal_kv(spec, list(range(2000, 2016))))
        assert store.lookup(a) == 32 and store.lookup(b) == 16
