"""The daemon's PUT body check as chunks arrive (service.intake) against the whole-body check
(BlobStore.verify): same verdict, same objects, whatever the chunk boundaries."""

import random

import pytest
import torch

from kvstore import KVSpec
from kvstore.blobstore import BlobStore
from kvstore.client import DaemonClient, ServiceError
from kvstore.errors import InvalidInputError
from kvstore.objects import encode_object, join_parts, meta_for
from kvstore.service.intake import BodyIntake
from kvstore.wire import WireError, pack_batch

SPEC = KVSpec(model_id="test/intake", num_layers=2, num_kv_heads=2, head_size=16)


def obj(key: bytes, tokens: int) -> bytes:
    kv = torch.randn(SPEC.chunk_shape(tokens)).half()
    return join_parts(encode_object(meta_for(key, SPEC.fingerprint, kv, False), kv))


def fed(body: bytes, seed: int) -> BodyIntake:
    """An intake fed ``body`` in random chunks (1 byte up to a few KiB), as a socket would."""
    rng = random.Random(seed)
    buf = memoryview(bytearray(len(body)))
    intake = BodyIntake(buf, max_keys=64)
    got = 0
    while got < len(body):
        n = min(len(body) - got, rng.choice([1, 7, 100, 4096, 65536]))
        buf[got:got + n] = body[got:got + n]
        got += n
        intake.feed(got)
    return intake


@pytest.mark.parametrize("seed", range(6))
def test_chunked_check_matches_the_whole_body_check(seed):
    keys = [bytes([i]) * 16 for i in range(1, 4)]
    objects = [obj(k, t) for k, t in zip(keys, (16, 1, 40))]
    body = b"".join(pack_batch(list(zip(keys, objects))))
    got = fed(body, seed).finish()
    assert [k for k, _, _ in got] == keys
    for (key, view, meta), whole in zip(got, objects):
        assert bytes(view) == whole
        assert meta == BlobStore.verify(whole, key)


@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_damaged_object_is_named_and_fails_the_batch(where):
    keys = [bytes([i]) * 16 for i in range(1, 4)]
    objects = [bytearray(obj(k, 16)) for k in keys]
    objects[1][-5 if where == "payload" else 20] ^= 0x10
    body = b"".join(pack_batch([(k, bytes(o)) for k, o in zip(keys, objects)]))
    for seed in range(3):
        with pytest.raises(InvalidInputError, match=keys[1].hex()):
            fed(body, seed).finish()
        with pytest.raises(InvalidInputError):  # the whole-body check agrees
            BlobStore.verify(bytes(objects[1]), keys[1])


def test_layout_errors():
    k = b"\x01" * 16
    good = obj(k, 4)
    body = b"".join(pack_batch([(k, good)]))
    with pytest.raises(WireError, match="1 trailing bytes"):  # one byte more than the sizes say
        fed(body + b"x", 0).finish()
    with pytest.raises(WireError):  # the header says more than the body holds
        fed(body[:-1], 0).finish()
    with pytest.raises(WireError, match="no object"):
        fed(b"".join(pack_batch([(k, None)])), 0).finish()
    with pytest.raises(WireError):
        fed(b"\xff\xff\x00\x00garbage", 0).finish()
    with pytest.raises(InvalidInputError, match="was sent for"):  # an object under another key
        fed(b"".join(pack_batch([(b"\x02" * 16, good)])), 0).finish()


def test_a_large_batch_with_one_bad_object_stores_nothing(daemon):
    """Bodies from 64 KiB up take the streaming path in the daemon: a bad second object is a 400
    naming it, nothing of the batch is stored, and the connection serves the next request."""
    keys = [bytes([i]) * 16 for i in range(5, 8)]
    objects = [bytearray(obj(k, 256)) for k in keys]  # 32 KiB each: a body of about 96 KiB
    objects[1][-1] ^= 1
    client = DaemonClient(daemon.url)
    with pytest.raises(ServiceError, match=keys[1].hex()) as err:
        client.put([(k, bytes(o)) for k, o in zip(keys, objects)])
    assert err.value.status == 400
    assert client.exists(keys) == [False, False, False]
    objects[1][-1] ^= 1
    assert client.put([(k, bytes(o)) for k, o in zip(keys, objects)]) == 3
    assert [bytes(b) for b in client.get(keys)] == [bytes(o) for o in objects]


def _metric(port: int, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_rejected_body_frees_its_memory_at_once(tmp_path):
    """A 400 must not keep the body's arena region alive (the error's traceback held it until
    the garbage collector ran): later good puts then waited a second each for memory."""
    from conftest import Daemon

    d = Daemon(tmp_path, "--cpu-capacity", "8MiB", "--no-disk")
    try:
        client = DaemonClient(d.url)
        keys = [bytes([i]) * 16 for i in range(20, 28)]
        good = [obj(k, 3000) for k in keys]  # about 750 KiB each
        for k, o in zip(keys[:4], good):
            bad = bytearray(o)
            bad[-7] ^= 4
            with pytest.raises(ServiceError, match="checksum"):
                client.put([(k, bytes(bad))])
            with pytest.raises(ServiceError):  # a bad object first in a batch with a good one
                client.put([(k, bytes(bad)), (keys[6], good[6])])
        for k, o in zip(keys, good):
            assert client.put([(k, o)]) == 1
        assert _metric(d.port, "kvstore_arena_waits_total") == 0
        assert _metric(d.port, 'kvstore_tier_arena_misses_total') == 0
    finally:
        d.stop()


def test_clients_that_hang_up_are_not_server_errors(tmp_path):
    """A GET reader that closes mid-response and an upload cut short are the client's doing:
    no 500, no 'unhandled error' in the log, nothing of the cut batch stored."""
    import socket

    from conftest import Daemon
    from kvstore.wire import pack_control

    d = Daemon(tmp_path, "--no-disk")
    try:
        client = DaemonClient(d.url)
        keys = [bytes([i]) * 16 for i in range(30, 32)]
        objects = [obj(k, 8192) for k in keys]  # 2 MiB each
        assert client.put(list(zip(keys, objects))) == 2
        for _ in range(3):
            body = pack_control({"keys": keys})
            s = socket.create_connection(("127.0.0.1", d.port))
            s.sendall(b"POST /v1/get HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            s.recv(1000)
            s.close()
        cut = b"".join(pack_batch([(b"\x09" * 16, obj(b"\x09" * 16, 8192))]))
        for upto in (10, 600_000):
            s = socket.create_connection(("127.0.0.1", d.port))
            s.sendall(b"POST /v1/put HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-kvstore-batch\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(cut) + cut[:upto])
            s.close()
        import time

        time.sleep(1)
        assert client.exists([b"\x09" * 16]) == [False]
        assert [bytes(b) for b in client.get(keys)] == objects  # still served
        assert _metric(d.port, 'kvstore_requests_total{code="500"') == 0
    finally:
        d.stop()
    assert "unhandled error" not in (tmp_path / "daemon.log").read_text()


def test_announced_bodies_hold_memory_only_as_they_arrive(tmp_path):
    """Connections that announce large bodies and send a few bytes: the daemon's RSS grows by
    what arrived, not by what was announced (the helper's 300 MiB Content-Length probe)."""
    import socket
    import time

    from conftest import Daemon

    def rss(pid: int) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    d = Daemon(tmp_path, "--cpu-capacity", "8MiB", "--no-disk")
    socks = []
    try:
        before = rss(d.proc.pid)
        for length in [300 << 20] + [4 << 20] * 12:  # one larger than the tier, twelve that fit it
            s = socket.create_connection(("127.0.0.1", d.port))
            s.sendall(b"POST /v1/put HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-kvstore-batch\r\n"
                      b"Content-Length: %d\r\n\r\n" % length + b"\x10\x00\x00\x00")
            socks.append(s)
        time.sleep(2.5)  # past the arena wait, so the waiting bodies have taken their fallback memory
        grown = rss(d.proc.pid) - before
        assert grown < 24 << 20, f"RSS grew {grown >> 20} MiB for 13 bodies of 4 bytes each"
    finally:
        for s in socks:
            s.close()
        d.stop()
