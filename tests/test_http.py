"""The daemon's own HTTP/1.1 server (kvstore.service.http) as a misbehaving client meets it, on
raw sockets against a real daemon: pipelining, keep-alive, refusals before and after a body,
framing it does not accept, stalled and abandoned bodies. After each, the connection or the
daemon goes on serving, and what it stores is exactly what was sent."""

from __future__ import annotations

import json
import socket
import time

import msgpack
import pytest
import torch

from conftest import Daemon
from kvstore import KVSpec
from kvstore.client import DaemonClient, ServiceError
from kvstore.objects import encode_object, join_parts, meta_for
from kvstore.wire import BATCH_CONTENT_TYPE, pack_batch

SPEC = KVSpec(model_id="test/http", num_layers=2, num_kv_heads=2, head_size=8)


def obj(key: bytes, tokens: int) -> bytes:
    kv = torch.randn(SPEC.chunk_shape(tokens)).half()
    return join_parts(encode_object(meta_for(key, SPEC.fingerprint, kv, tokens < 16), kv))


def put_request(key: bytes, blob: bytes, auth: str = "", extra: str = "") -> bytes:
    body = b"".join(pack_batch([(key, blob)]))
    head = (f"POST /v1/put HTTP/1.1\r\nHost: x\r\nContent-Type: {BATCH_CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\n{auth}{extra}\r\n")
    return head.encode() + body


def control(path: str, payload: dict, auth: str = "") -> bytes:
    body = msgpack.packb(payload)
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{auth}\r\n").encode() + body


class Conn:
    """A raw connection that reads answers one at a time (pipelined ones too)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.file.readline()
        if not status_line:
            raise ConnectionError("closed")
        status = int(status_line.split()[1])
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.file.read(int(headers.get("content-length", 0)))
        return status, headers, body

    def closed(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def keyed(tmp_path):
    kf = tmp_path / "keys.yaml"
    kf.write_text("keys:\n  ka: {tenant: a}\n  kadmin: {tenant: ops, admin: true}\n")
    d = Daemon(tmp_path, "--request-timeout-s", "3", "--max-body-bytes", "8MiB", key_file=kf)
    yield d
    d.stop()


AUTH = "Authorization: Bearer ka\r\n"


def test_pipelined_requests_are_answered_in_order_on_one_connection(keyed):
    small, large = b"\x01" * 16, b"\x02" * 16
    blobs = {small: obj(small, 16), large: obj(large, 2048)}  # 64 KiB and up take the arena path
    c = Conn(keyed.port)
    try:
        c.send(put_request(small, blobs[small], AUTH) + put_request(large, blobs[large], AUTH)
               + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + control("/v1/exists", {"keys": [small, large]}, AUTH))
        answers = [c.answer() for _ in range(4)]
        assert [a[0] for a in answers] == [200, 200, 200, 200]
        assert msgpack.unpackb(answers[0][2]) == {"stored": 1} and msgpack.unpackb(answers[1][2]) == {"stored": 1}
        assert answers[2][2] == b"ok" and msgpack.unpackb(answers[3][2]) == {"present": [True, True]}
    finally:
        c.close()
    got = DaemonClient(keyed.url, api_key="ka").get([small, large])
    assert [bytes(g) for g in got] == [blobs[small], blobs[large]]


def test_refusals_before_the_body_leave_the_connection_usable(keyed):
    key = b"\x03" * 16
    blob = obj(key, 2048)
    c = Conn(keyed.port)
    try:
        c.send(put_request(key, blob, "Authorization: Bearer wrong\r\n"))  # the whole body, then the answer
        status, _, body = c.answer()
        assert status == 401 and b"API key" in body
        c.send(b"POST /v1/nothing HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
        assert c.answer()[0] == 404
        c.send(b"GET /v1/put HTTP/1.1\r\n\r\n")
        status, headers, _ = c.answer()
        assert status == 405 and headers["allow"] == "POST"
        c.send(b"POST /v1/put HTTP/1.1\r\nContent-Length: 9000000\r\n" + AUTH.encode() + b"\r\n" + b"z" * 9_000_000)
        status, _, body = c.answer()
        assert status == 413 and b"8388608" in body
        c.send(put_request(key, blob, AUTH))  # the same connection, in step after every refusal
        assert c.answer()[0] == 200
    finally:
        c.close()
    assert bytes(DaemonClient(keyed.url, api_key="ka").get([key])[0]) == blob


def test_expect_100_continue(keyed):
    key = b"\x04" * 16
    blob = obj(key, 2048)
    request = put_request(key, blob, AUTH, "Expect: 100-continue\r\n")
    head, body = request.split(b"\r\n\r\n", 1)
    c = Conn(keyed.port)
    try:
        c.send(head + b"\r\n\r\n")
        assert c.file.readline().startswith(b"HTTP/1.1 100 ") and c.file.readline() == b"\r\n"
        c.send(body)
        assert c.answer()[0] == 200
        c.send(put_request(key, blob, "Authorization: Bearer wrong\r\n", "Expect: 100-continue\r\n").split(b"\r\n\r\n")[0]
               + b"\r\n\r\n")
        assert c.answer()[0] == 401  # the final answer instead of 100: the client need not send the body
    finally:
        c.close()


@pytest.mark.parametrize("raw, status", [
    (b"POST /v1/put HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
    (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\n folded: header\r\n\r\n", 400),
    (b"POST /v1/exists HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    (b"POST /v1/exists HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400),  # '\xb2'.isdigit() is True
    (b"GET /healthz HTTP/1.1\nHost: x\n\n", 400),  # bare LF line ends
])
def test_framing_it_does_not_accept_is_named_and_the_connection_closed(keyed, raw, status):
    c = Conn(keyed.port)
    try:
        c.send(raw)
        got, headers, body = c.answer()
        assert got == status and json.loads(body)["error"] and headers.get("connection") == "close"
        assert c.closed()
    finally:
        c.close()
    assert DaemonClient(keyed.url, api_key="ka").healthy()


def test_a_stalled_body_is_cut_at_the_request_timeout_and_nothing_is_stored(keyed):
    key = b"\x05" * 16
    blob = obj(key, 2048)
    request = put_request(key, blob, AUTH)
    c = Conn(keyed.port)
    try:
        c.send(request[:len(request) // 2])
        t0 = time.monotonic()
        status, _, body = c.answer()
        assert status == 408 and b"not received within 3.0s" in body and time.monotonic() - t0 < 10
        assert c.closed()
    finally:
        c.close()
    client = DaemonClient(keyed.url, api_key="ka")
    assert client.exists([key]) == [False]
    assert client.put([(key, blob)]) == 1 and bytes(client.get([key])[0]) == blob


def test_a_client_gone_mid_body_leaves_nothing_half_stored(keyed):
    key = b"\x06" * 16
    blob = obj(key, 4096)
    request = put_request(key, blob, AUTH)
    for cut in (len(request) // 3, len(request) - 1):
        c = Conn(keyed.port)
        c.send(request[:cut])
        c.close()
    client = DaemonClient(keyed.url, api_key="ka")
    time.sleep(0.2)
    assert client.exists([key]) == [False]
    assert client.put([(key, blob)]) == 1 and bytes(client.get([key])[0]) == blob
    with pytest.raises(ServiceError) as err:  # a body that does not match its own batch header
        bad = bytearray(put_request(key, blob, AUTH))
        bad[-5] ^= 0xFF
        c = Conn(keyed.port)
        try:
            c.send(bytes(bad))
            status, _, body = c.answer()
            raise ServiceError(status, body.decode())
        finally:
            c.close()
    assert err.value.status == 400 and "checksum" in err.value.message
    assert bytes(client.get([key])[0]) == blob


def test_http_10_closes_after_the_answer_and_idle_head_is_cut(keyed):
    c = Conn(keyed.port)
    try:
        c.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert c.answer()[:1] == (200,) and c.closed()
    finally:
        c.close()


def test_stalled_uploads_cannot_evict_much_of_the_cache(tmp_path):
    """20 clients each announce a 4 MiB body, send half and stall (80 MiB, more than the whole
    64 MiB memory tier). Bodies in flight may hold an eighth of the tier, so most of the 24
    objects (48 MiB) stored before stay cached; a real put waits for room and lands once the
    request timeout has cut the stalled ones."""
    d = Daemon(tmp_path, "--no-disk", "--cpu-capacity", "64MiB", "--request-timeout-s", "4")
    try:
        client = DaemonClient(d.url)
        blobs = {bytes([i]) * 16: obj(bytes([i]) * 16, 16384) for i in range(1, 25)}  # 2 MiB each
        assert sum(client.put([item]) for item in blobs.items()) == 24  # a region each
        stalled = []
        for i in range(20):
            key = bytes([100 + i]) * 16
            request = put_request(key, obj(key, 32768))  # 4 MiB
            c = Conn(d.port)
            c.send(request[:len(request) // 2])
            stalled.append(c)
        time.sleep(1.0)
        assert sum(client.exists(list(blobs))) >= 18
        late = b"\x77" * 16
        late_blob = obj(late, 16384)
        assert client.put([(late, late_blob)]) == 1  # waited for room, then stored
        assert bytes(client.get([late])[0]) == late_blob
        for got, blob in zip(client.get(list(blobs)), blobs.values()):
            assert got is None or bytes(got) == blob
        assert [c.answer()[0] for c in stalled] == [408] * 20
        text = bytes(client.request("GET", "/metrics")[2]).decode()
        waits = next(float(line.split()[1]) for line in text.splitlines() if line.startswith("kvstore_body_waits_total"))
        assert waits >= 18 and 'code="408",route="/v1/put"} 20.0' in text  # all but the first or two waited
        for c in stalled:
            c.close()
    finally:
        d.stop()


def test_head_http10_keepalive_and_a_flood_of_blank_lines(keyed):
    c = Conn(keyed.port)
    try:
        c.send(b"HEAD /healthz HTTP/1.1\r\n\r\n")
        status_line = c.file.readline()
        headers = {}
        while (line := c.file.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert b" 200 " in status_line and headers["content-length"] == "2"  # the GET's length, no body
        c.send(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = c.answer()
        assert (status, body, headers.get("connection")) == (200, b"ok", "keep-alive")
        c.send(b"\r\n" * 500_000 + b"GET /readyz HTTP/1.1\r\n\r\n")  # 1 MB of blank lines, then a request
        assert c.answer()[2] == b"ready"
    finally:
        c.close()


def test_a_refused_expect_100_continue_closes_rather_than_waiting_for_a_body(keyed):
    c = Conn(keyed.port)
    try:
        c.send(b"POST /v1/put HTTP/1.1\r\nExpect: 100-continue\r\nAuthorization: Bearer bad\r\n"
               b"Content-Length: 1048761\r\n\r\n")
        status, headers, _ = c.answer()
        assert status == 401 and headers.get("connection") == "close" and c.closed()
    finally:
        c.close()


def test_a_client_that_never_reads_its_answer_is_cut_at_the_request_timeout(keyed):
    client = DaemonClient(keyed.url, api_key="ka")
    keys = [b"\x08" * 16, b"\x09" * 16]
    for key in keys:
        client.put([(key, obj(key, 32768))])  # 4 MiB each, more than the socket buffers hold
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", keyed.port))
    try:
        s.sendall(control("/v1/get", {"keys": keys}, AUTH))
        deadline = time.monotonic() + 20
        text = ""
        while 'code="499",route="/v1/get"} 1.0' not in text and time.monotonic() < deadline:
            time.sleep(0.5)
            text = bytes(DaemonClient(keyed.url, api_key="kadmin").request("GET", "/metrics")[2]).decode()
        assert 'code="499",route="/v1/get"} 1.0' in text  # cut (3 s timeout), the answer's memory freed
    finally:
        s.close()
    assert all(got is not None for got in client.get(keys))


def test_a_body_past_the_tenants_quota_is_refused_before_it_takes_memory(tmp_path):
    kf = tmp_path / "keys.yaml"
    kf.write_text("keys:\n  ka: {tenant: a}\n  kb: {tenant: b}\ntenants:\n  a: {quota: 1MiB}\n")
    d = Daemon(tmp_path, "--no-disk", "--cpu-capacity", "64MiB", key_file=kf)
    try:
        b = DaemonClient(d.url, api_key="kb")
        blobs = {bytes([i]) * 16: obj(bytes([i]) * 16, 65536) for i in range(1, 8)}  # 7 x 8 MiB
        assert sum(b.put([item]) for item in blobs.items()) == 7
        c = Conn(d.port)
        try:
            c.send(b"POST /v1/put HTTP/1.1\r\nAuthorization: Bearer ka\r\nContent-Length: 33554432\r\n\r\nx")
            status, _, body = c.answer()
            assert status == 403 and b"quota" in body
        finally:
            c.close()
        assert [bytes(g) for g in b.get(list(blobs))] == list(blobs.values())
    finally:
        d.stop()


def test_sigterm_does_not_wait_for_a_body_that_never_comes(tmp_path):
    d = Daemon(tmp_path)
    c = Conn(d.port)
    c.send(b"POST /v1/put HTTP/1.1\r\nContent-Length: 100000\r\n\r\nx")
    time.sleep(0.3)
    t0 = time.monotonic()
    try:
        assert d.stop() == 0 and time.monotonic() - t0 < 10  # it had waited its whole 30 s drain
    finally:
        c.close()
    assert "kvstore daemon stopped" in (tmp_path / "daemon.log").read_text()


def test_past_the_descriptor_limit_connections_are_closed_with_one_warning(tmp_path):
    """With 300 file descriptors (hard limit) the daemon holds 300 - 256 = 44 connections and
    closes the rest at once, saying so once; it never runs out of descriptors (asyncio's accept
    loop then logged a traceback per attempt, thousands a second) and serves again after."""
    import resource
    import subprocess
    import sys
    import urllib.request

    from conftest import free_port

    port = free_port()
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", "serve", "--port", str(port), "--no-disk"],
                            stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)))
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(80)]
        time.sleep(1.0)
        closed = 0
        for c in conns:
            c.setblocking(False)
            try:
                closed += c.recv(1) == b""
            except BlockingIOError:  # open, waiting for a request
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 30
        for c in conns:
            c.close()
        time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.read() == b"ok"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    text = (tmp_path / "daemon.log").read_text()
    assert text.count("connections open (max_connections)") == 1 and "Traceback" not in text


@pytest.fixture
def tenants(tmp_path):
    kf = tmp_path / "keys.yaml"
    kf.write_text("keys:\n  ka: {tenant: a}\n  kb: {tenant: b}\n  kadmin: {tenant: ops, admin: true}\n"
                  "tenants:\n  a: {quota: 16MiB}\n")
    d = Daemon(tmp_path, "--no-disk", "--cpu-capacity", "64MiB", "--request-timeout-s", "3", key_file=kf)
    yield d
    d.stop()


def metric(d: Daemon, name: str) -> float:
    text = bytes(DaemonClient(d.url, api_key="kadmin").request("GET", "/metrics")[2]).decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def announce(length: int, key: str = "kb", extra: str = "") -> bytes:
    return f"POST /v1/put HTTP/1.1\r\nContent-Length: {length}\r\nAuthorization: Bearer {key}\r\n{extra}\r\n".encode()


def test_uploads_cut_while_waiting_for_room_leave_no_reservation_behind(tenants):
    """One stalled body holds 6 of the 8 MiB that bodies in flight may take, eight more wait
    for room and stall too; all are cut at the timeout. A later 6 MiB put goes through at once:
    nothing they reserved was left behind (a wake-up racing the 408 once leaked it for good)."""
    socks = [socket.create_connection(("127.0.0.1", tenants.port)) for _ in range(9)]
    socks[0].sendall(announce(6 << 20) + b"\0")
    for s in socks[1:]:
        s.sendall(announce(1 << 20) + b"\0")
    time.sleep(4)
    for s in socks:
        s.close()
    time.sleep(0.5)
    waits = metric(tenants, "kvstore_body_waits_total")
    key = b"\x07" * 16
    blob = obj(key, 49152)  # 6 MiB
    client = DaemonClient(tenants.url, api_key="kb", retries=0)
    assert client.put([(key, blob)]) == 1 and bytes(client.get([key])[0]) == blob
    assert metric(tenants, "kvstore_body_waits_total") == waits  # it did not wait
    assert "Task exception was never retrieved" not in (tenants.workdir / "daemon.log").read_text()


def test_bodies_with_a_bad_batch_header_give_their_memory_back(tenants):
    client = DaemonClient(tenants.url, api_key="kb")
    blobs = {bytes([i]) * 16: obj(bytes([i]) * 16, 16384) for i in range(1, 25)}  # 24 x 2 MiB of 64 MiB
    assert sum(client.put([item]) for item in blobs.items()) == 24
    c = Conn(tenants.port)
    try:
        for _ in range(20):  # 80 MiB of bodies, each refused once it has all arrived
            c.send(announce(4 << 20) + b"\xc1" * (4 << 20))
            status, _, body = c.answer()
            assert status == 400 and b"batch header" in body
    finally:
        c.close()
    assert client.exists(list(blobs)) == [True] * 24  # their regions were reused, not the cache's


def test_control_bodies_are_bounded_and_one_tenants_stall_does_not_hold_back_another(tenants):
    c = Conn(tenants.port)
    try:
        c.send(b"POST /v1/exists HTTP/1.1\r\nAuthorization: Bearer kb\r\nContent-Length: 1000000000\r\n\r\n{")
        status, _, body = c.answer()
        assert status == 413 and b"limit of 327680 bytes" in body  # 64 KiB + 64 B x 4096 keys
    finally:
        c.close()
    stalled = socket.create_connection(("127.0.0.1", tenants.port))
    try:
        stalled.sendall(announce(8 << 20, "ka") + b"\0")  # tenant a holds all that bodies in flight may
        time.sleep(0.3)
        key = b"\x0b" * 16
        blob = obj(key, 8192)  # 1 MiB
        assert DaemonClient(tenants.url, api_key="kb").put([(key, blob)]) == 1
        assert metric(tenants, "kvstore_body_waits_total") == 0  # b's body did not wait for a's
    finally:
        stalled.close()


def test_a_body_past_the_quota_is_refused_before_100_continue(tenants):
    c = Conn(tenants.port)
    try:
        c.send(announce(40 << 20, "ka", "Expect: 100-continue\r\n"))
        status, headers, body = c.answer()
        assert status == 403 and b"quota" in body and headers.get("connection") == "close"
    finally:
        c.close()


def test_a_refusal_reaches_a_client_that_sent_its_body_anyway(tenants):
    """The daemon closes after refusing an Expect: 100-continue request; the client had sent the
    body at once, and a GET behind it. Closing with those bytes unread would make the kernel
    send a reset, which can destroy the answer before the client reads it: it must read 401."""
    body = b"\0" * 262144
    c = Conn(tenants.port)
    try:
        c.send(announce(len(body), "wrong", "Expect: 100-continue\r\n") + body + b"GET /healthz HTTP/1.1\r\n\r\n")
        time.sleep(0.5)
        assert c.answer()[0] == 401
    finally:
        c.close()


def test_a_slow_but_steady_reader_gets_its_whole_answer(tenants):
    """The request timeout (3 s) is for a client that stops reading, not for a long answer."""
    client = DaemonClient(tenants.url, api_key="kb")
    keys = [bytes([40 + i]) * 16 for i in range(8)]
    for key in keys:
        client.put([(key, obj(key, 16384))])  # 8 x 2 MiB
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.connect(("127.0.0.1", tenants.port))
    try:
        s.sendall(control("/v1/get", {"keys": keys}, "Authorization: Bearer kb\r\n"))
        got, t0 = 0, time.monotonic()
        while True:
            data = s.recv(65536)
            if not data:
                break
            got += len(data)
            if got >= 16 * 2**20:
                break
            time.sleep(0.015)  # about 4 MiB/s: the whole answer takes 4-5 s
        assert got >= 16 * 2**20 and time.monotonic() - t0 > 3
    finally:
        s.close()


def test_sigterm_does_not_wait_for_a_client_that_stopped_reading(tmp_path):
    d = Daemon(tmp_path, "--no-disk")
    client = DaemonClient(d.url)
    keys = [bytes([60 + i]) * 16 for i in range(8)]
    for key in keys:
        client.put([(key, obj(key, 16384))])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", d.port))
    try:
        s.sendall(control("/v1/get", {"keys": keys}))
        time.sleep(1.5)
        t0 = time.monotonic()
        assert d.stop() == 0 and time.monotonic() - t0 < 8  # it had waited its whole 20 s drain
    finally:
        s.close()
