"""The Redis tier against a real redis-server."""

import time

import redis
import torch

from conftest import causal_kv, stall_writes
from kvstore import KVStore


def cfg(url, cpu="1MiB", **redis_opts):
    tiers = {"redis": {"url": url, **redis_opts}}
    if cpu:
        tiers["cpu"] = {"capacity": cpu}
    return {"chunk_size": 16, "tiers": tiers}


def test_shared_through_redis(spec, redis_url):
    toks = list(range(90))
    kv = causal_kv(spec, toks)
    with KVStore(spec, cfg(redis_url)) as a:
        assert a.put(toks, kv) == 6
        a.flush()
        assert a.stats()["tiers"]["redis"]["puts"] == 6
    with KVStore(spec, cfg(redis_url)) as b:  # another engine: empty memory, same Redis
        assert b.lookup(toks) == 90
        hit, out = b.get(toks)
        assert hit == 90 and torch.equal(out, kv)
        st = b.stats()["tiers"]
        assert st["redis"]["hits"] == 6 and st["cpu"]["promotions"] == 6
        assert b.get(toks)[0] == 90 and b.stats()["tiers"]["cpu"]["hits"] == 6


def test_redis_only_store(spec, redis_url):
    toks = list(range(40))
    kv = causal_kv(spec, toks)
    with KVStore(spec, cfg(redis_url, cpu=None)) as store:
        store.put(toks, kv)
        hit, out = store.get(toks)
        assert hit == 40 and torch.equal(out, kv)


def test_writer_skips_chunks_redis_already_has(spec, redis_url):
    toks = list(range(32))
    with KVStore(spec, cfg(redis_url)) as a:
        a.put(toks, causal_kv(spec, toks))
    with KVStore(spec, cfg(redis_url)) as b:
        b.put(toks, causal_kv(spec, toks))
        b.flush()
        assert b.stats()["tiers"]["redis"]["puts"] == 0


def test_default_ttl_and_pin_extends_it(spec, redis_url):
    client = redis.Redis.from_url(redis_url)
    a, b = list(range(16)), list(range(100, 116))
    with KVStore(spec, cfg(redis_url, ttl_s=2)) as store:
        store.put(a, causal_kv(spec, a))
        store.put(b, causal_kv(spec, b))
        store.flush()
        keys = sorted(client.keys("kvstore:*"))
        assert len(keys) == 2 and all(0 < client.ttl(k) <= 2 for k in keys)
        assert store.pin(a, ttl_s=60) == 16
        ttls = sorted(client.ttl(k) for k in keys)
        assert ttls[0] <= 2 and ttls[1] > 50
        time.sleep(2.5)
        assert len(client.keys("kvstore:*")) == 1  # the unpinned chunk expired in Redis
    client.close()


def test_corrupt_value_is_a_miss_and_deleted(spec, redis_url):
    client = redis.Redis.from_url(redis_url)
    toks = list(range(32))
    with KVStore(spec, cfg(redis_url, cpu=None)) as store:
        store.put(toks, causal_kv(spec, toks))
        tier = store.tiers[0]
        rkey = tier._rkey(store.chunks(toks)[1].key)
        value = bytearray(client.get(rkey))
        value[-5] ^= 1
        client.set(rkey, bytes(value))
        assert store.get(toks)[0] == 16
        assert store.stats()["tiers"]["redis"]["corrupt"] == 1
        assert not client.exists(rkey)
    client.close()


def test_redis_outage_degrades_to_misses_and_recovers(spec, redis_server, redis_url):
    a, b, c = list(range(32)), list(range(500, 532)), list(range(900, 932))
    with KVStore(spec, cfg(redis_url, timeout_s=0.5)) as store:
        store.put(a, causal_kv(spec, a))
        store.flush()
        redis_server.stop()
        # Memory hits keep being served; Redis-only data is a miss, not an exception.
        assert store.get(a)[0] == 32
        t0 = time.monotonic()
        store.put(b, causal_kv(spec, b))
        store.flush()
        assert store.get(b)[0] == 32  # from cpu
        with KVStore(spec, cfg(redis_url, timeout_s=0.5)) as other:
            assert other.lookup(a) == 0
            assert other.lookup(a) == 0  # in back-off: answered without waiting on the network
        assert time.monotonic() - t0 < 10
        assert store.stats()["tiers"]["redis"]["unavailable"] >= 1
        redis_server.start()
        deadline = time.monotonic() + 15
        while True:  # back-off expires, redis-py reconnects on its own
            store.put(c, causal_kv(spec, c))
            store.flush()
            with KVStore(spec, cfg(redis_url)) as probe:
                if probe.lookup(c) == 32:
                    break
            assert time.monotonic() < deadline, "store never reconnected to Redis"
            c = [t + 1 for t in c]
            time.sleep(0.3)


def test_pin_before_async_write_still_reaches_redis_ttl(spec, redis_url):
    client = redis.Redis.from_url(redis_url)
    toks = list(range(16))
    with KVStore(spec, cfg(redis_url, ttl_s=2)) as store:
        with stall_writes(store.tiers[1]):
            store.put(toks, causal_kv(spec, toks))
            store.pin(toks, ttl_s=100)  # before the SET: EXPIRE finds no key
            assert store.stack.writers["redis"].pending == 1 and not client.keys("kvstore:*")
        store.flush()
        (key,) = client.keys("kvstore:*")
        assert client.ttl(key) > 50
    client.close()


def test_calls_in_flight_when_an_outage_begins_do_not_lengthen_the_back_off():
    """Eight threads' calls fail when Redis dies, together or one after another as their
    timeouts run out: one outage, so the back-off is its first step (0.5 s), not 2^8 of it. A
    call begun after that failure that fails too doubles it; a success resets it."""
    from kvstore.tiers.backoff import Backoff

    now = [100.0]
    b = Backoff("redis tier x", initial_s=0.5, clock=lambda: now[0])
    starts = [100.0 + 0.25 * i for i in range(8)]  # begun 0.25 s apart against a hung backend
    now[0] = 102.0  # the first times out
    for started in starts:
        b.failed(OSError("timed out"), started)
        now[0] += 0.25  # the others time out one after another, past the 0.5 s back-off
    assert b.available
    started = b.now()
    now[0] += 2.0
    b.failed(OSError("timed out"), started)  # begun after the failure: the outage goes on
    now[0] += 0.9
    assert not b.available
    now[0] += 0.11
    assert b.available
    b.succeeded()
    started = b.now()
    b.failed(OSError("down again"), started)
    now[0] += 0.51
    assert b.available
