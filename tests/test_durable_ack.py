"""``kvstore serve --ack disk``: a PUT is answered once the disk tier has written it, so a client
told "stored" finds the object after the daemon is killed with SIGKILL; an object whose disk
write failed is still served from memory but is not counted as stored."""

import json
import signal

import pytest

from conftest import Daemon, free_port
from kvstore.client import DaemonClient
from test_faults import small_fs  # noqa: F401  (a fixture)
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


def test_a_full_disk_never_fails_a_put_and_the_owner_journal_catches_up(small_fs, caplog):
    """The daemon's store on a disk that fills: puts answer (not acknowledged while full), the
    owner journal's failure is said once and never reaches the client, and once space returns
    the journal is rewritten, so a restart restores every tenant's usage."""
    from kvstore.blobstore import BlobStore, StoredObject
    from kvstore.objects import read_meta

    journal = str(small_fs / "daemon-owners.journal")
    cfg = {"tiers": {"cpu": {"capacity": "4MiB"}, "disk": {"path": str(small_fs / "kv"), "capacity": "64MiB"}}}

    def put(store, i):
        key = i.to_bytes(16, "big")
        blob = obj(key)
        return store.put_durably([StoredObject(key, read_meta(blob)[0], blob)], owner="t")

    store = BlobStore(cfg, owners_journal=journal)
    assert all(put(store, i) == 1 for i in range(5))
    filler = small_fs / "filler"
    with open(filler, "wb", buffering=0) as f, caplog.at_level("WARNING"):
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
        assert [put(store, i) for i in range(5, 300)] == [0] * 295  # served from memory, never promised
        assert not store.owners.flush(3)  # the journal cannot be written either
        said = [r.getMessage() for r in caplog.records if "owner journal" in r.getMessage()]
        assert len(said) == 1 and "cannot write it" in said[0], said
    filler.unlink()
    assert store.owners.flush(10)  # retried every 2 s: written again
    assert put(store, 300) == 1
    assert any("written again" in r.getMessage() for r in caplog.records)
    usage = store.usage("t")
    assert usage == 301 * len(obj(b"x" * 16))
    store.close()
    again = BlobStore(cfg, owners_journal=journal)  # what the disk holds, accounted to its tenant
    held = sum(again.exists([i.to_bytes(16, "big") for i in range(301)]))
    assert again.usage("t") == held * len(obj(b"x" * 16)) and held >= 6
    again.close()


def _objects(first: int, count: int):
    from kvstore.blobstore import StoredObject
    from kvstore.objects import read_meta

    out = []
    for i in range(first, first + count):
        key = i.to_bytes(16, "big")
        blob = obj(key)
        out.append(StoredObject(key, read_meta(blob)[0], blob))
    return out


def _fill(path):
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.mark.parametrize("first", ["disk", "cpu"], ids=["disk-first", "cpu-then-disk"])
def test_only_what_the_disk_holds_is_acknowledged_and_a_put_again_retries_it(small_fs, first):
    """A full disk: nothing is acknowledged, whatever tier is first and whatever other tier
    (here a queue to Redis that is down) takes the object. Once space returns, putting the same
    objects again writes them to the disk and acknowledges them."""
    from kvstore.blobstore import BlobStore

    tiers = {"disk": {"path": str(small_fs / "kv"), "capacity": "64MiB", "fsync": True},
             "redis": {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout_s": 0.2}}
    if first == "cpu":
        tiers["cpu"] = {"capacity": "4MiB"}
    store = BlobStore({"tiers": tiers})
    batch = _objects(0, 8)
    _fill(small_fs / "filler")
    assert store.put_durably(batch) == 0
    (small_fs / "filler").unlink()
    assert store.put_durably(batch) == 8
    store.close()
    again = BlobStore({"tiers": {"disk": tiers["disk"]}})
    assert sum(again.exists([o.storage_key for o in batch])) == 8
    again.close()


def test_writes_dropped_on_a_full_queue_are_not_acknowledged_until_put_again(tmp_path):
    from kvstore.blobstore import BlobStore

    disk = {"path": str(tmp_path / "kv"), "capacity": "64MiB", "queue_size": 2}
    store = BlobStore({"queue_full": "drop", "tiers": {"cpu": {"capacity": "8MiB"}, "disk": disk}})
    batch = _objects(0, 64)
    first = store.put_durably(batch)
    assert first == store.held_durably([o.storage_key for o in batch]) < 64  # the rest were dropped
    total = first
    for _ in range(40):  # each put again queues what the disk lacks (a queue of 2: a few a time)
        total = store.put_durably(batch)
        if total == 64:
            break
    assert total == 64
    store.close()


def test_a_kvstore_put_through_the_daemon_counts_only_the_chunks_it_acknowledged(tmp_path, spec):
    """A prompt's chunks go to the daemon in one request; when the disk keeps only some of them
    (here a disk with room for three: a disk filling up halfway through the batch does the same),
    KVStore.put returns how many the daemon acknowledged, not every chunk of the prompt: an
    engine (or the soak's ack log) takes that number as what survives a SIGKILL of the daemon."""
    from kvstore import KVStore

    from conftest import causal_kv

    conf = _config(tmp_path, {"disk": {"path": str(tmp_path / "disk"), "capacity": 8000, "fsync": True}})
    d = Daemon(tmp_path, "--config", conf, "--ack", "disk")
    try:
        toks = list(range(16 * 8))
        with KVStore(spec, {"chunk_size": 16, "tiers": {"remote": {"url": d.url}}}) as s:
            stored = s.put(toks, causal_kv(spec, toks))
            keys = [r.key for r in s.chunks(toks)]
        d.stop(signal.SIGKILL)
        d.start()
        client = DaemonClient(d.url)
        try:
            held = sum(client.exists(keys))
        finally:
            client.close()
        assert 0 < held < 8, f"the disk should keep some of the 8 chunks, not {held}"
        assert stored == held
    finally:
        d.stop()
