"""PageStore: engine-keyed pages (SGLang HiCache's L3) in real disk, Redis and daemon tiers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import stall_writes

from kvstore.config import load_config
from kvstore.errors import ConfigError, InvalidInputError
from kvstore.pagestore import PageStore

IDENT = {"engine": "test", "model": "m", "tp": (0, 1), "layout": "layer_first"}


def pages(n: int, seed: int = 0, numel: int = 2 * 4 * 16 * 2 * 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g).to(torch.bfloat16) for _ in range(n)]


def disk_only(path: Path, **opts: object) -> dict:
    return {"tiers": {"disk": {"path": str(path), "capacity": "64MiB", **opts}}}


@pytest.mark.parametrize("codec", ["raw", "lz4"])
def test_pages_round_trip_bit_exact_and_survive_reopen(tmp_path, codec):
    keys = [f"{i:064x}" for i in range(6)]
    src = pages(6)
    ps = PageStore(load_config(disk_only(tmp_path)), IDENT, codec=codec, tokens_per_page=16)
    assert ps.put(keys, src) == 6 and ps.put(keys, src) == 0  # present pages are not rewritten
    ps.close()
    ps = PageStore(load_config(disk_only(tmp_path)), IDENT, codec=codec, tokens_per_page=16)
    outs = [torch.zeros_like(p) for p in src]
    assert ps.get_into(keys, outs) == [True] * 6
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(src, outs))
    assert ps.leading_hits(keys[:3] + ["absent"] + keys[3:]) == 3
    ps.close()


def test_another_identity_or_geometry_never_gets_these_pages(tmp_path):
    keys = ["a", "b"]
    ps = PageStore(load_config(disk_only(tmp_path)), IDENT, tokens_per_page=16)
    ps.put(keys, pages(2))
    other = PageStore(load_config(disk_only(tmp_path / "x")), {**IDENT, "tp": (1, 2)}, tokens_per_page=16)
    assert other.object_key("a") != ps.object_key("a")
    # Same identity, but the engine now asks for a page of another dtype or size: a counted miss.
    out = [torch.zeros(2 * 4 * 16 * 2 * 8, dtype=torch.float16), torch.zeros(10, dtype=torch.bfloat16)]
    assert ps.get_into(keys, out) == [False, False]
    assert ps.stats()["tiers"]["disk"]["corrupt"] == 2
    assert ps.exists(keys) == [False, False]  # the mismatched objects were dropped
    other.close()
    ps.close()


def test_a_salt_separates_pages_the_identity_cannot_tell_apart(tmp_path):
    ps = PageStore(load_config(disk_only(tmp_path)), IDENT, tokens_per_page=16)
    ps.put(["a"], pages(1))
    ps.flush()
    salted = PageStore(load_config({**disk_only(tmp_path), "salt": "patched-rope"}), IDENT, tokens_per_page=16)
    same = PageStore(load_config(disk_only(tmp_path)), IDENT, tokens_per_page=16)
    assert salted.exists(["a"]) == [False] and same.exists(["a"]) == [True]
    for store in (ps, salted, same):
        store.close()


def test_corrupt_page_on_disk_is_a_miss(tmp_path):
    ps = PageStore(load_config(disk_only(tmp_path)), IDENT)
    src = pages(1)
    ps.put(["k"], src)
    ps.flush()
    files = [f for f in tmp_path.rglob("*") if f.is_file() and f.stat().st_size > 1000]
    assert len(files) == 1
    raw = bytearray(files[0].read_bytes())
    raw[-7] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    out = [torch.zeros_like(src[0])]
    assert ps.get_into(["k"], out) == [False]  # read in place, then refused: the engine must not use it
    assert ps.stats()["tiers"]["disk"]["corrupt"] == 1
    assert ps.exists(["k"]) == [False]  # removed, so the next prefetch does not read it again
    ps.close()


def test_redis_and_daemon_tiers_share_pages_between_stores(tmp_path, redis_url, daemon):
    keys = [f"p{i}" for i in range(4)]
    src = pages(4, seed=3)
    for tiers in ({"redis": {"url": redis_url}}, {"remote": {"url": daemon.url}}):
        writer = PageStore(load_config({"tiers": tiers}), IDENT)
        reader = PageStore(load_config({"tiers": tiers}), IDENT)  # another engine, same cache
        assert writer.put(keys, src) == 4
        outs = [torch.empty_like(p) for p in src]
        assert reader.get_into(keys, outs) == [True] * 4
        assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(src, outs))
        writer.close()
        reader.close()


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="cachegen"):
        PageStore(load_config(disk_only(tmp_path)), IDENT, codec="cachegen")
    ps = PageStore(load_config(disk_only(tmp_path)), IDENT)
    with pytest.raises(InvalidInputError, match="2 keys but 1 pages"):
        ps.put(["a", "b"], pages(1))
    with pytest.raises(InvalidInputError, match="1 keys but 0 output pages"):
        ps.get_into(["a"], [])
    ps.close()


def test_engine_reusing_its_page_memory_after_put_changes_nothing_stored(tmp_path):
    """Pages go in without a copy up front; whatever the store keeps (memory tier, queued disk
    writes) must be its own copy, because the engine overwrites the page right after."""
    cfg = {"tiers": {"cpu": {"capacity": "1MiB"}, "disk": {"path": str(tmp_path), "capacity": "8MiB"}}}
    ps = PageStore(load_config(cfg), IDENT)
    src = pages(3, seed=5)
    kept = [p.clone() for p in src]
    with stall_writes(ps.store.tiers[1]):
        assert ps.put(["a", "b", "c"], src) == 3
        for p in src:
            p.zero_()  # the engine reuses the memory before the disk writer has run
    ps.flush()
    outs = [torch.empty_like(p) for p in kept]
    assert ps.get_into(["a", "b", "c"], outs) == [True] * 3  # from the memory tier
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(kept, outs))
    ps.close()
    disk = PageStore(load_config(disk_only(tmp_path, capacity="8MiB")), IDENT)
    outs = [torch.empty_like(p) for p in kept]
    assert disk.get_into(["a", "b", "c"], outs) == [True] * 3  # what the disk writer wrote
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(kept, outs))
    disk.close()


def test_concurrent_backup_and_prefetch_threads_never_see_wrong_bytes(tmp_path):
    """SGLang backs pages up and prefetches them from two threads at once. With a memory tier
    small enough to evict (demoting to disk) all the time, every read is the exact page or a miss."""
    import threading

    cfg = {"put_timeout_s": 30,  # a loaded CI machine must not drop a queued disk write
           "tiers": {"cpu": {"capacity": 6 * 4096 + 6 * 512}, "disk": {"path": str(tmp_path), "capacity": "8MiB"}}}
    ps = PageStore(load_config(cfg), IDENT)
    src = {f"k{i}": p for i, p in enumerate(pages(40, seed=11))}
    errors: list[str] = []
    hits = [0]

    def writer() -> None:
        keys = list(src)
        for i in range(0, len(keys), 4):
            ps.put(keys[i:i + 4], [src[k] for k in keys[i:i + 4]])

    def reader(seed: int) -> None:
        rng = __import__("random").Random(seed)
        for _ in range(300):
            keys = rng.sample(list(src), 3)
            outs = [torch.empty_like(src[k]) for k in keys]
            for key, ok, out in zip(keys, ps.get_into(keys, outs), outs):
                if ok:
                    hits[0] += 1
                    if not torch.equal(out.view(torch.int16), src[key].view(torch.int16)):
                        errors.append(key)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ps.flush()
    assert not errors
    assert hits[0] > 0
    assert ps.stats()["tiers"]["cpu"]["evictions"] > 0  # the memory tier really was churning
    outs = [torch.empty_like(p) for p in src.values()]
    assert ps.get_into(list(src), outs) == [True] * 40  # in the end everything is on disk, exact
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(src.values(), outs))
    ps.close()
