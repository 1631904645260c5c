"""The engine-facing contract on in-memory and disk tiers."""

import numpy as np
import pytest
import torch

from conftest import causal_kv, disk_config, mem_config
from kvstore import InvalidInputError, KVKind, KVSpec, KVStore


def test_put_lookup_get_roundtrip(spec):
    toks = list(range(100))
    kv = causal_kv(spec, toks)
    with KVStore(spec, mem_config()) as store:
        assert store.lookup(toks) == 0
        assert store.get(toks)[0] == 0
        assert store.put(toks, kv) == 7  # 6 full chunks of 16 + a 4-token tail
        assert store.put(toks, kv) == 0  # nothing new
        assert store.lookup(toks) == 100
        hit, out = store.get(toks)
        assert hit == 100 and torch.equal(out, kv)
        # A prefix of the stored sequence hits on the chunk grid.
        assert store.lookup(toks[:50]) == 48
        hit, out = store.get(toks[:50])
        assert hit == 48 and torch.equal(out, kv[:, :, :48])
        # A longer prompt (the next chat turn) hits the full chunks and the stored 4-token tail.
        longer = toks + [1, 2, 3]
        assert store.lookup(longer) == 100
        hit, out = store.get(longer)
        assert hit == 100 and torch.equal(out, kv)
        # ...but not a tail that differs from it.
        assert store.lookup(toks[:98] + [7, 7, 7]) == 96
        # Diverging after chunk 2.
        assert store.lookup(toks[:40] + [9999] * 30) == 32


def test_tensor_and_numpy_tokens(spec):
    toks = list(range(40))
    kv = causal_kv(spec, toks)
    with KVStore(spec, mem_config()) as store:
        store.put(torch.tensor(toks), kv)
        assert store.lookup(np.array(toks, dtype=np.int64)) == 40
        assert store.get(torch.tensor(toks, dtype=torch.int32))[0] == 40


def test_get_into_caller_buffer(spec):
    toks = list(range(64))
    kv = causal_kv(spec, toks)
    with KVStore(spec, mem_config()) as store:
        store.put(toks, kv)
        buf = torch.zeros(spec.chunk_shape(80), dtype=spec.dtype)
        hit, view = store.get(toks + [5] * 16, out=buf)
        assert hit == 64 and view.data_ptr() == buf.data_ptr()
        assert torch.equal(buf[:, :, :64], kv) and not buf[:, :, 64:].any()
        with pytest.raises(InvalidInputError, match="holds 10 tokens"):
            store.get(toks, out=torch.empty(spec.chunk_shape(10), dtype=spec.dtype))
        with pytest.raises(InvalidInputError, match="dtype"):
            store.get(toks, out=torch.empty(spec.chunk_shape(64), dtype=torch.float32))


def test_returned_kv_is_a_copy(spec):
    """Mutating what get returned, or the tensor that was put, never changes the cache."""
    toks = list(range(32))
    kv = causal_kv(spec, toks)
    with KVStore(spec, mem_config()) as store:
        store.put(toks, kv.clone())
        _, out = store.get(toks)
        out.fill_(0)
        assert torch.equal(store.get(toks)[1], kv)


@pytest.mark.parametrize("make_bad,msg", [
    (lambda s: torch.zeros(2, 2, 10, 2, 8, dtype=torch.float32), "dtype"),
    (lambda s: torch.zeros(2, 2, 10, 2, 4, dtype=torch.float16), r"shape \(2, 2, 10, 2, 4\)"),
    (lambda s: torch.zeros(3, 2, 10, 2, 8, dtype=torch.float16), "shape"),
    (lambda s: torch.zeros(2, 2, 9, 2, 8, dtype=torch.float16), r"expected \(2, 2, 10, 2, 8\)"),
    (lambda s: [1, 2, 3], "torch.Tensor"),
])
def test_bad_kv_is_rejected_and_nothing_lost(spec, make_bad, msg):
    toks = list(range(10))
    good = list(range(100, 132))
    with KVStore(spec, mem_config()) as store:
        store.put(good, causal_kv(spec, good))
        with pytest.raises(InvalidInputError, match=msg):
            store.put(toks, make_bad(spec))
        assert store.lookup(good) == 32 and store.lookup(toks) == 0


def test_bad_tokens_rejected(spec):
    with KVStore(spec, mem_config()) as store:
        with pytest.raises(InvalidInputError, match="integers"):
            store.lookup([1.5, 2.0])
        with pytest.raises(InvalidInputError):
            store.put([1, -2], torch.zeros(spec.chunk_shape(2), dtype=spec.dtype))
        with pytest.raises(InvalidInputError, match="ttl_s"):
            store.pin([1, 2], ttl_s=-1)


def test_save_partial_off(spec):
    toks = list(range(20))
    with KVStore(spec, mem_config(save_partial=False)) as store:
        assert store.put(toks, causal_kv(spec, toks)) == 1
        assert store.lookup(toks) == 16


def test_models_and_tenants_do_not_share(spec, tmp_path):
    toks = list(range(32))
    other = KVSpec(model_id="test/other", num_layers=2, num_kv_heads=2, head_size=8)
    cfg = disk_config(tmp_path)
    with KVStore(spec, cfg) as a:
        a.put(toks, causal_kv(spec, toks))
        a.flush()
    with KVStore(other, cfg) as b:
        assert b.lookup(toks) == 0
    with KVStore(spec, {**cfg, "tenant": "someone-else"}) as c:
        assert c.lookup(toks) == 0
    with KVStore(spec, cfg) as d:
        assert d.lookup(toks) == 32


def test_mla_and_bfloat16_specs():
    spec = KVSpec(model_id="test/mla", num_layers=3, num_kv_heads=1, head_size=16, dtype=torch.bfloat16,
                  kv_kind=KVKind.MLA)
    toks = list(range(40))
    kv = torch.randn(3, 1, 40, 16).to(torch.bfloat16)
    with KVStore(spec, mem_config()) as store:
        store.put(toks, kv)
        hit, out = store.get(toks)
        assert hit == 40 and torch.equal(out, kv)
    with pytest.raises(InvalidInputError, match="num_kv_heads=1"):
        KVSpec(model_id="x", num_layers=1, num_kv_heads=2, head_size=4, kv_kind="mla")
    with pytest.raises(InvalidInputError, match="unsupported KV dtype"):
        KVSpec(model_id="x", num_layers=1, num_kv_heads=2, head_size=4, dtype=torch.int64)


def test_layerwise_get(spec, tmp_path):
    toks = list(range(70))
    kv = causal_kv(spec, toks)
    with KVStore(spec, disk_config(tmp_path, cpu="64KiB")) as store:
        store.put(toks, kv)
        store.flush()
        handle = store.get_layers(toks + [1])
        assert handle.hit_tokens == 70
        for layer, t in handle:
            assert torch.equal(t, kv[layer])
        hit, out = handle.result()
        assert hit == 70 and torch.equal(out, kv)
        with pytest.raises(InvalidInputError):
            handle.wait(5)
        tiers = store.stats()["tiers"]
        served = [name for name, t in tiers.items() if t["hits"]]
        assert served and all(tiers[name]["load_seconds"] > 0 for name in served)


def test_layerwise_put(spec):
    toks = list(range(50))
    kv = causal_kv(spec, toks)
    with KVStore(spec, mem_config()) as store:
        store.put(toks[:16], kv[:, :, :16])
        writer = store.begin_put(toks)
        assert writer.new_chunks == 3
        writer.put_layer(0, kv[0])
        assert store.lookup(toks) == 16  # not visible before the last layer
        with pytest.raises(InvalidInputError, match="layers \\[1\\]"):
            writer.commit()
        with pytest.raises(InvalidInputError, match="expected"):
            writer.put_layer(1, kv[1, :, :10])
        writer.put_layer(1, kv[1])
        assert writer.committed
        hit, out = store.get(toks)
        assert hit == 50 and torch.equal(out, kv)


def test_stats_shape(spec, tmp_path):
    toks = list(range(40))
    with KVStore(spec, disk_config(tmp_path)) as store:
        store.put(toks, causal_kv(spec, toks))
        store.get(toks)
        store.flush()
        st = store.stats()
    assert st["gets"] == 1 and st["get_hit_tokens"] == 40 and st["put_new_chunks"] == 3
    assert st["get_tokens"] == 40 and st["get_miss_tokens"] == 0
    assert st["tiers"]["cpu"]["hits"] == 3 and st["tiers"]["disk"]["objects"] == 3
    for key in ("evictions", "demotions", "promotions", "corrupt", "dropped_writes", "pinned_bytes", "bytes"):
        assert key in st["tiers"]["cpu"]


def test_close_is_idempotent(spec):
    store = KVStore(spec, mem_config())
    store.close()
    store.close()


def test_stats_of_an_untouched_tier_have_every_counter(spec, tmp_path):
    with KVStore(spec, disk_config(tmp_path)) as store:
        st = store.stats()
    for tier in ("cpu", "disk"):
        assert st["tiers"][tier]["hits"] == 0 and st["tiers"][tier]["load_seconds"] == 0


def test_put_of_a_suffix_stores_only_its_chunks(spec):
    toks = list(range(64))
    kv = causal_kv(spec, toks)
    with KVStore(spec, mem_config(chunk=16)) as store:
        assert store.put(toks, kv[:, :, 32:], kv_start=32) == 2  # chunks 2 and 3
        assert store.lookup(toks) == 0  # chunks 0 and 1 were never given
        store.put(toks[:32], kv[:, :, :32])
        hit, got = store.get(toks)
        assert hit == 64 and torch.equal(got, kv)
        with pytest.raises(InvalidInputError, match="multiple of chunk_size"):
            store.put(toks, kv[:, :, 8:], kv_start=8)
        with pytest.raises(InvalidInputError, match="does not match"):
            store.put(toks, kv, kv_start=32)  # kv must hold exactly tokens[kv_start:]
