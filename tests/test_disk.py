"""Disk tier durability: restarts, SIGKILL in the middle of writes, torn and corrupted files."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from conftest import causal_kv, disk_config
from kvstore import KVSpec, KVStore


def test_survives_restart(spec, tmp_path):
    toks = list(range(200))
    kv = causal_kv(spec, toks)
    with KVStore(spec, disk_config(tmp_path)) as store:
        store.put(toks, kv)
    # close() flushed the queue: a new store (empty memory) serves everything from disk.
    with KVStore(spec, disk_config(tmp_path)) as store:
        assert store.lookup(toks) == 200
        hit, out = store.get(toks)
        assert hit == 200 and torch.equal(out, kv)
        assert store.stats()["tiers"]["disk"]["hits"] == 13


def _files(tmp_path):
    return sorted(tmp_path.rglob("*.kvo"))


def test_corrupted_file_is_a_miss_and_removed(spec, tmp_path):
    toks = list(range(64))
    kv = causal_kv(spec, toks)
    with KVStore(spec, disk_config(tmp_path, cpu=None)) as store:
        store.put(toks, kv)
        refs = store.chunks(toks)
        victim = store.tiers[0].path_of(refs[2].key)
        data = bytearray(open(victim, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(victim, "wb").write(bytes(data))
        hit, out = store.get(toks)
        assert hit == 32 and torch.equal(out, kv[:, :, :32])  # stops before the bad chunk
        assert store.stats()["tiers"]["disk"]["corrupt"] == 1
        assert not os.path.exists(victim) and store.lookup(toks) == 32


def test_torn_file_after_crash_is_a_miss(spec, tmp_path):
    toks = list(range(64))
    kv = causal_kv(spec, toks)
    with KVStore(spec, disk_config(tmp_path, cpu=None)) as store:
        store.put(toks, kv)
        path = store.tiers[0].path_of(store.chunks(toks)[1].key)
    with open(path, "r+b") as f:  # as if power was lost before the data reached the disk
        f.truncate(os.path.getsize(path) // 3)
    with KVStore(spec, disk_config(tmp_path, cpu=None)) as store:
        hit, out = store.get(toks)
        assert hit == 16 and torch.equal(out, kv[:, :, :16])
        assert store.stats()["tiers"]["disk"]["corrupt"] == 1


def test_object_for_another_key_is_rejected(spec, tmp_path):
    """A valid object under the wrong name (e.g. a bad copy) is never served for that name."""
    toks = list(range(32))
    with KVStore(spec, disk_config(tmp_path, cpu=None)) as store:
        store.put(toks, causal_kv(spec, toks))
        a, b = (store.tiers[0].path_of(r.key) for r in store.chunks(toks))
        os.replace(a, a + ".bak")
        os.replace(b, a)
        os.replace(a + ".bak", b)
        assert store.get(toks)[0] == 0
        assert store.stats()["tiers"]["disk"]["corrupt"] == 1


def test_leftover_temp_files_are_removed(spec, tmp_path):
    with KVStore(spec, disk_config(tmp_path, cpu=None)) as store:
        store.put(list(range(16)), causal_kv(spec, list(range(16))))
        shard = os.path.dirname(store.tiers[0].path_of(store.chunks(list(range(16)))[0].key))
    tmp = os.path.join(shard, "deadbeef.kvo.123.456.tmp")
    open(tmp, "wb").write(b"partial")
    with KVStore(spec, disk_config(tmp_path, cpu=None)):
        assert not os.path.exists(tmp)


CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import causal_kv
    from kvstore import KVSpec, KVStore
    spec = KVSpec(model_id="test/kill", num_layers=4, num_kv_heads=8, head_size=64)
    store = KVStore(spec, {{"chunk_size": 256, "tiers": {{"cpu": {{"capacity": "64MiB"}},
                           "disk": {{"path": {path!r}, "capacity": "2GiB"}}}}}})
    i = 0
    while True:
        toks = [i * 100000 + j for j in range(1024)]
        store.put(toks, causal_kv(spec, toks))
        if i == 3:
            store.flush()
            print("ready", flush=True)
        i += 1
""")


def test_sigkill_during_writes_loses_nothing_committed(tmp_path):
    spec = KVSpec(model_id="test/kill", num_layers=4, num_kv_heads=8, head_size=64)
    cache = tmp_path / "cache"
    code = CHILD.format(tests=os.path.dirname(__file__), path=str(cache))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.7)  # keep writing: the kill lands in the middle of some file
    child.send_signal(signal.SIGKILL)
    child.wait()
    cfg = {"chunk_size": 256, "tiers": {"disk": {"path": str(cache), "capacity": "2GiB"}}}
    with KVStore(spec, cfg) as store:
        assert not list(cache.rglob("*.tmp"))
        served = 0
        for i in range(200):
            toks = [i * 100000 + j for j in range(1024)]
            hit, out = store.get(toks)
            assert torch.equal(out, causal_kv(spec, toks)[:, :, :hit])
            served += hit
        assert served >= 4 * 1024  # everything flushed before "ready" survived
        assert store.stats()["tiers"]["disk"]["corrupt"] == 0


def test_shared_directory_sees_objects_written_by_another_store(spec, tmp_path):
    """Two engines (or vLLM's scheduler and worker) on one host share a disk directory."""
    toks = list(range(48))
    shared = disk_config(tmp_path, cpu=None)
    shared["tiers"]["disk"]["shared"] = True
    with KVStore(spec, shared) as reader, KVStore(spec, disk_config(tmp_path, cpu=None)) as private:
        with KVStore(spec, disk_config(tmp_path, cpu=None)) as writer:  # opened after both readers
            writer.put(toks, causal_kv(spec, toks))
            writer.flush()
        assert private.lookup(toks) == 0  # its index was built before the writes
        assert reader.lookup(toks) == 48
        hit, kv = reader.get(toks)
        assert hit == 48 and torch.equal(kv, causal_kv(spec, toks))


def test_a_shard_directory_removed_behind_the_tiers_back_is_made_again(spec, tmp_path):
    """Shard directories are made once per process, not looked up on every write; one that
    disappears (an operator's cleanup) must not make later writes fail."""
    import shutil

    from kvstore.objects import encode_object, meta_for

    kv = causal_kv(spec, list(range(16)))
    with KVStore(spec, disk_config(tmp_path, cpu=None)) as store:
        disk = store.tiers[0]
        first, second = b"\x11" * 16, b"\x11" + b"\x22" * 15  # one shard directory, "11"
        items = [(meta_for(k, spec.fingerprint, kv, False), encode_object(meta_for(k, spec.fingerprint, kv, False), kv))
                 for k in (first, second)]
        assert disk.put_blobs(items[:1]) == 1
        shard = os.path.dirname(disk.path_of(first))
        shutil.rmtree(shard)
        assert disk.put_blobs(items[1:]) == 1
        assert os.path.isfile(disk.path_of(second))
        assert store.stats()["tiers"]["disk"].get("write_errors", 0) == 0
