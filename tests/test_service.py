"""The daemon as a real subprocess: sharing between processes, auth, tenants, quotas, limits,
restart, metrics, and a fuzzed HTTP API."""

import http.client
import os
import subprocess
import sys
import textwrap

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Daemon, causal_kv
from kvstore import KVSpec, KVStore
from kvstore.client import DaemonClient, ServiceError
from kvstore.objects import encode_object, join_parts, meta_for
from kvstore.wire import pack_batch

SPEC = KVSpec(model_id="test/daemon", num_layers=2, num_kv_heads=2, head_size=8)


def remote_cfg(url, cpu="1MiB", **remote):
    tiers = {"remote": {"url": url, **remote}}
    if cpu:
        tiers["cpu"] = {"capacity": cpu}
    return {"chunk_size": 16, "tiers": tiers}


def obj(key: bytes, tokens: int = 16) -> bytes:
    kv = torch.randn(SPEC.chunk_shape(tokens)).half()
    return join_parts(encode_object(meta_for(key, SPEC.fingerprint, kv, False), kv))


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import causal_kv
    from test_service import SPEC, remote_cfg
    from kvstore import KVStore
    toks = list(range(1000, 1100))
    with KVStore(SPEC, remote_cfg({url!r})) as store:
        store.put(toks, causal_kv(SPEC, toks))
    print("stored", flush=True)
""")


def test_two_processes_share_through_the_daemon(daemon):
    code = CHILD.format(tests=os.path.dirname(__file__), url=daemon.url)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "stored", out.stderr
    toks = list(range(1000, 1100))
    with KVStore(SPEC, remote_cfg(daemon.url)) as store:  # a fresh engine, another process
        assert store.lookup(toks) == 100
        hit, kv = store.get(toks)
        assert hit == 100 and torch.equal(kv, causal_kv(SPEC, toks))
        assert store.stats()["tiers"]["remote"]["hits"] == 7


@pytest.mark.parametrize("prealloc", [False, True])
def test_large_objects_round_trip_byte_exact(tmp_path, prealloc):
    """Bodies of MiBs are read straight into one buffer (with --cpu-prealloc, a region of the
    arena, here small enough that later bodies evict earlier objects to disk) and GETs into the
    client's unzeroed buffer: every byte must still be the one sent, in batches and alone."""
    daemon = Daemon(tmp_path, *(["--cpu-capacity", "3MiB", "--cpu-prealloc"] if prealloc else []))
    client = DaemonClient(daemon.url)
    blobs = {bytes([i]) * 16: obj(bytes([i]) * 16, tokens=16 * 640) for i in range(3)}  # 1.25 MiB each
    assert all(len(b) > 1 << 20 for b in blobs.values())
    assert client.put(list(blobs.items())[:2]) == 2
    assert client.put(list(blobs.items())[2:]) == 1
    got = client.get(list(blobs))
    assert [bytes(g) for g in got] == list(blobs.values())
    assert bytes(client.get([bytes([2]) * 16])[0]) == blobs[bytes([2]) * 16]
    if prealloc:
        assert client.stats()["tiers"]["cpu"]["evictions"] >= 1
    client.close()
    daemon.stop()


def test_daemon_restart_serves_disk(tmp_path):
    d = Daemon(tmp_path)
    client = DaemonClient(d.url)
    keys = [bytes([i]) * 16 for i in range(5)]
    client.put([(k, obj(k)) for k in keys])
    assert d.stop() == 0  # SIGTERM: in-flight work finishes, queued disk writes are flushed
    d.start()
    client = DaemonClient(d.url)
    assert client.exists(keys) == [True] * 5
    assert all(b is not None for b in client.get(keys))
    d.stop()


@pytest.mark.parametrize("sig", [15, 9])
def test_a_kept_alive_connection_survives_a_daemon_restart(tmp_path, sig):
    """The remote tier's client does not retry (a miss is cheaper than a stall), so a connection
    the restarted daemon no longer knows must not cost a failure: it is replaced at once."""
    d = Daemon(tmp_path)
    client = DaemonClient(d.url, retries=0)
    keys = [bytes([i]) * 16 for i in range(3)]
    client.put([(k, obj(k)) for k in keys])
    d.stop(sig)
    d.start()
    present = client.exists(keys)  # the first call after the restart: no error
    if sig == 15:  # SIGTERM flushed the disk writes; SIGKILL may have lost some
        assert present == [True] * 3
    client.put([(k, obj(k)) for k in keys])
    assert client.exists(keys) == [True] * 3
    d.stop()
    with pytest.raises(OSError):  # a daemon that is down is still a failure, at once
        client.exists(keys)


def test_a_pin_past_the_pin_cap_is_a_409_naming_the_cap(tmp_path):
    cfg = tmp_path / "kvstore.yaml"
    cfg.write_text("tiers:\n  cpu: {pin_fraction: 0.1}\n")
    d = Daemon(tmp_path, "--config", str(cfg), "--cpu-capacity", "64KiB")
    try:
        client = DaemonClient(d.url)
        keys = [bytes([i]) * 16 for i in range(4)]
        client.put([(k, obj(k)) for k in keys])  # ~2 KiB each, against a 6.4 KiB pin cap
        assert client.pin(keys[:2], ttl_s=60) == 2
        with pytest.raises(ServiceError) as err:
            client.pin(keys, ttl_s=60)
        assert err.value.status == 409 and "pin cap" in str(err.value)
        assert client.unpin(keys) == 2  # the refused pin pinned nothing
    finally:
        d.stop()


def test_objects_put_again_after_a_restart_are_served_from_memory(tmp_path):
    """After a restart the objects are on disk only; a client putting them again (LMCache
    re-sends its chunks) brings them back into memory, so the next GET reads no file."""
    d = Daemon(tmp_path)
    keys = [bytes([i]) * 16 for i in range(5)]
    DaemonClient(d.url).put([(k, obj(k)) for k in keys])
    assert d.stop() == 0
    d.start()
    client = DaemonClient(d.url)
    assert client.put([(k, obj(k)) for k in keys]) == 0  # nothing new: quota and disk untouched
    assert all(b is not None for b in client.get(keys))
    tiers = client.stats()["tiers"]
    assert tiers["cpu"]["hits"] == 5 and tiers["disk"]["hits"] == 0
    d.stop()


@pytest.fixture
def secured(tmp_path):
    kf = tmp_path / "keys.yaml"
    kf.write_text("keys:\n  ka: {tenant: a}\n  kb: {tenant: b}\n  kadmin: {tenant: ops, admin: true}\n"
                  "tenants:\n  a: {quota: 10000}\n")
    d = Daemon(tmp_path, "--max-body-bytes", "300000", "--max-batch", "8", key_file=kf)
    yield d
    d.stop()


def test_auth_tenants_and_quota(secured):
    url = secured.url
    key = b"\x07" * 16
    with pytest.raises(ServiceError) as e:
        DaemonClient(url).exists([key])
    assert e.value.status == 401
    with pytest.raises(ServiceError) as e:
        DaemonClient(url, api_key="nope").exists([key])
    assert e.value.status == 401
    a, b, admin = (DaemonClient(url, api_key=k) for k in ("ka", "kb", "kadmin"))
    assert a.put([(key, obj(key))]) == 1
    assert a.exists([key]) == [True]
    assert b.exists([key]) == [False] and b.get([key]) == [None]  # same key, other tenant: nothing
    assert set(b.stats()["tenants"]) == {"b"}
    # Tenant a's quota (10000 bytes) holds a few objects; the put that would exceed it is refused whole.
    many = [(bytes([i]) * 16, obj(bytes([i]) * 16)) for i in range(10, 17)]
    with pytest.raises(ServiceError) as e:
        a.put(many)
    assert e.value.status == 403 and "quota exceeded" in e.value.message
    assert a.exists([key]) == [True] and a.exists([k for k, _ in many]) == [False] * 7
    with pytest.raises(ServiceError) as e:
        a.clear()
    assert e.value.status == 403
    admin.clear()
    assert a.exists([key]) == [False]


def raw_post(port, path, body, key="ka", ctype="application/msgpack"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {key}", "Content-Type": ctype})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def test_limits_and_malformed_requests(secured):
    port = secured.port
    k = b"\x01" * 16
    assert raw_post(port, "/v1/exists", b"\xc1garbage")[0] == 400
    status, data = raw_post(port, "/v1/exists", msgpack.packb({"keys": [b"short"]}))
    assert status == 400 and b"16 bytes" in data
    status, data = raw_post(port, "/v1/exists", msgpack.packb({"keys": [k] * 9}))
    assert status == 400 and b"exceeds the limit of 8" in data
    assert raw_post(port, "/v1/put", b"x" * 400_000, ctype="application/x-kvstore-batch")[0] == 413
    good = obj(k)
    bad = bytearray(good)
    bad[-3] ^= 1
    body = b"".join(pack_batch([(k, bytes(bad))]))
    status, data = raw_post(port, "/v1/put", body, ctype="application/x-kvstore-batch")
    assert status == 400 and b"checksum" in data
    body = b"".join(pack_batch([(b"\x02" * 16, good)]))  # an object stored under another key
    status, data = raw_post(port, "/v1/put", body, ctype="application/x-kvstore-batch")
    assert status == 400 and b"key" in data
    assert DaemonClient(secured.url, api_key="ka").exists([k, b"\x02" * 16]) == [False, False]
    status, data = raw_post(port, "/v1/pin", msgpack.packb({"keys": [k], "ttl_s": -5}))
    assert status == 400 and b"ttl_s" in data


def test_the_daemon_process_does_not_load_torch(tmp_path):
    """The daemon moves verified bytes and never decodes a tensor: torch would add ~170 MiB of
    RSS and a second of start-up to every cache server for nothing."""
    from conftest import free_port

    daemon = Daemon(tmp_path, "--lmcache-port", str(free_port()))
    try:
        c = DaemonClient(daemon.url)
        k = b"\x07" * 16
        c.put([(k, obj(k))])
        assert c.get([k])[0] is not None
        with open(f"/proc/{daemon.proc.pid}/maps") as f:
            libs = f.read()
        assert "libtorch" not in libs and "/torch/" not in libs
    finally:
        daemon.stop()


def test_pin_lookup_delete_and_metrics(daemon):
    c = DaemonClient(daemon.url)
    keys = [bytes([i]) * 16 for i in range(1, 5)]
    c.put([(k, obj(k)) for k in keys[:3]])
    assert c.lookup(keys) == 3 and c.lookup(keys[1:]) == 2
    assert c.pin(keys, ttl_s=60) == 3
    assert c.unpin(keys) == 3
    assert c.delete(keys[:1]) == 1 and c.lookup(keys) == 0
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert 'kvstore_requests_total{code="200",route="/v1/put"}' in text and "kvstore_tier_objects" in text
    conn.request("GET", "/openapi.json")
    spec = __import__("json").loads(conn.getresponse().read())
    assert {"/v1/get", "/v1/put", "/v1/pin", "/metrics"} <= set(spec["paths"])


def test_remote_tier_outage_degrades_to_misses(tmp_path):
    d = Daemon(tmp_path)
    toks = list(range(64))
    with KVStore(SPEC, remote_cfg(d.url, timeout_s=1.0)) as store:
        store.put(toks, causal_kv(SPEC, toks))
        store.flush()
        d.stop()
        assert store.get(toks)[0] == 64  # cpu still serves
        with KVStore(SPEC, remote_cfg(d.url, timeout_s=1.0)) as other:
            assert other.lookup(toks) == 0
        assert store.stats()["tiers"]["remote"]["unavailable"] >= 0


_BODIES = st.one_of(st.binary(max_size=200), st.builds(
    lambda d: msgpack.packb(d), st.dictionaries(st.sampled_from(["keys", "ttl_s", "v", "x", "session", "tool", "ago_s"]), st.one_of(
        st.lists(st.binary(min_size=0, max_size=20), max_size=5), st.integers(-2**63, 2**64 - 1),
        st.floats(allow_nan=True),
        st.text(max_size=5), st.none()), max_size=3)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/exists", "/v1/lookup", "/v1/get", "/v1/put", "/v1/pin", "/v1/unpin",
                             "/v1/delete", "/v1/clear", "/v1/tool/started", "/v1/tool/finished", "/v1/nope"]),
       body=_BODIES)
def test_fuzzed_requests_never_get_a_5xx(daemon, path, body):
    status, _ = raw_post(daemon.port, path, body, key="")
    assert status < 500


def test_async_client(daemon):
    import asyncio

    from kvstore.service.client import AsyncKVStoreClient

    async def run():
        keys = [bytes([i]) * 16 for i in range(20, 28)]
        async with AsyncKVStoreClient(daemon.url) as c:
            stored = await asyncio.gather(*(c.put([(k, obj(k))]) for k in keys))
            assert sum(stored) == 8
            assert await c.lookup(keys) == 8
            blobs = await c.get(keys + [b"\xee" * 16])
            assert all(b is not None for b in blobs[:8]) and blobs[8] is None
            assert await c.tool_started("agent", "search", keys, ago_s=1.0) == 29.0  # the default 30 s, 1 s gone
            assert await c.tool_finished("agent") >= 1.0
            assert await c.delete(keys) == 8
    asyncio.run(run())
