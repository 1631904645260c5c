"""SGLang HiCache storage (its L3) backed by kvstore's tiers, loaded by SGLang's dynamic backend::

    python -m sglang.launch_server --model-path ... --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
            "module_path": "kvstore.connectors.sglang", "class_name": "KVStoreHiCacheStorage",
            "interface_v1": 1, "kvstore_config": "/etc/kvstore.yaml"}'

SGLang keeps device (L1) and host (L2) copies itself and asks its L3 for pages by its own prefix
hashes, so this backend is a :class:`~kvstore.pagestore.PageStore`: kvstore's disk, Redis and
daemon tiers (a ``cpu`` tier works too, but duplicates SGLang's host pool). With
``interface_v1`` SGLang hands host-pool indices and pages move between the pool and kvstore
without SGLang's staging copy; without it, the older tensor-per-page calls work the same.

Options under ``extra_config`` (anything else belongs to SGLang and is ignored here):
``kvstore_config`` (a mapping or a config file; default: ``$KVSTORE_CONFIG`` and ``KVSTORE_*``,
else kvstore's default disk tier without its default memory tier) and ``kvstore_codec``
(``raw`` or ``lz4``). The disk tier is always ``shared``: every TP rank
runs its own backend, and several engines on a host may point at one directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolName,
)

from kvstore.config import StoreConfig, load_config
from kvstore.errors import ConfigError
from kvstore.fingerprint import checkpoint_digest, config_digest
from kvstore.pagestore import PageStore, check_page_codec
from kvstore.spec import DTYPE_NAMES, DTYPES

log = logging.getLogger(__name__)
OPTIONS = frozenset({"kvstore_config", "kvstore_codec"})


def storage_identity(config: HiCacheStorageConfig) -> dict[str, Any]:
    """What makes two ranks' pages interchangeable, from SGLang's storage config. MLA KV is the
    same on every TP rank, so those ranks share pages; otherwise each rank holds its heads."""
    ident: dict[str, Any] = {
        "engine": "sglang-hicache", "model": config.model_name or "", "pp": (config.pp_rank, config.pp_size),
        "attn_cp": (config.attn_cp_rank, config.attn_cp_size), "mla": bool(config.is_mla_model),
        "page_first": bool(config.is_page_first_layout),
    }
    if not config.is_mla_model:
        ident["tp"] = (config.tp_rank, config.tp_size)
    if config.should_split_heads:
        ident["tp_lcm"] = config.tp_lcm_size
    if config.dcp_size > 1:
        ident["dcp"] = (config.dcp_rank, config.dcp_size, config.logical_page_size)
    return ident


# SGLang's server arguments that change the K/V a checkpoint computes for the same tokens.
_MODEL_ARGS = ("revision", "load_format", "model_loader_extra_config", "model_impl", "json_model_override_args",
               "dtype", "quantization", "kv_cache_dtype")


def model_identity(server_args: Any = None) -> dict[str, Any]:
    """What the served model computes K/V with, beyond the name SGLang's storage config carries
    (its served model name, which two checkpoints may share): every weight byte and the
    effective config (``config.json`` plus ``--json-model-override-args``), dtype, KV dtype,
    quantization. Read from SGLang's published server arguments."""
    if server_args is None:
        try:
            from sglang.srt.runtime_context import get_server_args

            server_args = get_server_args()
        except Exception as exc:  # not inside a running server (or SGLang moved the accessor)
            log.warning("kvstore HiCache storage: SGLang's server arguments are not available (%s); pages "
                        "are keyed by the served model name only: set a 'salt' in the kvstore config when "
                        "the weights or the model config change", exc)
            return {}
    ident: dict[str, Any] = {name: getattr(server_args, name, None) for name in _MODEL_ARGS}
    path = Path(str(getattr(server_args, "model_path", "") or ""))
    if path.is_dir():
        ident["weights"] = checkpoint_digest(path)
        config = path / "config.json"
        ident["config"] = config_digest(json.loads(config.read_text())) if config.is_file() else None
    else:  # a hub id: SGLang resolved it to a snapshot we cannot see from here
        ident["model_path"] = str(path)
    return {"model_identity": config_digest(ident)}


def pool_identity(pool: Any) -> dict[str, Any]:
    """The host pool's byte format: two pools with the same page size but another layout (say
    ``page_first`` vs ``page_first_direct``) order the same numbers differently."""
    ident = {"pool": type(pool).__name__, "layout": getattr(pool, "layout", None),
             "dtype": str(getattr(pool, "dtype", None)), "page_size": getattr(pool, "page_size", None),
             "format": getattr(pool, "storage_format_tag", None)}
    for name in ("layer_num", "head_num", "head_dim", "v_head_dim", "kv_lora_rank", "qk_rope_head_dim"):
        value = getattr(pool, name, None)
        if isinstance(value, int):
            ident[name] = value
    return ident


class KVStoreHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None) -> None:
        extra = dict(storage_config.extra_config or {})
        ours = {k: v for k, v in extra.items() if k.startswith("kvstore_")}
        unknown = sorted(set(ours) - OPTIONS)
        if unknown:
            raise ConfigError(f"unknown kvstore options {unknown} in SGLang's storage extra_config; "
                              f"kvstore takes {sorted(OPTIONS)}")
        self.storage_config = storage_config
        # Checked now so a bad config fails the attach, not the first prefetch.
        config = load_config(ours.get("kvstore_config"), use_env=True)
        if ours.get("kvstore_config") is None and config.tiers.get("cpu") == StoreConfig().tiers["cpu"]:
            # Nobody asked for kvstore's default memory tier, and SGLang's host pool already is
            # one: holding every backed-up page twice would only cost RAM.
            config = dataclasses.replace(config, tiers={k: t for k, t in config.tiers.items() if k != "cpu"})
        self._config = config.with_shared_disk()
        self._model = model_identity()
        self._codec = check_page_codec(str(ours.get("kvstore_codec", "raw")))
        self._writer = storage_config.is_storage_writer
        self._store: PageStore | None = None
        self.mem_pool_host: Any = None

    @property
    def pages(self) -> PageStore:
        """Opened on first use, or when SGLang registers its host pool (right after creating the
        backend): the pool's layout and geometry are part of what a page is."""
        if self._store is None:
            self._open({})
        assert self._store is not None
        return self._store

    def _open(self, pool_ident: dict[str, Any]) -> None:
        if self._store is not None:
            self._store.close()
        identity = {**storage_identity(self.storage_config), **self._model, **pool_ident}
        self._store = PageStore(self._config, identity,
                                codec=self._codec, tokens_per_page=int(pool_ident.get("page_size") or 0))
        log.info("kvstore HiCache storage: tiers %s, %s", [t.name for t in self._store.store.tiers], pool_ident)

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        dtype = getattr(mem_pool_host, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype not in DTYPE_NAMES:  # else every backup would fail
            raise ConfigError(f"SGLang's host pool holds {dtype}; kvstore stores {sorted(DTYPES)}")
        super().register_mem_pool_host(mem_pool_host)
        self._open(pool_identity(mem_pool_host))

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """Hybrid models (Mamba or SWA state, DSA indexers) add sidecar pools that SGLang moves
        through the v2 calls, which this backend does not implement: refuse them at attach
        rather than fail the first prefetch."""
        if str(host_pool_name) != PoolName.KV.value:
            raise ConfigError(f"kvstore's SGLang backend stores KV pages only; the {host_pool_name!s} pool of "
                              "this hybrid model needs HiCache's v2 storage calls, which it does not implement")
        super().register_mem_host_pool_v2(host_pool, host_pool_name)

    # ---- zero-copy interface (extra_config interface_v1) --------------------------------------

    def _page_starts(self, keys: list[str], host_indices: torch.Tensor) -> list[int]:
        page_size = self.mem_pool_host.page_size
        if host_indices.numel() < len(keys) * page_size:
            raise ValueError(f"{len(keys)} pages need {len(keys) * page_size} host indices, got {host_indices.numel()}")
        return [int(host_indices[i * page_size]) for i in range(len(keys))]

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        pool = self.mem_pool_host
        starts = self._page_starts(keys, host_indices)
        # A page the pool holds in one piece (MLA's page_first) is filled in place; an MHA page
        # is split over K and V (and over layers in layer_first), so it is staged and the pool
        # copies it in.
        direct = [pool.get_data_page(start, flat=False) for start in starts]
        outs = [p.view(-1) if p.is_contiguous() else pool.get_dummy_flat_data_page() for p in direct]
        done = self._guarded(lambda: self.pages.get_into(keys, outs), [False] * len(keys))
        for ok, start, page, out in zip(done, starts, direct, outs):
            if ok and not page.is_contiguous():
                pool.set_from_flat_data_page(start, out)
        return done

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        if not self._writer:  # MLA: one rank writes the replicated pages, the others read them
            return [True] * len(keys)
        pool = self.mem_pool_host
        pages = [pool.get_data_page(start, flat=True) for start in self._page_starts(keys, host_indices)]
        return [self._put(keys, pages)] * len(keys)

    # ---- tensor-per-page interface -----------------------------------------------------------

    def get(self, key: str, target_location: Any | None = None,
            target_sizes: Any | None = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> list[torch.Tensor | None]:
        if target_locations is None:
            target_locations = [self.mem_pool_host.get_dummy_flat_data_page() for _ in keys]
        done = self._guarded(lambda: self.pages.get_into(keys, target_locations), [False] * len(keys))
        return [out if ok else None for ok, out in zip(done, target_locations)]

    def set(self, key: str, value: Any | None = None, target_location: Any | None = None,
            target_sizes: Any | None = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any | None = None, target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> bool:
        return self._put(keys, list(values)) if self._writer else True

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        return self._guarded(lambda: self.pages.leading_hits(keys), 0)

    # ---- control -----------------------------------------------------------------------------

    def clear(self) -> None:
        """SGLang's flush_cache: empties this backend's local tiers (a shared daemon is never
        cleared from an engine)."""
        self.pages.clear()

    def stats(self) -> dict[str, Any]:
        """kvstore's counters per tier (SGLang's own ``get_stats`` is for its metrics type)."""
        return self.pages.stats()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def _put(self, keys: list[str], pages: list[torch.Tensor]) -> bool:
        """True once the pages are stored (new or already there), False if the store failed."""
        def put() -> bool:
            self.pages.put(keys, pages)
            return True
        return self._guarded(put, False)

    @staticmethod
    def _guarded(call: Any, fallback: Any) -> Any:
        """SGLang's storage threads must not die on a cache failure: it becomes a miss (or a
        failed backup, which SGLang retries later) and a log line."""
        try:
            return call()
        except Exception:
            log.exception("kvstore HiCache storage operation failed; treating it as a miss")
            return fallback


__all__ = ["KVStoreHiCacheStorage", "model_identity", "pool_identity", "storage_identity"]
