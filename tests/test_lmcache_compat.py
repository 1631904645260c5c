"""The daemon's LMCache lm:// listener at the socket level: every command and the bad inputs."""

import http.client
import socket
import struct
import time

import pytest

from conftest import Daemon, free_port

REQ = struct.Struct("<iiiiiiiii150s")
REP = struct.Struct("<iiiiiiiii")
PUT, GET, EXIST, LIST, HEALTH = 1, 2, 3, 4, 5
KEY = "tiny-llama@1@0@5f3a9c@bfloat16"


def header(cmd, length=0, key=KEY, fmt=1, dtype=3, shape=(2, 4, 16, 8)):
    return REQ.pack(cmd, length, fmt, dtype, 1, *shape, key.encode().ljust(150))


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            return buf
        buf += part
    return buf


@pytest.fixture
def lm(tmp_path):
    port = free_port()
    d = Daemon(tmp_path, "--lmcache-port", str(port), "--max-body-bytes", "64MiB")
    d.lm_port = port
    yield d
    if d.proc is not None:
        d.stop()


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def test_every_command(lm):
    s = connect(lm.lm_port)
    s.sendall(header(HEALTH))
    assert REP.unpack(recv_exact(s, 36))[0] == 200
    s.sendall(header(EXIST))
    assert REP.unpack(recv_exact(s, 36))[0] == 400
    s.sendall(header(GET))
    code, length, *_ = REP.unpack(recv_exact(s, 36))
    assert (code, length) == (400, 0)
    payload = bytes(range(256)) * 40
    s.sendall(header(PUT, len(payload)) + payload)  # no reply to PUT
    s.sendall(header(EXIST))
    assert REP.unpack(recv_exact(s, 36))[0] == 200
    s.sendall(header(GET))
    code, length, fmt, dtype, s0, s1, s2, s3, _loc = REP.unpack(recv_exact(s, 36))
    assert (code, length, fmt, dtype, (s0, s1, s2, s3)) == (200, len(payload), 1, 3, (2, 4, 16, 8))
    assert recv_exact(s, length) == payload
    s.close()


def test_large_get_reaches_a_slow_reader_whole(lm):
    """A GET reply far larger than the socket buffers (header and payload go out as one gathered
    send, resumed after every partial write) arrives byte-exact to a reader that takes it in
    small pieces, and the connection's framing still holds for the next command."""
    s = connect(lm.lm_port)
    payload = bytes(range(251)) * (24 * 1024 * 1024 // 251)  # not a multiple of any buffer size
    s.sendall(header(PUT, len(payload)) + payload)
    s.sendall(header(GET))
    time.sleep(0.2)  # let the server fill the socket buffers and block mid-payload
    code, length, *_ = REP.unpack(recv_exact(s, 36))
    assert (code, length) == (200, len(payload))
    got = bytearray()
    while len(got) < length:
        got += s.recv(min(65536, length - len(got)))
    assert got == payload
    s.sendall(header(HEALTH))
    assert REP.unpack(recv_exact(s, 36))[0] == 200
    s.close()


@pytest.mark.parametrize("bad", [
    header(99),                                      # unknown command
    header(GET, key="no-at-signs"),                  # unparsable key
    header(PUT, 2**31 - 1),                          # oversized length (limit: --max-body-bytes 64MiB)
    header(PUT, -5),                                 # negative length
    header(LIST),                                    # LIST is not implemented (as in LMCache)
    REQ.pack(GET, 0, 1, 3, 1, 0, 0, 0, 0, b"\xff" * 150),  # non-ASCII key
])
def test_bad_input_closes_only_that_connection(lm, bad):
    good = connect(lm.lm_port)
    victim = connect(lm.lm_port)
    victim.sendall(bad)
    assert victim.recv(64) == b""  # closed by the server
    good.sendall(header(HEALTH))
    assert REP.unpack(recv_exact(good, 36))[0] == 200


def test_disconnect_mid_payload_stores_nothing(lm):
    s = connect(lm.lm_port)
    s.sendall(header(PUT, 100_000, key="m@1@0@cut@half") + b"x" * 5000)
    s.close()
    t = connect(lm.lm_port)
    t.sendall(header(EXIST, key="m@1@0@cut@half"))
    assert REP.unpack(recv_exact(t, 36))[0] == 400
    # The server notices the disconnect on its own connection thread: wait for the counter.
    deadline = time.monotonic() + 10
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", lm.port)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        if 'kvstore_lmcache_requests_total{what="bad_request"} 1.0' in text:
            break
        assert time.monotonic() < deadline, "disconnect mid-payload was never counted"
        time.sleep(0.05)


def test_objects_survive_a_daemon_restart(lm):
    s = connect(lm.lm_port)
    s.sendall(header(PUT, 6) + b"abcdef")
    s.sendall(header(HEALTH))  # the listener handles requests in order: PUT is stored when this answers
    recv_exact(s, 36)
    s.close()
    assert lm.stop() == 0
    lm.start()
    s = connect(lm.lm_port)
    s.sendall(header(GET))
    code, length, *_ = REP.unpack(recv_exact(s, 36))
    assert code == 200 and recv_exact(s, length) == b"abcdef"


def test_preallocated_daemon_evicts_and_serves_exact_bytes(tmp_path):
    """--cpu-prealloc: objects are received into the pre-faulted arena; 12 x 1 MiB through a
    4 MiB budget evicts (to disk) and every GET still returns exactly what was PUT. The burst
    outruns the disk writer, whose queued objects still hold their arena regions: those puts get
    fresh memory instead (counted), never a region someone still reads."""
    port = free_port()
    d = Daemon(tmp_path, "--lmcache-port", str(port), "--cpu-capacity", "4MiB", "--cpu-prealloc")
    try:
        s = connect(port)
        payloads = {f"m@1@0@{i:x}@bfloat16": bytes([i]) * (1 << 20) for i in range(12)}
        for key, payload in payloads.items():
            s.sendall(header(PUT, len(payload), key=key) + payload)
        for key, payload in payloads.items():
            for _ in range(100):  # the disk tier is written in the background
                s.sendall(header(EXIST, key=key))
                if REP.unpack(recv_exact(s, 36))[0] == 200:
                    break
                time.sleep(0.05)
            s.sendall(header(GET, key=key))
            code, length, *_ = REP.unpack(recv_exact(s, 36))
            assert code == 200 and recv_exact(s, length) == payload
        s.close()
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        conn.request("GET", "/metrics")
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in conn.getresponse().read().decode().splitlines()
                  if line.startswith("kvstore_tier_") and 'tier="cpu"' in line}
        assert values['kvstore_tier_evictions_total{tier="cpu"}'] >= 8
        # Each object is 1 MiB plus its header, so the first 3 always fit the 4 MiB arena; whether a
        # later put reuses an evicted region depends on how far the disk writer has got. A GET of
        # an evicted object promotes it back only into a free region too (else it would be kept
        # beside the arena): each of the 12 may miss as well.
        assert values['kvstore_tier_arena_misses_total{tier="cpu"}'] <= 9 + 12
    finally:
        d.stop()
