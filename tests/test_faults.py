"""Faults on purpose (kvstore/tiers/fault.py) through every layer a user runs: under any fault a
read is the exact KV or a miss, never an exception and never wrong bytes; and afterwards a later
request and a fresh store on the same data get exact KV."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import Daemon, causal_kv

from kvstore import KVStore
from kvstore.config import load_config
from kvstore.errors import ConfigError

READS = {"read_miss": 0.1, "read_error": 0.1, "read_delay": 0.05, "read_truncate": 0.1, "read_flip": 0.15,
         "read_swap": 0.15}
WRITES = {"write_lose": 0.1, "write_error": 0.1, "write_truncate": 0.1}
CHUNK = 16


def faulty(path: Path, cpu: bool = True, seed: int = 1, **rates: float) -> dict:
    tiers: dict = {"fault": {"wraps": "disk", "path": str(path), "capacity": "64MiB", "seed": seed,
                             "delay_s": 0.001, **rates}}
    if cpu:  # room for two chunks: most reads come from the faulty tier
        tiers["cpu"] = {"capacity": 2 * CHUNK * 64}
    return {"chunk_size": CHUNK, "tiers": tiers}


def prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    """Four families (distinct first chunks, so one corrupt chunk does not end every hit) of
    exact chunk multiples, one token more or less, and partial tails."""
    rng = random.Random(seed)
    out = []
    for _family in range(4):
        base = [rng.randrange(1, 5000) for _ in range(96)]
        out += [base[:64], base[:63], base[:65] + [rng.randrange(1, 5000)], base[:rng.randrange(20, 96)]]
    return out[:n]


def exact_or_miss(spec, tokens: list[int], hit: int, got: torch.Tensor | None) -> None:
    """The hit prefix is exactly the KV of those tokens (never another's, never garbage)."""
    assert 0 <= hit <= len(tokens)
    if hit:
        want = causal_kv(spec, tokens)[:, :, :hit]
        assert got is not None and torch.equal(got[:, :, :hit], want), "wrong KV served"


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="wraps must name a tier kind of serialized objects"):
        load_config({"tiers": {"fault": {"wraps": "cpu", "capacity": "1MiB"}}})
    with pytest.raises(ConfigError, match=r"read_flip must be a finite number in \[0.0, 1.0\]"):
        load_config({"tiers": {"fault": {"wraps": "disk", "path": str(tmp_path), "capacity": "1MiB",
                                         "read_flip": 1.5}}})
    with pytest.raises(ConfigError, match="add up to more than 1"):
        load_config({"tiers": {"fault": {"wraps": "disk", "path": str(tmp_path), "capacity": "1MiB",
                                         "read_flip": 0.6, "read_swap": 0.6}}})
    with pytest.raises(ConfigError, match="unknown option 'read_flipp'"):
        load_config({"tiers": {"fault": {"wraps": "disk", "path": str(tmp_path), "capacity": "1MiB",
                                         "read_flipp": 0.1}}})
    for bad in ({"read_flip": "abc"}, {"seed": "x"}, {"seed": 1.7}, {"delay_s": float("nan")}, {"read_flip": [1]}):
        with pytest.raises(ConfigError, match="tiers.fault"):
            load_config({"tiers": {"fault": {"wraps": "disk", "path": str(tmp_path), "capacity": "1MiB", **bad}}})
    with pytest.raises(ConfigError, match="path is required when it wraps disk"):  # never the real cache
        load_config({"tiers": {"fault": {"wraps": "disk", "capacity": "1MiB", "write_truncate": 0.5}}})
    # set through the environment like any tier's option
    cfg = load_config(env={"KVSTORE_FAULT_WRAPS": "disk", "KVSTORE_FAULT_PATH": str(tmp_path),
                           "KVSTORE_FAULT_CAPACITY": "1MiB", "KVSTORE_FAULT_READ_FLIP": "0.25"})
    assert cfg.tiers["fault"].extra == {"wraps": "disk", "read_flip": "0.25"}  # parsed by the tier


@pytest.mark.parametrize("layerwise", [False, True], ids=["get", "get_layers"])
def test_read_faults_are_misses_never_wrong_kv(spec, tmp_path, layerwise):
    ps = prompts()
    with KVStore(spec, faulty(tmp_path / "kv", cpu=False)) as s:
        for p in ps:
            s.put(p, causal_kv(spec, p))
        s.flush()
    with KVStore(spec, faulty(tmp_path / "kv", **READS)) as s:
        for _round in range(6):
            for p in ps:
                s.put(p, causal_kv(spec, p))  # as an engine does after a miss: recompute, store
                s.flush()
                if layerwise:
                    h = s.get_layers(p)
                    layers = []
                    try:
                        layers = [h.wait(i) for i in range(spec.num_layers)] if h.hit_tokens else []
                    except Exception as exc:  # a layer that failed: the engine recomputes
                        assert type(exc).__name__ in ("LoadFailed", "LoadError"), exc
                        continue
                    got = torch.stack(layers) if layers else None
                    exact_or_miss(spec, p, h.hit_tokens, got)
                else:
                    hit, got = s.get(p)
                    exact_or_miss(spec, p, hit, got)
        tiers = s.stats()["tiers"]
        injected = {k: v for k, v in tiers["fault"].items() if k.startswith("injected_") and v}
        # every kind of fault happened, and the corrupting ones were caught as corrupt
        assert {"injected_miss", "injected_error", "injected_truncate", "injected_flip",
                "injected_swap"} <= set(injected), tiers["fault"]
        assert tiers["fault"]["corrupt"] > 0 and tiers["fault"]["read_errors"] > 0
    # a later store without faults on the same directory: exact KV or a miss for every prompt,
    # and the prompts whose objects were never corrupted still hit
    with KVStore(spec, faulty(tmp_path / "kv")) as s:
        hits = 0
        for p in ps:
            hit, got = s.get(p)
            exact_or_miss(spec, p, hit, got)
            hits += hit > 0
        assert hits > 0


def test_write_faults_leave_nothing_wrong_behind(spec, tmp_path):
    ps = prompts(16, seed=3)
    with KVStore(spec, faulty(tmp_path / "kv", cpu=False, seed=5, **WRITES)) as s:
        for p in ps:
            s.put(p, causal_kv(spec, p))  # a raising backend is the writer's, not the caller's
        s.flush()
        injected = {k for k, v in s.stats()["tiers"]["fault"].items() if k.startswith("injected_") and v}
        assert {"injected_write_lose", "injected_write_error", "injected_write_truncate"} <= injected
    with KVStore(spec, faulty(tmp_path / "kv")) as s:
        # The store heals as an engine uses it: a read finds a torn object (a miss, and the object
        # is deleted), the engine's put after the miss stores it again. A torn chunk behind the
        # first failing one is only found by a later read, so this takes a few rounds.
        served = []
        for _round in range(6):
            served.append(0)
            for p in ps:
                hit, got = s.get(p)
                exact_or_miss(spec, p, hit, got)
                served[-1] += hit
                s.put(p, causal_kv(spec, p))
            s.flush()
        assert 0 < served[0] < served[-1] == sum(len(p) for p in ps), served


def test_pagestore_pages_are_exact_or_missing_under_faults(tmp_path):
    from kvstore.pagestore import PageStore

    ident = {"engine": "test", "model": "m", "tp": (0, 1), "layout": "layer_first"}
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(512, generator=g).to(torch.bfloat16) for _ in range(24)]
    keys = [f"{i:064x}" for i in range(24)]
    clean = {"tiers": {"disk": {"path": str(tmp_path), "capacity": "64MiB"}}}
    ps = PageStore(load_config(clean), ident, tokens_per_page=16)
    assert ps.put(keys, src) == 24
    ps.close()
    cfg = {"tiers": {"fault": {"wraps": "disk", "path": str(tmp_path), "capacity": "64MiB", "seed": 2, **READS}}}
    ps = PageStore(load_config(cfg), ident, tokens_per_page=16)
    ok_total = 0
    for _ in range(3):
        outs = [torch.zeros_like(p) for p in src]
        ok = ps.get_into(keys, outs)
        for hit, a, b in zip(ok, src, outs):
            if hit:
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), "wrong page served"
        ok_total += sum(ok)
    assert 0 < ok_total < 72  # some pages were served, some faults made misses
    ps.close()


def test_daemon_over_a_faulty_disk_serves_verified_bytes_or_misses(tmp_path):
    """A daemon whose disk tier fails on purpose (configured from a file, as an operator would):
    every object a client gets is byte-identical to what was put."""
    from kvstore.service.client import KVStoreClient
    from kvstore.objects import encode_object, join_parts, meta_for
    from kvstore.spec import KVSpec

    spec = KVSpec(model_id="test/tiny", num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float16)
    conf = tmp_path / "kv.json"
    conf.write_text(json.dumps({"tiers": {"cpu": {"capacity": "1MiB"}, "fault": {
        "wraps": "disk", "path": str(tmp_path / "disk"), "capacity": "64MiB", "seed": 4, **READS}}}))
    d = Daemon(tmp_path, "--config", str(conf), "--no-disk", "--cpu-capacity", "1MiB")
    try:
        client = KVStoreClient(d.url)
        objects = {}
        for i in range(40):  # 40 x 32 KiB: beyond the 1 MiB memory tier, so reads reach the disk
            key = bytes([i]) * 16
            kv = torch.full(spec.chunk_shape(512), float(i), dtype=torch.float16)
            blob = join_parts(encode_object(meta_for(key, spec.fingerprint, kv, False), kv))
            objects[key] = blob
        assert client.put(list(objects.items())) == 40
        served = 0
        for _ in range(3):
            got = client.get(list(objects))
            for key, blob in zip(objects, got):
                if blob is not None:
                    assert bytes(blob) == objects[key], "wrong bytes served"
                    served += 1
        assert served > 0
        faults = client.stats()["tiers"]["fault"]
        assert sum(v for k, v in faults.items() if k.startswith("injected_")) > 0, faults  # reads reached it
        client.close()
    finally:
        d.stop()
    assert "unhandled error" not in (tmp_path / "daemon.log").read_text()


def test_a_stalled_daemon_disk_is_a_miss_within_the_clients_timeout(spec, tmp_path):
    """The daemon's disk hangs on every read (longer than the engine's timeout): the engine's
    get returns a miss after its timeout, not after the stall, and the next request does too."""
    import time

    conf = tmp_path / "kv.json"
    conf.write_text(json.dumps({"tiers": {"cpu": {"capacity": "1MiB"}, "fault": {
        "wraps": "disk", "path": str(tmp_path / "disk"), "capacity": "64MiB", "read_stall": 1.0, "stall_s": 8}}}))
    d = Daemon(tmp_path, "--config", str(conf), "--no-disk", "--cpu-capacity", "1MiB")
    try:
        cfg = {"chunk_size": CHUNK, "tiers": {"remote": {"url": d.url, "timeout_s": 0.5}}}
        ps = [[i * 2000 + t for t in range(1024)] for i in range(1, 21)]  # 2.5 MiB of KV: past the 1 MiB
        with KVStore(spec, cfg) as s:
            for p in ps:
                s.put(p, causal_kv(spec, p))
            s.flush()
            t0 = time.monotonic()
            hit, got = s.get(ps[0])  # its head was evicted to the stalling disk
            took = time.monotonic() - t0
            exact_or_miss(spec, ps[0], hit, got)
            assert took < 3, f"a get waited {took:.1f} s on a stalled tier (timeout 0.5 s)"
            assert hit < len(ps[0])
    finally:
        d.stop()


# ---- engines on a faulty store: the output of an engine without kvstore ------------------------

def _engine_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(6, 4096) for _ in range(64)]  # a shared prefix, two chunks
    out = []
    for i in range(8):
        # exact chunk multiples (of the chunk and of the paged engine's 16-token blocks), one
        # token more or less, and ragged lengths
        n = (64, 63, 65, 96, 33, 80, 47, 128)[i]
        out.append(system + [rng.randrange(6, 4096) for _ in range(n)])
    return out


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_reference_engine_on_a_faulty_store_generates_what_it_does_without(tmp_path, paged):
    from kvstore.connectors.hooks import KVHooks
    from kvstore.connectors.reference import Engine, SamplingParams, build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", seed=3)
    plain = Engine.load(model_dir, paged=paged)
    params = SamplingParams(max_new_tokens=6)
    ps = _engine_prompts()
    want = [plain.generate(p, params) for p in ps]
    engine = Engine.load(model_dir, paged=paged)
    cfg = {"chunk_size": 32, "tiers": {"cpu": {"capacity": "64KiB"}, "fault": {
        "wraps": "disk", "path": str(tmp_path / "kv"), "capacity": "64MiB", "seed": 9, **READS, **WRITES}}}
    with KVStore(engine.kv_spec(), cfg) as store:
        engine.attach(KVHooks(store))
        hits = 0
        for _round in range(3):  # later requests meet what earlier faults left behind
            for p, w in zip(ps, want):
                g = engine.generate(p, params)
                assert g.tokens == w.tokens
                assert torch.allclose(g.first_logits, w.first_logits, atol=1e-2), "logits moved: wrong KV?"
                hits += g.hit_tokens
            store.flush()
        assert hits > 0
    # a fresh engine and store on the same directory, no faults: the same output
    fresh = Engine.load(model_dir, paged=paged)
    with KVStore(fresh.kv_spec(), {"chunk_size": 32, "tiers": {"disk": {"path": str(tmp_path / "kv"),
                                                                       "capacity": "64MiB"}}}) as store:
        fresh.attach(KVHooks(store))
        for p, w in zip(ps, want):
            g = fresh.generate(p, params)
            assert g.tokens == w.tokens and torch.allclose(g.first_logits, w.first_logits, atol=1e-2)


def test_cacheblend_on_a_faulty_store_reuses_only_exact_documents(tmp_path):
    """Documents whose loads fail are recomputed, never blended in wrong: when every document
    loaded, full reuse (ratio 0) gives exactly what a clean store gives; whatever loaded, the
    store afterwards holds each document's own KV or nothing."""
    from kvstore.connectors.blend import BlendConfig, Blender
    from kvstore.connectors.reference import Engine, build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", seed=4)
    engine = Engine.load(model_dir)
    rng = random.Random(1)
    docs = [[rng.randrange(6, 4096) for _ in range(n)] for n in (64, 47, 96, 33)]
    query = [rng.randrange(6, 4096) for _ in range(12)]
    clean = KVStore(engine.kv_spec(), {"chunk_size": 32, "tiers": {"cpu": {"capacity": "8MiB"}}})
    reference = Blender(engine, clean, BlendConfig(recompute_ratio=0.0))
    mild = {k: v / 6 for k, v in READS.items()}  # so that some rounds load every document
    cfg = {"chunk_size": 32, "tiers": {"fault": {"wraps": "disk", "path": str(tmp_path / "kv"),
                                                 "capacity": "64MiB", "seed": 11, **mild}}}
    whole = 0
    with KVStore(engine.kv_spec(), cfg) as store:
        blender = Blender(engine, store, BlendConfig(recompute_ratio=0.0))
        for _round in range(12):
            order = [docs[i] for i in rng.sample(range(len(docs)), len(docs))]
            got = blender.blend(order, query)
            if got.reused_tokens == sum(map(len, docs)):
                whole += 1
                want = reference.blend(order, query)
                assert torch.allclose(got.logits, want.logits, atol=1e-4), "a document's KV was not its own"
            store.flush()
        blender.close()
        for doc in docs:
            hit, kv = store.get(doc)
            if hit:
                assert torch.allclose(kv[:, :, :hit].float(), engine.prefill_kv(doc)[0][:, :, :hit].float(),
                                      atol=1e-3), "the store holds another document's KV"
    reference.close()
    clean.close()
    assert whole > 0  # some rounds loaded every document (else the comparison never ran)


# ---- a full disk: a real, small file system ------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (mounting needs root: CI runs as root, so there it must work)."""
    import os
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"cannot mount a tmpfs for the full-disk test: {r.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_counted_said_twice_and_recovers(spec, small_fs, caplog):
    """ENOSPC on every write: puts go on (the memory tier still takes them), failures are
    counted, the log says it once when writes start failing and once when they succeed again,
    no partial file is left, what is on disk still reads exactly, and writes resume once space
    returns."""
    filler = small_fs / "filler"
    cfg = {"chunk_size": CHUNK, "tiers": {"cpu": {"capacity": "256KiB"},
                                          "disk": {"path": str(small_fs / "kv"), "capacity": "64MiB"}}}
    early = prompts(4, seed=7)
    with caplog.at_level("WARNING", logger="kvstore.tiers.disk"), KVStore(spec, cfg) as s:
        for p in early:
            s.put(p, causal_kv(spec, p))
        s.flush()
        with open(filler, "wb", buffering=0) as f:  # the rest of the file system
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        rng = random.Random(2)
        later = [[rng.randrange(1, 5000) for _ in range(256)] for _ in range(12)]
        for p in later:
            s.put(p, causal_kv(spec, p))  # never raises
        s.flush()
        disk = s.stats()["tiers"]["disk"]
        assert disk["write_errors"] > 0
        failing = [r for r in caplog.records if "writes under" in r.getMessage()]
        assert len(failing) == 1 and "No space left" in failing[0].getMessage()
        assert not list((small_fs / "kv").rglob("*.tmp")), "a partial file was left behind"
        for p in early:  # what is on disk still reads, exactly (past the small memory tier)
            hit, got = s.get(p)
            assert hit == len(p)
            exact_or_miss(spec, p, hit, got)
        filler.unlink()  # space returns
        more = [[rng.randrange(1, 5000) for _ in range(64)] for _ in range(4)]
        for p in more:
            s.put(p, causal_kv(spec, p))
        s.flush()
        assert any("succeed again" in r.getMessage() for r in caplog.records)
        assert s.stats()["tiers"]["disk"]["puts"] > disk["puts"]
    with KVStore(spec, {"chunk_size": CHUNK, "tiers": {"disk": {"path": str(small_fs / "kv"),
                                                               "capacity": "64MiB"}}}) as s:
        for p in early + more:  # a fresh store on the same directory
            hit, got = s.get(p)
            assert hit == len(p)
            exact_or_miss(spec, p, hit, got)


# ---- durability: what survives kill -9 -----------------------------------------------------------

_KILLED = """
import sys, random
sys.path.insert(0, {tests!r})
from conftest import causal_kv
from test_faults import CHUNK
from kvstore import KVSpec, KVStore
import torch
spec = KVSpec(model_id="test/tiny", num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float16)
s = KVStore(spec, {{"chunk_size": CHUNK, "tiers": {{"cpu": {{"capacity": "1MiB"}},
             "disk": {{"path": {path!r}, "capacity": "64MiB", "fsync": {fsync}}}}}}})
rng = random.Random(0)
for i in range(400):
    p = [rng.randrange(1, 5000) for _ in range(rng.randrange(8, 200))]
    s.put(p, causal_kv(spec, p))
    if i == 40:
        s.flush()
        print("flushed", flush=True)  # the first 41 prompts are on disk now
"""


@pytest.mark.parametrize("fsync", [False, True], ids=["no-fsync", "fsync"])
def test_what_flush_returned_for_survives_kill_9(spec, tmp_path, fsync):
    """A process killed with SIGKILL while it writes: every prompt stored before its flush()
    returned is served whole to a new store, with either fsync setting; what it was writing
    after is exact or a miss; its partial files are removed at the next start."""
    import signal
    import subprocess
    import sys

    tests = str(Path(__file__).parent)
    child = subprocess.Popen([sys.executable, "-c", _KILLED.format(tests=tests, path=str(tmp_path / "kv"),
                                                                    fsync=fsync)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "flushed"
    import time

    time.sleep(0.3)  # mid-way through the later puts
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    rng = random.Random(0)
    ps = [[rng.randrange(1, 5000) for _ in range(rng.randrange(8, 200))] for _ in range(400)]
    with KVStore(spec, {"chunk_size": CHUNK, "tiers": {"disk": {"path": str(tmp_path / "kv"),
                                                               "capacity": "64MiB"}}}) as s:
        for i, p in enumerate(ps):
            hit, got = s.get(p)
            exact_or_miss(spec, p, hit, got)
            if i <= 40:
                assert hit == len(p), f"prompt {i}, stored before flush() returned, lost {len(p) - hit} tokens"
    assert not list((tmp_path / "kv").rglob("*.tmp"))


def test_hf_generate_on_a_faulty_store_is_plain_generate(tmp_path):
    """transformers' generate() through the HF connector, with every read and write fault on:
    each call gives exactly what generate() without kvstore gives, the boundary prompts
    included (an exact multiple of the chunk, one token more, one less)."""
    transformers = pytest.importorskip("transformers")
    from kvstore.connectors.hf import HFConnector
    from kvstore.connectors.reference import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "hf", seed=5, dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base = torch.arange(10, 200)
    prompts_ = [base[:n][None] for n in (128, 129, 127, 160, 97, 190)]
    want = [model.generate(p, max_new_tokens=6, do_sample=False) for p in prompts_]
    cfg = {"chunk_size": 32, "tiers": {"cpu": {"capacity": "128KiB"}, "fault": {
        "wraps": "disk", "path": str(tmp_path / "kv"), "capacity": "64MiB", "seed": 3, **READS, **WRITES}}}
    hits = 0
    with HFConnector(model, cfg) as conn:
        for _round in range(3):
            for p, w in zip(prompts_, want):
                assert torch.equal(conn.generate(p, max_new_tokens=6, do_sample=False), w)
                hits += conn.last_hit_tokens
            conn.flush()
    assert hits > 0
