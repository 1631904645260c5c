"""kvstore as SGLang's HiCache L3 storage, loaded through SGLang's own dynamic-backend factory
and driven through its storage interface with pages hashed by SGLang's own ``get_hash_str``.

Needs the sglang package (0.5.23), which is too heavy for the main environment:
scripts/test_sglang.sh installs it in its own venv and runs this file (CI runs that step).
Elsewhere it skips, unless KVSTORE_SGLANG_TESTS=1 says it must run.

SGLang's real host pool (``MHATokenToKVPoolHost``) cannot be built here: its module imports
SGLang's model configs, which import torchvision, and PyPI's torchvision does not load against
the CPU torch build. ``HostPool`` below is the part of it a storage backend touches (page
indexing in SGLang's ``layer_first`` and ``page_first`` layouts, the same slicing as its code).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import Daemon

try:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig, PoolName
    from sglang.srt.mem_cache.storage import StorageBackendFactory
    from sglang.srt.mem_cache.utils import get_hash_str
except ImportError:
    if os.environ.get("KVSTORE_SGLANG_TESTS") == "1":
        raise
    pytest.skip("sglang not installed here: scripts/test_sglang.sh runs this file", allow_module_level=True)

from kvstore.connectors.sglang import KVStoreHiCacheStorage

from kvstore.errors import ConfigError

PAGE, LAYERS, HEADS, DIM = 16, 4, 2, 8


class HostPool:
    """SGLang's MHA host pool as its storage backend sees it (pool_host/mha.py)."""

    def __init__(self, pages: int, layout: str = "layer_first", seed: int = 0) -> None:
        self.page_size, self.layout, self.dtype = PAGE, layout, torch.bfloat16
        self.layer_num, self.head_num, self.head_dim = LAYERS, HEADS, DIM
        self.size = pages * PAGE
        g = torch.Generator().manual_seed(seed)
        dims = (2, LAYERS, self.size, HEADS, DIM) if layout == "layer_first" else (2, self.size, LAYERS, HEADS, DIM)
        self.kv_buffer = torch.randn(dims, generator=g).to(self.dtype)

    def _page(self, index: int) -> torch.Tensor:
        if self.layout == "layer_first":
            return self.kv_buffer[:, :, index:index + PAGE]
        return self.kv_buffer[:, index:index + PAGE]

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self._page(index)
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(2 * LAYERS * PAGE * HEADS * DIM, dtype=self.dtype)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        page = self._page(index)
        page.copy_(data_page.reshape(page.shape))


class MLAHostPool:
    """SGLang's MLA host pool, page_first layout (pool_host/mla.py): a page is one contiguous
    block, which the backend fills in place."""

    def __init__(self, pages: int, seed: int = 0) -> None:
        self.page_size, self.layout, self.dtype = PAGE, "page_first", torch.bfloat16
        self.layer_num, self.kv_cache_dim = LAYERS, DIM * 4
        g = torch.Generator().manual_seed(seed)
        self.kv_buffer = torch.randn((pages * PAGE, LAYERS, 1, DIM * 4), generator=g).to(self.dtype)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self.kv_buffer[index:index + PAGE]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        raise AssertionError("a page_first MLA page is read in place, never staged")

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        raise AssertionError("a page_first MLA page is read in place, never staged")


def storage_config(kvstore_config: object, tp_rank: int = 0, tp_size: int = 1, mla: bool = False,
                   page_first: bool = False, **extra: object) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=mla,
        enable_storage_metrics=False, is_page_first_layout=page_first, model_name="tiny/model",
        extra_config={"backend_name": "kvstore", "module_path": "kvstore.connectors.sglang",
                      "class_name": "KVStoreHiCacheStorage", "interface_v1": 1, "kvstore_config": kvstore_config,
                      **extra})


def attach(config: HiCacheStorageConfig, pool: HostPool) -> KVStoreHiCacheStorage:
    """What SGLang's cache controller does when it attaches a storage backend."""
    backend = StorageBackendFactory.create_backend("dynamic", config, pool)
    backend.register_mem_pool_host(pool)
    return backend


def page_keys(n: int, seed: int = 0) -> list[str]:
    """SGLang's prefix-chained page hashes for n pages of tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32000, (n * PAGE,), generator=g).tolist()
    keys, prior = [], None
    for i in range(n):
        prior = get_hash_str(tokens[i * PAGE:(i + 1) * PAGE], prior)
        keys.append(prior)
    return keys


def indices(pages: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])


def disk(path) -> dict:
    return {"tiers": {"disk": {"path": str(path), "capacity": "64MiB"}}}


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_pages_move_between_two_engines_host_pools_bit_exact(tmp_path, layout):
    keys = page_keys(5)
    src, dst = HostPool(8, layout, seed=1), HostPool(8, layout, seed=2)
    writer = attach(storage_config(disk(tmp_path), page_first=layout == "page_first"), src)
    reader = attach(storage_config(disk(tmp_path), page_first=layout == "page_first"), dst)
    assert isinstance(writer, KVStoreHiCacheStorage)
    assert writer.batch_set_v1(keys, indices([0, 1, 2, 3, 4])) == [True] * 5
    writer.pages.flush()
    assert reader.batch_exists(keys) == 5
    assert reader.batch_exists(keys[:2] + page_keys(1, seed=9) + keys[2:]) == 2  # a prefix ends at its first gap
    before = dst.kv_buffer.clone()
    assert reader.batch_get_v1(keys, indices([7, 6, 5, 4, 3])) == [True] * 5
    for s, d in zip([0, 1, 2, 3, 4], [7, 6, 5, 4, 3]):
        assert torch.equal(src.get_data_page(s * PAGE).view(torch.int16), dst.get_data_page(d * PAGE).view(torch.int16))
    untouched = dst.get_data_page(0), before[:, :, :PAGE] if layout == "layer_first" else before[:, :PAGE]
    assert torch.equal(untouched[0].view(torch.int16), untouched[1].flatten().view(torch.int16))
    writer.close()
    reader.close()


def test_tensor_per_page_interface(tmp_path):
    """SGLang's older (non interface_v1) path: pages as flat tensors, read into its dummy pages."""
    pool = HostPool(4, seed=3)
    backend = attach(storage_config(disk(tmp_path)), pool)
    keys = page_keys(3, seed=4)
    assert backend.batch_set(keys, [pool.get_data_page(i * PAGE) for i in range(3)])
    got = backend.batch_get(keys + page_keys(1, seed=5), [pool.get_dummy_flat_data_page() for _ in range(4)])
    assert got[3] is None
    assert all(torch.equal(got[i].view(torch.int16), pool.get_data_page(i * PAGE).view(torch.int16)) for i in range(3))
    assert backend.exists(keys[0]) and backend.get(keys[1], pool.get_dummy_flat_data_page()) is not None
    backend.close()


def test_ranks_layouts_and_mla_decide_what_is_shared(tmp_path):
    keys = page_keys(2, seed=6)
    rank0 = attach(storage_config(disk(tmp_path), tp_rank=0, tp_size=2), HostPool(4))
    rank1 = attach(storage_config(disk(tmp_path), tp_rank=1, tp_size=2), HostPool(4))
    other_layout = attach(storage_config(disk(tmp_path), tp_rank=0, tp_size=2, page_first=True),
                          HostPool(4, "page_first"))
    rank0.batch_set_v1(keys, indices([0, 1]))
    rank0.pages.flush()
    assert rank0.batch_exists(keys) == 2
    assert rank1.batch_exists(keys) == 0         # another rank holds other heads
    assert other_layout.batch_exists(keys) == 0  # same numbers in another byte order
    # MLA KV is the same on every rank: one rank writes, every rank reads (in place: page_first
    # MLA pages are contiguous).
    pool0, pool1 = MLAHostPool(4, seed=7), MLAHostPool(4, seed=8)
    mla0 = attach(storage_config(disk(tmp_path), tp_rank=0, tp_size=2, mla=True, page_first=True), pool0)
    mla1 = attach(storage_config(disk(tmp_path), tp_rank=1, tp_size=2, mla=True, page_first=True), pool1)
    assert mla1.batch_set_v1(keys, indices([0, 1])) == [True, True]  # not the writer: skipped
    mla1.pages.flush()
    assert mla0.batch_exists(keys) == 0
    mla0.batch_set_v1(keys, indices([0, 1]))
    mla0.pages.flush()
    assert mla1.batch_get_v1(keys, indices([3, 2])) == [True, True]
    for s, d in ((0, 3), (1, 2)):
        assert torch.equal(pool0.get_data_page(s * PAGE).view(torch.int16),
                           pool1.get_data_page(d * PAGE).view(torch.int16))
    for b in (rank0, rank1, other_layout, mla0, mla1):
        b.close()


def test_daemon_tier_shares_pages_across_processes(tmp_path):
    daemon = Daemon(tmp_path)
    try:
        cfg = {"tiers": {"remote": {"url": daemon.url}}}
        src, dst = HostPool(4, seed=8), HostPool(4, seed=9)
        keys = page_keys(3, seed=10)
        writer, reader = attach(storage_config(cfg), src), attach(storage_config(cfg), dst)
        assert writer.batch_set_v1(keys, indices([0, 1, 2])) == [True] * 3
        assert reader.batch_get_v1(keys, indices([3, 2, 1])) == [True] * 3
        assert torch.equal(src.get_data_page(0).view(torch.int16), dst.get_data_page(3 * PAGE).view(torch.int16))
        writer.close()
        reader.close()
    finally:
        daemon.stop()


def test_a_down_daemon_is_a_miss_not_an_error(tmp_path):
    from conftest import free_port

    backend = attach(storage_config({"tiers": {"remote": {"url": f"kvstore://127.0.0.1:{free_port()}",
                                                          "timeout_s": 0.5}}}), HostPool(2))
    keys = page_keys(1)
    assert backend.batch_exists(keys) == 0
    assert backend.batch_get_v1(keys, indices([0])) == [False]
    backend.batch_set_v1(keys, indices([0]))  # skipped while the daemon is down; never raises
    backend.close()


def test_bad_options_fail_the_attach_with_a_named_problem(tmp_path):
    with pytest.raises(Exception, match="kvstore_codex"):
        attach(storage_config(disk(tmp_path), kvstore_codex="lz4"), HostPool(2))
    with pytest.raises(Exception, match="cachegen"):
        attach(storage_config(disk(tmp_path), kvstore_codec="cachegen"), HostPool(2))
    backend = attach(storage_config(disk(tmp_path)), HostPool(2))
    backend.register_mem_host_pool_v2(HostPool(2), PoolName.KV)
    with pytest.raises(ConfigError, match="mamba pool"):  # a hybrid model's sidecar (v2 calls only)
        backend.register_mem_host_pool_v2(HostPool(2), PoolName.MAMBA)
    backend.close()
    odd = HostPool(2)
    odd.dtype = torch.complex64
    with pytest.raises(Exception, match="complex64"):
        attach(storage_config(disk(tmp_path)), odd)
    with pytest.raises(ConfigError, match="capacty"):
        KVStoreHiCacheStorage(storage_config({"tiers": {"disk": {"path": str(tmp_path), "capacty": 1}}}))


def test_without_a_config_the_default_disk_tier_is_used_without_a_second_memory_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # kvstore's default disk path lives under it
    for name in [n for n in os.environ if n.startswith("KVSTORE_") and not n.endswith("_TESTS")]:
        monkeypatch.delenv(name)
    backend = attach(storage_config(None), HostPool(2))
    assert [t.name for t in backend.pages.store.tiers] == ["disk"]
    assert str(tmp_path) in str(backend.pages.store.tiers[0].config.path)
    backend.close()


def test_the_served_models_weights_and_config_decide_what_is_shared(tmp_path, monkeypatch):
    """SGLang's storage config names the model by its served name only, which two checkpoints
    may share: the backend adds the checkpoint's digest and config from SGLang's server args."""
    import json
    import shutil
    import types

    from kvstore.connectors.reference.weights import DEFAULT_MODEL

    def served(model_dir, **args):
        ns = types.SimpleNamespace(**{"model_path": str(model_dir), "dtype": "auto", "kv_cache_dtype": "auto", **args})
        monkeypatch.setattr("sglang.srt.runtime_context.get_server_args", lambda: ns)

    copy = shutil.copytree(DEFAULT_MODEL, tmp_path / "copy" / "m")
    tuned = shutil.copytree(DEFAULT_MODEL, tmp_path / "tuned" / "m")
    data = bytearray((tuned / "model.safetensors").read_bytes())
    data[-100] ^= 1  # one weight, deep in the file
    (tuned / "model.safetensors").write_bytes(bytes(data))
    theta = shutil.copytree(DEFAULT_MODEL, tmp_path / "theta" / "m")
    cfg = json.loads((theta / "config.json").read_text())
    cfg["rope_theta"] = 1234.0
    (theta / "config.json").write_text(json.dumps(cfg))

    keys = page_keys(3, seed=11)
    served(DEFAULT_MODEL)
    writer = attach(storage_config(disk(tmp_path / "kv")), HostPool(4, seed=1))
    assert writer.batch_set_v1(keys, indices([0, 1, 2])) == [True] * 3
    writer.pages.flush()
    writer.close()
    seen = {}
    for name, model_dir, extra in [("copy", copy, {}), ("tuned", tuned, {}), ("theta", theta, {}),
                                   ("override", DEFAULT_MODEL, {"json_model_override_args": '{"rope_theta": 5}'}),
                                   ("fp8 kv", DEFAULT_MODEL, {"kv_cache_dtype": "fp8_e4m3"})]:
        served(model_dir, **extra)
        reader = attach(storage_config(disk(tmp_path / "kv")), HostPool(4, seed=2))
        seen[name] = reader.batch_exists(keys)
        reader.close()
    assert seen == {"copy": 3, "tuned": 0, "theta": 0, "override": 0, "fp8 kv": 0}
