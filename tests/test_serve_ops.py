"""`kvstore serve` as an operator meets it (#16): what it says at start and stop, the mistakes it
refuses in one line, tenant privacy on /v1/stats and /metrics, usage that survives a restart,
metrics in Prometheus's conventions. Every test runs the real CLI as a subprocess."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import Daemon, free_port
from kvstore import KVSpec
from kvstore.client import DaemonClient, DaemonUnreachable, ServiceError
from kvstore.objects import encode_object, join_parts, meta_for

SPEC = KVSpec(model_id="test/ops", num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float16)


def obj(key: bytes, tokens: int = 16) -> bytes:
    kv = torch.randn(SPEC.chunk_shape(tokens)).half()
    return join_parts(encode_object(meta_for(key, SPEC.fingerprint, kv, False), kv))


def serve(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `kvstore serve` expecting it to exit on its own (an error)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.run([sys.executable, "-m", "kvstore", "serve", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("kvstore: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_start_and_stop_are_each_one_info_line(tmp_path):
    d = Daemon(tmp_path, "--disk-capacity", "64MiB")
    code = d.stop(signal.SIGTERM)
    log = (tmp_path / "daemon.log").read_text()
    assert code == 0
    started = [ln for ln in log.splitlines() if "kvstore daemon serving" in ln]
    assert len(started) == 1, log
    assert f"http://127.0.0.1:{d.port}" in started[0] and "cpu 256.0 MiB" in started[0]
    assert f"disk 64.0 MiB at {tmp_path / 'disk'}, codec raw" in started[0] and "auth: open" in started[0]
    assert sum("kvstore daemon stopped after" in ln for ln in log.splitlines()) == 1, log


def test_operator_mistakes_are_one_line_errors(tmp_path):
    one_line_error(serve("--port", "99999", "--no-disk"), "serve.port must be in 1..65535, got 99999")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line_error(serve("--disk-path", str(blocker / "cache")), "tiers.disk.path", "cannot write there")
    one_line_error(serve("--no-disk", env={"KVSTORE_SERVE_PROT": "1"}),
                   "unknown environment variable KVSTORE_SERVE_PROT", "did you mean KVSTORE_SERVE_PORT?")
    one_line_error(serve("--host", "0.0.0.0", "--no-disk"), "--host 0.0.0.0 without --key-file", "--insecure")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(serve("--port", str(port), "--no-disk"), f"cannot listen on 127.0.0.1:{port}",
                       "in use")


def test_doubtful_budgets_are_warned_of_at_start(tmp_path):
    d = Daemon(tmp_path, "--cpu-capacity", "10", "--disk-capacity", "1PiB")
    d.stop()
    log = (tmp_path / "daemon.log").read_text()
    assert "tiers.cpu.capacity is 10 B: too small for any KV object" in log
    assert "tiers.disk.capacity 1.0 PiB exceeds the" in log and f"free at {tmp_path / 'disk'}:" in log


def test_an_unknown_path_is_404_without_a_key(tmp_path):
    kf = tmp_path / "keys.yaml"
    kf.write_text("keys:\n  k: {tenant: a}\n")
    d = Daemon(tmp_path, key_file=kf)
    try:
        for path in ("/", "/v2/nothing"):
            conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
            conn.request("GET", path)
            assert conn.getresponse().status == 404
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
        conn.request("GET", "/v1/stats")
        assert conn.getresponse().status == 401
    finally:
        d.stop()


def test_a_client_of_a_daemon_that_is_down_names_its_url():
    port = free_port()
    with pytest.raises(DaemonUnreachable, match=f"cannot reach the kvstore daemon at kvstore://127.0.0.1:{port}"):
        DaemonClient(f"kvstore://127.0.0.1:{port}", retries=0).stats()


def test_kvstore_config_hides_secrets(tmp_path):
    env = {"KVSTORE_REMOTE_URL": "kvstore://h:1", "KVSTORE_REMOTE_API_KEY": "sk-secret-1",
           "KVSTORE_REDIS_URL": "redis://:hunter2@h:6379/0"}
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    r = subprocess.run([sys.executable, "-m", "kvstore", "config", "--disk-path", str(tmp_path)],
                       capture_output=True, text=True, env={**base, **env})
    assert r.returncode == 0, r.stderr
    assert "sk-secret-1" not in r.stdout and "hunter2" not in r.stdout and "<redacted>" in r.stdout


@pytest.fixture
def tenants(tmp_path):
    kf = tmp_path / "keys.yaml"
    kf.write_text("keys:\n  kg: {tenant: gamma}\n  kd: {tenant: delta}\n  kadmin: {tenant: ops, admin: true}\n"
                  "tenants:\n  gamma: {quota: 8000}\n")
    metrics_port = free_port()
    d = Daemon(tmp_path, "--metrics-port", str(metrics_port), key_file=kf)
    d.metrics_port = metrics_port
    yield d
    d.stop()


def _get(port: int, path: str, key: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


def test_a_tenant_sees_only_its_own_usage(tenants):
    gamma, delta, admin = (DaemonClient(tenants.url, api_key=k) for k in ("kg", "kd", "kadmin"))
    delta.put([(b"\x01" * 16, obj(b"\x01" * 16))])
    before = delta.stats()
    assert gamma.put([(bytes([i]) * 16, obj(bytes([i]) * 16)) for i in range(3)]) == 3
    gamma.get([b"\x00" * 16])
    after = delta.stats()
    assert after == before and set(after) == {"tenant", "bytes", "objects", "tenants", "sessions"}
    assert after["sessions"] == {}  # its own agent sessions only: none
    assert after["tenant"] == "delta" and after["objects"] == 1 and set(after["tenants"]) == {"delta"}
    mine = gamma.stats()
    assert mine["objects"] == 3 and mine["quota"] == 8000 and "tiers" not in mine
    everything = admin.stats()
    assert everything["tenants"]["gamma"]["objects"] == 3 and everything["tenants"]["delta"]["objects"] == 1
    assert everything["tiers"]["cpu"]["objects"] == 4
    # /metrics lists every tenant: the operator's, never a tenant's.
    assert _get(tenants.port, "/metrics")[0] == 401
    assert _get(tenants.port, "/metrics", "kg")[0] == 403
    status, text = _get(tenants.port, "/metrics", "kadmin")
    assert status == 200 and 'kvstore_tenant_bytes{tenant="gamma"}' in text
    status, text = _get(tenants.metrics_port, "/metrics")  # the loopback scrape listener needs no key
    assert status == 200 and 'kvstore_tenant_objects{tenant="gamma"} 3.0' in text
    assert _get(tenants.metrics_port, "/v1/stats")[0] == 404  # and serves nothing else


def test_tenant_usage_and_quota_survive_a_restart(tenants):
    gamma = DaemonClient(tenants.url, api_key="kg")
    objs = [(bytes([i]) * 16, obj(bytes([i]) * 16)) for i in range(3)]
    assert gamma.put(objs) == 3
    held = gamma.stats()["bytes"]
    assert tenants.stop() == 0
    tenants.start()
    gamma = DaemonClient(tenants.url, api_key="kg")
    assert gamma.stats()["bytes"] == held and gamma.stats()["objects"] == 3
    with pytest.raises(ServiceError) as e:  # the quota still counts what was stored before
        gamma.put([(bytes([i]) * 16, obj(bytes([i]) * 16)) for i in range(10, 13)])
    assert e.value.status == 403
    gamma.delete([objs[0][0]])
    assert tenants.stop() == 0
    tenants.start()
    assert DaemonClient(tenants.url, api_key="kg").stats()["objects"] == 2


def scrape_after_traffic(tmp_path) -> str:
    """/metrics of a live daemon after one put, one get and an agent's paused session."""
    d = Daemon(tmp_path)
    try:
        c = DaemonClient(d.url)
        c.put([(b"\x02" * 16, obj(b"\x02" * 16))])
        c.get([b"\x02" * 16])
        c.tool_started("agent-1", "search", [b"\x02" * 16])
        return _get(d.port, "/metrics")[1]
    finally:
        d.stop()


def test_metrics_follow_prometheus_conventions(tmp_path):
    text = scrape_after_traffic(tmp_path)
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
    for counter in ("kvstore_tier_hits", "kvstore_tier_evictions", "kvstore_tier_corrupt", "kvstore_requests",
                    "kvstore_tier_load_seconds", "kvstore_received_bytes", "kvstore_agent_tool_calls"):
        assert types[f"{counter}_total"] == "counter", counter
    assert not any(name.endswith("_created") for name in types)  # no per-series creation-time gauges
    assert 'kvstore_tier_hits_total{tier="cpu"} 1.0' in text
    for gauge in ("kvstore_tier_objects", "kvstore_tier_bytes", "kvstore_tenant_bytes"):
        assert types[gauge] == "gauge", gauge
    assert types["kvstore_object_bytes"] == types["kvstore_request_seconds"] == "histogram"
    assert 'kvstore_object_bytes_count{op="put"} 1.0' in text and 'kvstore_object_bytes_count{op="get"} 1.0' in text


def admin(url: str, *args: str, key: str | None = None, **kw) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env = {**base, "KVSTORE_ADMIN_URL": url, **({"KVSTORE_ADMIN_KEY": key} if key else {}), **kw.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "kvstore", "admin", *args], capture_output=True, text=True,
                          env=env, timeout=60, **kw)


def test_kvstore_admin_against_a_live_daemon(tenants):
    url = tenants.url
    gamma = DaemonClient(url, api_key="kg")
    keys = [bytes([i]) * 16 for i in range(3)]
    gamma.put([(k, obj(k)) for k in keys])
    DaemonClient(url, api_key="kd").put([(b"\x09" * 16, obj(b"\x09" * 16))])
    r = admin(url, "health")
    assert r.returncode == 0 and "ready" in r.stdout
    r = admin(url, "usage", key="kadmin")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows["gamma"][3] == "3" and rows["delta"][3] == "1" and rows["gamma"][-2:] == ["7.8", "KiB"]
    r = admin(url, "stats", key="kadmin")
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[:3] == ["tier", "objects", "bytes"]
    r = admin(url, "stats", key="kg")  # a tenant's own view
    assert r.returncode == 0 and "gamma" in r.stdout and "delta" not in r.stdout and "cpu" not in r.stdout
    r = admin(url, "--tenant", "gamma", "pin", keys[0].hex(), "--ttl-s", "60", key="kadmin")
    assert r.returncode == 0 and "pin: 1 of 1" in r.stdout
    r = admin(url, "--tenant", "gamma", "delete", keys[1].hex(), key="kadmin")
    assert r.returncode == 0 and "delete: 1 of 1" in r.stdout and gamma.exists(keys) == [True, False, True]
    r = admin(url, "--tenant", "gamma", "clear", key="kadmin")
    assert r.returncode == 2 and "add --yes" in r.stderr and gamma.exists(keys) == [True, False, True]
    r = admin(url, "--tenant", "gamma", "clear", "--yes", key="kadmin")
    assert r.returncode == 0 and "2 object(s)" in r.stdout and gamma.exists(keys) == [False] * 3
    assert DaemonClient(url, api_key="kd").exists([b"\x09" * 16]) == [True]  # another tenant is untouched
    # Mistakes are one line naming the daemon.
    r = admin(url, "usage", key="kg")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "admin key" in r.stderr
    r = admin(url, "--tenant", "delta", "stats", key="kg")
    assert r.returncode == 2 and url in r.stderr and "403" in r.stderr and "Traceback" not in r.stderr
    r = admin(url, "delete", "nothex", key="kadmin")
    assert r.returncode == 2 and "32 hex digits" in r.stderr
    down = f"kvstore://127.0.0.1:{free_port()}"
    r = admin(down, "stats")
    assert r.returncode == 2 and f"cannot reach the kvstore daemon at {down}" in r.stderr and "Traceback" not in r.stderr


def test_tls_round_trip_and_a_refused_unverified_certificate(tmp_path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    d = Daemon.__new__(Daemon)  # the fixture polls plain HTTP; this daemon speaks only TLS
    d.port, d.workdir = free_port(), tmp_path
    d.args = [sys.executable, "-m", "kvstore", "serve", "--port", str(d.port), "--disk-path", str(tmp_path / "disk"),
              "--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.pem")]
    log = open(tmp_path / "daemon.log", "ab")
    d.proc = subprocess.Popen(d.args, stdout=log, stderr=subprocess.STDOUT)
    d.log = log
    try:
        url = f"kvstores://127.0.0.1:{d.port}"
        client = DaemonClient(url, tls_ca=str(tmp_path / "ca.pem"), retries=50, backoff_s=0.1)
        key = b"\x05" * 16
        blob = obj(key)
        assert client.put([(key, blob)]) == 1 and bytes(client.get([key])[0]) == blob
        with pytest.raises(DaemonUnreachable, match="certificate verify failed"):
            DaemonClient(url, retries=0).stats()  # the system CAs do not know this one
        with pytest.raises(DaemonUnreachable):
            DaemonClient(f"kvstore://127.0.0.1:{d.port}", retries=0).stats()  # plain HTTP to a TLS port
        r = admin(url, "health", env={"KVSTORE_ADMIN_TLS_CA": str(tmp_path / "ca.pem")})
        assert r.returncode == 0 and "ready" in r.stdout, r.stderr
        from kvstore import KVStore
        cfg = {"chunk_size": 16, "tiers": {"remote": {"url": url, "tls_ca": str(tmp_path / "ca.pem")}}}
        with KVStore(SPEC, cfg) as s:  # the remote tier over TLS
            toks = list(range(32))
            kv = torch.randn(SPEC.chunk_shape(32)).half()
            assert s.put(toks, kv) == 2
            s.flush()
            hit, got = s.get(toks)
            assert hit == 32 and torch.equal(got, kv)
    finally:
        d.stop()
    assert "serving https://127.0.0.1" in (tmp_path / "daemon.log").read_text()
    one_line_error(serve("--tls-cert", str(tmp_path / "server.pem"), "--no-disk"), "--tls-key")
    one_line_error(serve("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tmp_path / "nope.pem"),
                         "--no-disk"), "cannot load --tls-cert")


def test_every_grafana_query_uses_a_metric_the_daemon_exports(tmp_path):
    import json
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).parent.parent / "grafana" / "kvstore-daemon.json").read_text())
    text = scrape_after_traffic(tmp_path)
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    queries = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(queries) >= 20
    for expr in queries:
        for name in re.findall(r"\bkvstore_[a-z_]+", expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported"


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_the_daemon_applies_a_lossless_disk_codec_without_torch(tmp_path):
    d = Daemon(tmp_path, "--disk-codec", "lz4", "--cpu-capacity", "1MiB")
    try:
        toks = 16 * 64  # 1,024 tokens of all-zero KV: 64 KiB raw, a few hundred bytes in lz4
        kv = torch.zeros(SPEC.chunk_shape(toks), dtype=SPEC.dtype)
        objs = []
        for i in range(20):  # 1.3 MiB: more than the memory tier holds, so some are read from disk
            key = bytes([i]) * 16
            objs.append((key, join_parts(encode_object(meta_for(key, SPEC.fingerprint, kv, False), kv))))
        client = DaemonClient(d.url)
        assert client.put(objs) == 20
        client.request("GET", "/v1/stats")  # the writer queue drains in the background
        import time
        deadline = time.monotonic() + 10
        files = []
        while time.monotonic() < deadline and len(files) < 20:
            files = list((tmp_path / "disk").rglob("*.kvo"))
            time.sleep(0.1)
        assert len(files) == 20 and max(f.stat().st_size for f in files) < len(objs[0][1]) // 20
        from kvstore.objects import decode_object, read_meta
        for (key, sent), got in zip(objs, client.get([k for k, _ in objs])):
            meta = read_meta(sent)[0]
            assert torch.equal(decode_object(got, meta), kv)  # the same KV, whichever codec it came back in
        assert "libtorch" not in _maps(d.proc.pid)
    finally:
        d.stop()
    one_line_error(serve("--disk-codec", "cachegen", "--disk-path", str(tmp_path / "d2")), "lossy", "lossless")


def test_review_findings_stay_fixed(tmp_path):
    """An adversarial review of the daemon found each of these; one daemon checks them all."""
    import msgpack

    from kvstore.objects import pack_object

    disk = tmp_path / "disk"
    disk.mkdir()
    # A journal of garbage (wrong types, a huge int) is skipped with a warning, never a failed start.
    (disk / "daemon-owners.journal").write_bytes(msgpack.packb([None, "a", 5]) + msgpack.packb([10**12, "t", 1])
                                                 + msgpack.packb([{"a": 1}, "t", 5]) + b"\xc1garbage")
    kf = tmp_path / "keys.yaml"
    kf.write_text("keys:\n  ka: {tenant: a}\n  kb: {tenant: b}\n  kadmin: {tenant: ops, admin: true}\n")
    redis_port, busy = free_port(), socket.socket()
    d = Daemon(tmp_path, "--disk-codec", "lz4", "--cpu-capacity", "1MiB",
               "--redis-url", f"redis://:s3cret@127.0.0.1:{redis_port}/0", key_file=kf)
    try:
        log = (tmp_path / "daemon.log").read_text()
        assert "malformed records" in log or "damaged record" in log
        assert "s3cret" not in log and "redis://:<redacted>@" in log
        a, b = DaemonClient(d.url, api_key="ka"), DaemonClient(d.url, api_key="kb")
        # A lossy-codec object written down to an lz4 disk tier does not make the daemon load torch.
        kv = torch.randn(SPEC.chunk_shape(16)).half()
        key = b"\x0a" * 16
        lossy = join_parts(encode_object(meta_for(key, SPEC.fingerprint, kv, False, codec="int8"), kv, "int8"))
        raws = [(bytes([i]) * 16, obj(bytes([i]) * 16, tokens=16 * 32)) for i in range(1, 6)]  # evict to disk
        assert a.put([(key, lossy)] + raws) == 6
        import time
        time.sleep(1.0)
        assert "libtorch" not in _maps(d.proc.pid)
        # A raw object whose payload does not fit its shape is refused at the door (it would fail
        # the whole disk write batch it landed in).
        short = join_parts(pack_object(meta_for(b"\x0b" * 16, SPEC.fingerprint, kv, False), b"x" * 10, "raw"))
        with pytest.raises(ServiceError) as e:
            b.put([(b"\x0b" * 16, short)])
        assert e.value.status == 400 and "raw payload of 10 bytes" in e.value.message
        # An admin acting as one tenant clears only that tenant, also through the library.
        b.put([(b"\x0c" * 16, obj(b"\x0c" * 16))])
        DaemonClient(d.url, api_key="kadmin", tenant="a").clear()
        assert b.exists([b"\x0c" * 16]) == [True] and a.exists([key]) == [False]
        # A corrupt object on disk leaves the tenant's usage when it is found.
        b.put([(bytes([i]) * 16, obj(bytes([i]) * 16, tokens=16 * 256)) for i in range(20, 24)])  # 2 MiB: some only on disk
        time.sleep(1.0)
        for f in (tmp_path / "disk").rglob("*.kvo"):
            f.write_bytes(f.read_bytes()[:-1] + b"\x00")
        before = b.stats()["objects"]
        b.get([bytes([i]) * 16 for i in range(20, 24)])
        assert b.stats()["objects"] < before
    finally:
        d.stop()
    # A busy metrics (or lm://) port is named as the one that failed.
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    one_line_error(serve("--no-disk", "--metrics-port", str(busy.getsockname()[1])), "--metrics-port", "in use")
    busy.close()
    r = admin("http://127.0.0.1:notaport", "stats")
    assert r.returncode == 2 and "daemon URL must look like" in r.stderr and "Traceback" not in r.stderr
