"""The Redis tier on a real Redis Cluster and a real Valkey cluster (3 masters + 3 replicas):
batches grouped per node, TTLs and pins across slots, object checks, placement that depends on
the key alone, and a master SIGKILLed under load."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
import redis.connection
import torch
from redis.cluster import key_slot

from clusters import Cluster, failover_load
from conftest import causal_kv
from kvstore import KVStore

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(redis_cluster):
    """The session's cluster, emptied (other tests' daemons write to it too)."""
    for port in redis_cluster.masters():
        with redis_cluster.client(port) as c:
            c.flushall()
    return redis_cluster


def cfg(url: str, **redis_opts: object) -> dict:
    return {"chunk_size": 16, "tiers": {"redis": {"url": url, **redis_opts}}}


def stored_keys(cluster: Cluster) -> dict[int, list[bytes]]:
    """The kvstore keys each live master holds."""
    out = {}
    for port in cluster.masters():
        with cluster.client(port) as c:
            out[port] = list(c.scan_iter(match="kvstore:*", count=1000))
    return out


def test_cluster_round_trip_pins_and_clear(spec, cluster):
    """Chunks spread over all three masters; partial tail, pins and clear work across slots."""
    toks = list(range(200))  # 12 full chunks and a tail of 8
    kv = causal_kv(spec, toks)
    with KVStore(spec, cfg(cluster.url, ttl_s=100)) as store:
        store.clear()
        store.put(toks, kv)
        store.flush()
        hit, out = store.get(toks)
        assert hit == 200 and torch.equal(out, kv)
        assert store.pin(toks, ttl_s=1000) == 200
        per_node = stored_keys(cluster)
        assert sum(len(v) for v in per_node.values()) == 13
        assert all(per_node.values()), f"keys on only some masters: {per_node}"
        for port, keys in per_node.items():
            with cluster.client(port) as c:
                assert all(c.ttl(k) > 500 for k in keys)
        store.clear()
        assert sum(len(v) for v in stored_keys(cluster).values()) == 0


def test_batches_are_one_round_trip_per_node(spec, cluster, monkeypatch):
    """A 64-chunk put and get each send one pipeline per master for the existence check and one
    for the data, not one round trip per key (connection set-up aside)."""
    toks = list(range(64 * 16))
    kv = causal_kv(spec, toks)
    with KVStore(spec, cfg(cluster.url)) as store:
        store.clear()
        sends: collections.Counter[int] = collections.Counter()
        original = redis.connection.AbstractConnection.send_packed_command

        def counting(self, command, check_health=True):
            first = bytes((command[0] if isinstance(command, list) else command)[:40])
            if not any(op in first for op in (b"HELLO", b"CLIENT", b"COMMAND", b"CLUSTER")):  # a new connection's
                sends[self.port] += 1
            return original(self, command, check_health)

        store.put(toks[:16], kv[:, :, :16])  # connections and topology warm
        store.flush()
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        store.put(toks, kv)
        store.flush()
        writes = sum(sends.values())
        sends.clear()
        hit, out = store.get(toks)
        reads = sum(sends.values())
        monkeypatch.undo()
        assert hit == len(toks) and torch.equal(out, kv)
        masters = len(cluster.masters())
        # a put checks existence, then writes: one pipeline per master each
        assert writes <= 2 * masters, f"{writes} sends for a 64-object put"
        assert reads <= 2 * masters, f"{reads} sends for a 64-object get"


def test_placement_depends_on_the_key_alone(spec, cluster, tmp_path):
    """Another process (its own hash seed) writes; this one reads the same keys from the same
    slots. No hash tags: keys spread by their own CRC16, so no master takes every key."""
    toks = list(range(160))
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import causal_kv
        from kvstore import KVSpec, KVStore
        spec = KVSpec(model_id="test/tiny", num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float16)
        toks = list(range(160))
        with KVStore(spec, {cfg(cluster.url)!r}) as store:
            store.put(toks, causal_kv(spec, toks))
    """)
    with KVStore(spec, cfg(cluster.url)) as store:
        store.clear()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    keys = [k for ks in stored_keys(cluster).values() for k in ks]
    assert len(keys) == 10 and not any(b"{" in k for k in keys)
    with cluster.client(cluster.masters()[0]) as c:
        assert all(c.cluster("keyslot", k) == key_slot(k) for k in keys)
    with KVStore(spec, cfg(cluster.url)) as store:
        hit, out = store.get(toks)
        assert hit == 160 and torch.equal(out, causal_kv(spec, toks))
        store.clear()


def test_corrupt_object_on_a_node_is_a_miss(spec, cluster):
    """Bytes flipped on a node: that chunk and every later one miss, counted as corrupt, and the
    object is deleted from the cluster, so a fresh engine misses there too; earlier chunks hit."""
    toks = list(range(96))
    kv = causal_kv(spec, toks)
    with KVStore(spec, cfg(cluster.url)) as store:
        store.clear()
        store.put(toks, kv)
        store.flush()
        victim = store.chunks(toks)[3].key.hex().encode()
    per_node = stored_keys(cluster)
    victim_node, victim_key = next((p, k) for p, ks in per_node.items() for k in ks if k.endswith(victim))
    with cluster.client(victim_node) as c:
        blob = bytearray(c.get(victim_key))
        blob[-5] ^= 0xFF
        c.set(victim_key, bytes(blob))
    with KVStore(spec, cfg(cluster.url)) as store:
        hit, out = store.get(toks)
        assert hit == 48 and torch.equal(out[:, :, :hit], kv[:, :, :hit])
        assert store.stats()["tiers"]["redis"]["corrupt"] == 1
    with cluster.client(victim_node) as c:
        assert not c.exists(victim_key), "a rejected object stays in the cluster"
    with KVStore(spec, cfg(cluster.url)) as store:  # a fresh engine: a plain miss there
        hit, out = store.get(toks)
        assert hit == 48 and torch.equal(out[:, :, :hit], kv[:, :, :hit])
    with KVStore(spec, cfg(cluster.url)) as store:
        store.clear()


@pytest.mark.parametrize("flavour", ["redis", "valkey"])
def test_master_killed_under_load(spec, flavour, tmp_path):
    """SIGKILL a master while three threads read and one writes. Every call returns (no
    exception, no read held through the failover), every hit is the right KV, the store finds
    the promoted replica by itself, and everything stored before the kill hits again, in this
    store and in a fresh one whose URL's first seed is the dead node."""
    cluster = Cluster(tmp_path, flavour)
    try:
        prompts = [[p * 1000 + i for i in range(64)] for p in range(30)]
        with KVStore(spec, cfg(cluster.url, timeout_s=0.5)) as store:
            for p in prompts:
                store.put(p, causal_kv(spec, p))
            assert store.flush(10)
            assert all(store.lookup(p) == 64 for p in prompts)
            time.sleep(0.5)  # replication is asynchronous: let the replicas have it all
            result = failover_load(store, cluster, prompts, lambda p: causal_kv(spec, p))
        print(f"\n{flavour}: {result}")
        assert result["errors"] == [] and result["wrong"] == 0
        assert result["misses"] > 0, "the kill never showed: the test measured nothing"
        assert result["slowest_read_s"] < 2.5, "a read was held through the failover"
        assert result["back_after_s"] is not None, "never back to every prompt hitting"
        with KVStore(spec, cfg(cluster.url)) as fresh:
            for p in prompts:
                hit, out = fresh.get(p)
                assert hit == 64 and torch.equal(out, causal_kv(spec, p))
    finally:
        cluster.stop()



@pytest.mark.parametrize("url, message", [
    ("redis+cluster://127.0.0.1:7000,127.0.0.1:abc/0", "seed '127.0.0.1:abc' is not host:port"),
    ("redis+cluster://127.0.0.1:7000/1", "a cluster has only database 0"),
    ("redis+cluster://,/0", "no seed node"),
])
def test_a_malformed_cluster_url_is_a_config_error(spec, url, message):
    """Named at start, not misses (or an exception from pin()) later."""
    from kvstore.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        KVStore(spec, cfg(url))


def test_seeds_parse_with_ipv6_auth_and_spaces():
    from kvstore.tiers.redis import cluster_seeds

    first, seeds = cluster_seeds("redis+cluster://:pw@[::1]:7000, 10.0.0.2:7001/0")
    assert first == "redis://:pw@[::1]:7000/0" and seeds == [("::1", 7000), ("10.0.0.2", 7001)]
