"""Bugs of the time when KVStore and BlobStore each had their own tier stack (issue #15), one
test each: all failed before both became views over one TierStack and one read path."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import Daemon, causal_kv, disk_config
from kvstore import KVStore
from kvstore.blobstore import BlobStore, StoredObject
from kvstore.errors import ConfigError, PinLimitError
from kvstore.objects import encode_object, join_parts, meta_for
from kvstore.tiers.memory import MemoryTier


def _objects(n: int, size: int = 256) -> list[StoredObject]:
    out = []
    for i in range(n):
        key = bytes([i]) * 16
        kv = torch.full((1, 1, size // 2), float(i)).half()  # `size` payload bytes
        meta = meta_for(key, b"f" * 16, kv, False)
        out.append(StoredObject(key, meta, join_parts(encode_object(meta, kv))))
    return out


def test_daemon_pins_respect_pin_fraction(tmp_path):
    store = BlobStore({"tiers": {"cpu": {"capacity": 4000, "pin_fraction": 0.25}}})
    objs = _objects(8)
    store.put(objs)
    with pytest.raises(PinLimitError):  # 8 objects of ~400 bytes against a 1,000-byte pin cap
        store.pin([o.storage_key for o in objs], ttl_s=60)
    store.close()


def test_layerwise_get_promotes_a_disk_hit_like_get(tmp_path, spec):
    toks = list(range(64))
    for method in ("get", "get_layers"):
        cfg = disk_config(tmp_path / method, chunk=16, cpu="1MiB", disk="8MiB")
        with KVStore(spec, cfg) as s:
            s.put(toks, causal_kv(spec, toks))
            s.flush()
        with KVStore(spec, cfg) as s:  # a new store: only the disk holds the chunks
            if method == "get":
                s.get(toks)
            else:
                s.get_layers(toks).result()
            assert s.stats()["tiers"]["cpu"]["promotions"] == 4, method


def test_a_chunk_evicted_between_locate_and_copy_is_read_from_the_lower_tier(tmp_path, spec, monkeypatch):
    toks = list(range(64))
    with KVStore(spec, disk_config(tmp_path / "kv", chunk=16, cpu="1MiB", disk="8MiB")) as s:
        s.put(toks, causal_kv(spec, toks))
        s.flush()
        real = MemoryTier.acquire
        gone = {s.chunks(toks)[1].key}

        def racing(self, key):  # another thread's put evicted it just now
            if key in gone:
                gone.discard(key)
                self.delete([key])
                return None
            return real(self, key)

        monkeypatch.setattr(MemoryTier, "acquire", racing)
        hit, kv = s.get(toks)
        assert hit == 64 and torch.equal(kv, causal_kv(spec, toks))


def test_a_disk_budget_below_one_chunk_is_refused_at_start(tmp_path, spec):
    with pytest.raises(ConfigError, match="disk"):
        KVStore(spec, disk_config(tmp_path / "kv", chunk=16, cpu=None, disk=1000))


def test_put_reports_nothing_stored_when_the_only_tier_refused(tmp_path, spec):
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  sk-good: {tenant: a}\n")
    d = Daemon(tmp_path, key_file=keys)
    try:
        toks = list(range(32))
        cfg = {"chunk_size": 16, "tiers": {"remote": {"url": d.url, "api_key": "sk-wrong"}}}
        with KVStore(spec, cfg) as s:
            assert s.put(toks, causal_kv(spec, toks)) == 0
    finally:
        d.stop()


def test_a_stored_partial_tail_extends_a_hit_through_redis(redis_url, spec):
    toks = list(range(40))  # two chunks of 16 and a tail of 8
    cfg = {"chunk_size": 16, "tiers": {"redis": {"url": redis_url}}}
    with KVStore(spec, cfg) as s:
        s.put(toks, causal_kv(spec, toks))
        s.flush()
        assert s.lookup(toks + [1, 2]) == 40


_PREALLOC_PROBE = """
import sys, torch
from kvstore import KVSpec, KVStore
spec = KVSpec(model_id="probe", num_layers=2, num_kv_heads=2, head_size=16, dtype=torch.float16)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss()
s = KVStore(spec, {"chunk_size": 16, "tiers": {"cpu": {"capacity": 64 << 20, "prealloc": sys.argv[1] == "1"}}})
print(rss() - before)
"""


@pytest.mark.skipif(torch.cuda.is_available() or not os.path.exists("/proc/self/statm"),
                    reason="reads /proc; with CUDA the host pool is pinned, so resident from the start")
def test_cpu_prealloc_reserves_the_budget_in_a_kvstore_too():
    """Each in a fresh process: in a long-lived one (the test suite) malloc may hand the pool
    memory an earlier test freed and left resident, and resident growth then says nothing."""
    import subprocess
    import sys

    budget = 64 << 20
    grew = {p: int(subprocess.run([sys.executable, "-c", _PREALLOC_PROBE, str(int(p))], capture_output=True,
                                  text=True, check=True, timeout=120).stdout) for p in (False, True)}
    assert grew[False] < budget // 4 and grew[True] > budget * 0.9, grew


def test_refusals_are_counted_each_and_logged_once(spec, caplog):
    toks = list(range(64))
    with KVStore(spec, {"chunk_size": 16, "tiers": {"cpu": {"capacity": 2 * 16 * spec.bytes_per_token,
                                                              "pin_fraction": 1.0}}}) as s:
        s.put(toks[:32], causal_kv(spec, toks[:32]))
        s.pin(toks[:32], ttl_s=60)  # both slots pinned: nothing more fits
        with caplog.at_level("WARNING", logger="kvstore.tiers.base"):
            for n in (48, 64):
                assert s.put(toks[:n], causal_kv(spec, toks[:n])) == 0
        assert s.stats()["tiers"]["cpu"]["rejected"] == 3
        said = [r for r in caplog.records if "refuses writes" in r.getMessage()]
        assert len(said) == 1 and "pinned" in said[0].getMessage()


def test_a_prompt_larger_than_the_only_tier_keeps_its_head(spec):
    toks = list(range(40))  # chunks of 16, 16 and a tail of 8, into a tier of two slots
    kv = causal_kv(spec, toks)
    with KVStore(spec, {"chunk_size": 16, "tiers": {"cpu": {"capacity": 2 * 16 * spec.bytes_per_token}}}) as s:
        s.put(toks, kv)
        assert s.lookup(toks) == 32
        hit, got = s.get(toks)
        assert hit == 32 and torch.equal(got, kv[:, :, :32])


def test_an_object_deleted_from_disk_by_hand_leaves_its_owners_usage(tmp_path):
    objs = _objects(6, size=2048)
    store = BlobStore({"tiers": {"cpu": {"capacity": 5000}, "disk": {"path": str(tmp_path), "capacity": "1MiB"}}},
                      owners_journal=str(tmp_path / "owners.journal"))
    store.put(objs, owner="a")
    store.flush()
    assert store.stats()["tenants"]["a"]["objects"] == 6
    for f in tmp_path.rglob("*.kvo"):
        f.unlink()
    keys = [o.storage_key for o in objs]
    got = store.get(keys, [o.meta.key for o in objs])
    held = sum(g is not None for g in got)  # the ones still in memory
    assert store.stats()["tenants"]["a"]["objects"] == held < 6
    store.close()
