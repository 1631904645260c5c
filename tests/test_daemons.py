"""Several `kvstore serve` daemons in front of one real Redis/Valkey cluster: keys spread over
them by rendezvous hashing, a daemon killed means misses or answers from the cluster (never
errors), its share comes back with it, and a prefill engine on daemon A hands a decode engine
on daemon B the exact KV."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import Daemon, causal_kv
from kvstore import KVStore
from kvstore.client import DaemonClient
from kvstore.connectors.reference import Engine, build_tiny_model
from kvstore.spread import DaemonGroup, connect, daemon_urls

pytestmark = pytest.mark.slow


def remote(url: str, cpu: str | None = None, **opts: object) -> dict:
    tiers: dict = {"remote": {"url": url, **opts}}
    if cpu:
        tiers["cpu"] = {"capacity": cpu}
    return {"chunk_size": 16, "tiers": tiers}


def test_rendezvous_placement():
    """The same daemons in any order place every key alike; shares are even; losing a daemon
    moves only its own keys; the URL forms parse."""
    urls = ["kvstore://127.0.0.1:7001", "kvstore://127.0.0.1:7002", "kvstore://127.0.0.1:7003"]
    a, b = DaemonGroup(urls), DaemonGroup(list(reversed(urls)))
    keys = [i.to_bytes(8, "little") * 4 for i in range(3000)]
    url_of = lambda g, k: g.members[g.owner(k)].client.url  # noqa: E731
    assert all(url_of(a, k) == url_of(b, k) for k in keys)
    shares = {u: sum(1 for k in keys if url_of(a, k) == u) for u in urls}
    assert all(800 < n < 1200 for n in shares.values()), shares
    before = {k: url_of(a, k) for k in keys}
    a.members[0].backoff.failed(ConnectionError("down"))  # the first daemon is in back-off
    moved = [k for k in keys if url_of(a, k) != before[k]]
    assert moved and all(before[k] == urls[0] for k in moved)
    assert sum(1 for k in keys if before[k] == urls[0]) == len(moved)
    assert daemon_urls("kvstore://h1:1,h2:2") == ["kvstore://h1:1", "kvstore://h2:2"]
    assert daemon_urls("kvstore://h1:1, kvstores://h2:2") == ["kvstore://h1:1", "kvstores://h2:2"]
    assert isinstance(connect("kvstore://h1:1"), DaemonClient)
    with pytest.raises(ValueError, match="listed twice"):
        DaemonGroup(["kvstore://h:1", "kvstore://h:1"])
    with pytest.raises(Exception, match="several daemons"):
        DaemonClient("kvstore://h1:1,h2:2")
    for g in (a, b):
        g.close()


@pytest.fixture
def two_daemons(tmp_path, redis_cluster):
    """Daemons A and B, memory tiers of their own, both writing through to one cluster."""
    extra = ("--no-disk", "--redis-url", redis_cluster.url, "--cpu-capacity", "32MiB")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    daemons = [Daemon(tmp_path / name, *extra) for name in ("a", "b")]
    yield daemons
    for d in daemons:
        if d.proc is not None:
            d.stop()


def test_put_through_one_daemon_hits_through_another(spec, two_daemons):
    a, b = two_daemons
    toks = list(range(300))
    kv = causal_kv(spec, toks)
    with KVStore(spec, remote(a.url)) as store:
        store.put(toks, kv)
        assert store.flush(10)
    deadline = time.monotonic() + 10
    with KVStore(spec, remote(b.url)) as store:  # another engine on daemon B: B reads the cluster
        while store.lookup(toks) < 300 and time.monotonic() < deadline:
            time.sleep(0.1)  # A writes through to the cluster asynchronously
        hit, out = store.get(toks)
        assert hit == 300 and torch.equal(out, kv)
    assert DaemonClient(b.url).stats()["tiers"]["redis"]["hits"] > 0


def test_a_killed_daemon_costs_misses_and_its_share_comes_back(spec, two_daemons):
    """Engines list both daemons. Killing B: no exception, no wrong bytes; B's keys are answered
    by A from the cluster. B restarted: within the back-off cap, new keys reach B again."""
    a, b = two_daemons
    group_url = f"{a.url},{b.url.split('://')[1]}"
    prompts = [[p * 1000 + i for i in range(64)] for p in range(12)]
    with KVStore(spec, remote(group_url, timeout_s=1.0)) as store:
        for p in prompts:
            store.put(p, causal_kv(spec, p))
        assert store.flush(10)
        per_daemon = [DaemonClient(d.url).stats()["tiers"]["cpu"]["objects"] for d in (a, b)]
        assert all(n > 0 for n in per_daemon), f"keys not spread: {per_daemon}"
        time.sleep(1.0)  # both daemons' write-through to the cluster
        b.stop(9)
        for p in prompts:  # B's share: misses at first at most, then A answers from the cluster
            hit, out = store.get(p)
            assert torch.equal(out[:, :, :hit], causal_kv(spec, p)[:, :, :hit])
        hits = [store.get(p)[0] for p in prompts]
        assert hits == [64] * len(prompts), hits
        b.start()
        fresh = [[p * 1000 + i for i in range(64)] for p in range(100, 140)]
        deadline = time.monotonic() + 15
        while DaemonClient(b.url).stats()["tiers"]["cpu"]["objects"] == 0:
            assert time.monotonic() < deadline, "daemon B never got its share back"
            p = fresh.pop()
            store.put(p, causal_kv(spec, p))
            store.flush(5)
            time.sleep(0.5)


PREFILL = textwrap.dedent("""
    import json, sys, torch
    from kvstore import KVStore
    from kvstore.connectors.hooks import KVHooks
    from kvstore.connectors.reference import Engine, SamplingParams
    model_dir, url, prompt_file, out = sys.argv[1:5]
    prompt = json.load(open(prompt_file))
    engine = Engine.load(model_dir)
    store = KVStore(engine.kv_spec(), {"chunk_size": 32, "tiers": {"remote": {"url": url}}})
    engine.attach(KVHooks(store))
    gen = engine.generate(prompt, SamplingParams(max_new_tokens=1))
    assert gen.hit_tokens == 0, gen
    assert store.flush(30)
    kv, _ = engine.prefill_kv(prompt)
    torch.save(kv, out)
    store.close()
""")

DECODE = textwrap.dedent("""
    import json, sys, torch
    from kvstore import KVStore
    from kvstore.connectors.hooks import KVHooks
    from kvstore.connectors.reference import Engine, SamplingParams
    model_dir, url, prompt_file, kv_file, out = sys.argv[1:6]
    prompt = json.load(open(prompt_file))
    engine = Engine.load(model_dir)
    store = KVStore(engine.kv_spec(), {"chunk_size": 32, "tiers": {"remote": {"url": url}}})
    hit, kv = store.get(prompt)
    want = torch.load(kv_file)
    exact = hit == len(prompt) and kv.dtype == want.dtype and torch.equal(kv, want)
    engine.attach(KVHooks(store))
    gen = engine.generate(prompt, SamplingParams(max_new_tokens=12))
    plain = Engine.load(model_dir).generate(prompt, SamplingParams(max_new_tokens=12))
    json.dump({"hit": hit, "exact": bool(exact), "engine_hit": gen.hit_tokens, "tokens": gen.tokens,
               "plain_tokens": plain.tokens,
               "logit_diff": float((gen.first_logits - plain.first_logits).abs().max())}, open(out, "w"))
    store.close()
""")


def test_prefill_on_daemon_a_decode_on_daemon_b(tmp_path, two_daemons):
    """Disaggregated serving: the prefill engine process stores a prompt's KV through daemon A;
    a decode engine process attached to daemon B loads it byte-exact and generates what an
    engine without kvstore generates."""
    a, b = two_daemons
    model_dir = build_tiny_model(tmp_path / "model", seed=5)
    prompt = [(i * 37 + 11) % 4000 + 6 for i in range(200)]  # 6 whole chunks and a tail of 8
    (tmp_path / "prompt.json").write_text(json.dumps(prompt))
    kv_file, result = tmp_path / "kv.pt", tmp_path / "decode.json"
    run = lambda script, *args: subprocess.run([sys.executable, "-c", script, *map(str, args)],  # noqa: E731
                                               check=True, timeout=300, capture_output=True)
    run(PREFILL, model_dir, a.url, tmp_path / "prompt.json", kv_file)
    spec = Engine.load(model_dir).kv_spec()
    with KVStore(spec, {"chunk_size": 32, "tiers": {"remote": {"url": b.url}}}) as probe:
        deadline = time.monotonic() + 10
        while probe.lookup(prompt) < len(prompt):  # A writes through to the cluster asynchronously
            assert time.monotonic() < deadline, "daemon B never saw the prompt in the cluster"
            time.sleep(0.2)
    run(DECODE, model_dir, b.url, tmp_path / "prompt.json", kv_file, result)
    got = json.loads(result.read_text())
    assert got["hit"] == len(prompt) and got["exact"], got
    assert got["engine_hit"] == len(prompt) and got["tokens"] == got["plain_tokens"], got
    assert got["logit_diff"] < 1e-4, got


def test_a_put_larger_than_the_daemons_body_limit_is_split(spec, tmp_path):
    """A 64-chunk prompt in one put, to a daemon whose --max-body-bytes holds a few objects: the
    413 splits the batch until it fits, and a fresh engine hits the whole prompt."""
    d = Daemon(tmp_path, "--no-disk", "--max-body-bytes", "20000")
    try:
        toks = list(range(64 * 16))
        kv = causal_kv(spec, toks)
        for cpu in (None, "1MiB"):  # the daemon as first tier (one call), then behind memory (its writer)
            DaemonClient(d.url).delete([r.key for r in KVStore(spec, remote(d.url)).chunks(toks)])
            with KVStore(spec, remote(d.url, cpu=cpu)) as store:
                store.put(toks, kv)
                assert store.flush(10)
                assert store.stats()["tiers"]["remote"]["write_errors"] == 0
            with KVStore(spec, remote(d.url)) as fresh:
                hit, out = fresh.get(toks)
                assert hit == len(toks) and torch.equal(out, kv)
    finally:
        d.stop()


def test_a_daemon_that_refuses_the_key_gives_its_share_away(spec, tmp_path):
    """Daemon A is open, daemon C rejects the engines' key (401): C's share goes to A and C is
    skipped, so every chunk is stored and hits; nothing raises."""
    (tmp_path / "a").mkdir()
    (tmp_path / "c").mkdir()
    kf = tmp_path / "keys.yaml"
    kf.write_text("keys:\n  sk-other: {tenant: other}\n")
    a, c = Daemon(tmp_path / "a", "--no-disk"), Daemon(tmp_path / "c", "--no-disk", key_file=kf)
    try:
        toks = list(range(20 * 16))
        kv = causal_kv(spec, toks)
        url = f"{a.url},{c.url.split('://')[1]}"
        with KVStore(spec, remote(url, api_key="sk-engine")) as store:
            store.put(toks, kv)
            hit, out = store.get(toks)
            assert hit == len(toks) and torch.equal(out, kv)
            group = store.tiers[0].client
            assert not group.members[1].backoff.available
    finally:
        a.stop()
        c.stop()
