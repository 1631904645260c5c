"""``kvstore serve --ack disk``: a PUT is answered once the disk tier has written it, so a client
told "stored" finds the object after the daemon is killed with SIGKILL; an object whose disk
write failed is still served from memory but is not counted as stored."""

import json
import signal

import pytest

from conftest import Daemon, free_port
from kvstore.client import DaemonClient
from test_serve_ops import obj, one_line_error, serve


def _config(tmp_path, tier: dict) -> str:
    path = tmp_path / "kv.json"
    path.write_text(json.dumps({"tiers": {"cpu": {"capacity": "64MiB"}, **tier}}))
    return str(path)


def test_every_acknowledged_put_survives_kill_9(tmp_path):
    conf = _config(tmp_path, {"disk": {"path": str(tmp_path / "disk"), "capacity": "256MiB", "fsync": True}})
    d = Daemon(tmp_path, "--config", conf, "--ack", "disk")
    client = DaemonClient(d.url)
    acked = {}
    for i in range(300):  # one object a request, as engines put chunks: each answer is a promise
        key = i.to_bytes(4, "big") * 4
        blob = obj(key, tokens=64)
        assert client.put([(key, blob)]) == 1
        acked[key] = blob
    d.stop(signal.SIGKILL)  # at once: nothing gets flushed on the way out
    d.start()
    client.close()
    client = DaemonClient(d.url)
    got = client.get(list(acked))
    lost = [k.hex() for k, b in zip(acked, got) if b is None]
    assert not lost, f"{len(lost)} acknowledged objects lost: {lost[:5]}"
    assert all(bytes(b) == acked[k] for k, b in zip(acked, got))
    client.close()
    d.stop()


def test_a_failed_disk_write_is_served_from_memory_but_not_acknowledged(tmp_path):
    conf = _config(tmp_path, {"fault": {"wraps": "disk", "path": str(tmp_path / "disk"), "capacity": "256MiB",
                                        "write_error": 1.0}})
    d = Daemon(tmp_path, "--config", conf, "--no-disk", "--ack", "disk")
    client = DaemonClient(d.url)
    try:
        items = [(bytes([i]) * 16, obj(bytes([i]) * 16)) for i in range(8)]
        assert client.put(items) == 0  # the disk never held them: no promise was made
        assert [bytes(b) for b in client.get([k for k, _ in items])] == [b for _, b in items]
        assert client.stats()["tiers"]["fault"]["write_errors"] >= 1
    finally:
        client.close()
        d.stop()


@pytest.mark.parametrize("args,needle", [
    (("--no-disk", "--ack", "disk"), "serve.ack is disk, but no disk tier"),
    (("--ack", "fsync"), "invalid choice: 'fsync'"),
])
def test_an_ack_without_a_disk_is_one_line(tmp_path, args, needle):
    r = serve("--port", str(free_port()), "--disk-path", str(tmp_path / "d"), *args)
    if "invalid choice" in needle:  # argparse's own usage error
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    else:
        one_line_error(r, needle)


def test_ack_is_read_from_the_config_file_and_checked(tmp_path):
    path = tmp_path / "kv.json"
    path.write_text(json.dumps({"serve": {"ack": "always"}, "tiers": {"disk": {"path": str(tmp_path / "d")}}}))
    one_line_error(serve("--config", str(path)), "serve.ack must be memory or disk, got 'always'")
