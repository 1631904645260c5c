"""kvstore as a vLLM v1 KV connector (``KVConnectorBase_V1``).

Enable it with::

    LLM(model=..., kv_transfer_config=KVTransferConfig(
        kv_connector="KVStoreConnector", kv_role="kv_both",
        kv_connector_module_path="kvstore.connectors.vllm",
        kv_connector_extra_config={"kvstore_config": {...} or "/path/kvstore.yaml"}))

Blocks are copied as opaque bytes: vLLM's CPU backend keeps an ISA-dependent layout inside a
block, so the connector never interprets one. Each block's bytes are reinterpreted as
``[2, block_size, H, D]`` so a chunk of the store is exactly ``chunk_size / block_size`` whole
blocks; the layout (backend, ISA, block size) is part of the model fingerprint, so bytes are
only ever handed back to an engine that lays blocks out the same way.

Agent sessions (``kv_transfer_params={"kvstore_session": ID, "kvstore_tool": NAME}``) are
tracked by the scheduler half and pinned by the worker's store: kvstore.connectors.vllm_sessions.

vLLM runs the scheduler half and the worker half of a connector in different processes on CPU
(its multiprocess executor). The worker owns the store; the scheduler answers lookups from the
store's shared tiers (a ``shared`` disk directory, Redis, the daemon). When both halves live in
one process they share one store, memory tiers included.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvstore.config import StoreConfig, load_config
from kvstore.connectors.hooks import KVHooks, LoadFailed
from kvstore.errors import ConfigError
from kvstore.connectors.vllm_identity import spec_for, uncacheable
from kvstore.connectors.vllm_sessions import SessionEvent, SessionTracker, deliver
from kvstore.spec import KVSpec
from kvstore.store import KVStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transfer:
    """Blocks ``[start, end) / block_size`` of one request, and the tokens that key them."""

    req_id: str
    # Loads: the prompt up to the end of the chunk holding ``end`` (the store serves whole
    # chunks; ``end`` may stop short of one, e.g. when the prompt's last token must be computed).
    tokens: tuple[int, ...]
    block_ids: tuple[int, ...]  # the request's blocks covering tokens [0, end)
    start: int
    end: int


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
    sessions: list[SessionEvent] = field(default_factory=list)
    # Failed blocks (block id -> reports) that a request rewound by vLLM recomputes by the end
    # of this step: from this step on, a save covering them holds their recomputed KV.
    acked_bad_blocks: dict[int, int] = field(default_factory=dict)


@dataclass
class _Tracked:
    """Scheduler-side state of a running request: what is computed and what is saved."""

    tokens: list[int]
    block_ids: list[int]
    saved_upto: int
    scheduled_upto: int = 0  # computed tokens once the last scheduled step has run
    rewound_to: int | None = None  # where vLLM last restarted its computation (a failed load)
    # It holds a block whose load failed that it does not recompute itself (vLLM's prefix cache
    # shared it): what it computes may have read that block before its owner recomputed it.
    tainted: bool = False


# One store per (spec, config) per process: the scheduler and worker halves share it when vLLM
# runs them in the same process, so the scheduler sees the worker's memory tiers.
_STORES: dict[tuple[bytes, str], tuple[KVStore, int]] = {}
_STORES_LOCK = threading.Lock()


def _acquire_store(spec: KVSpec, config: StoreConfig) -> KVStore:
    key = (spec.fingerprint, repr(config.to_dict()))
    with _STORES_LOCK:
        store, refs = _STORES.get(key, (None, 0))
        if store is None:
            store = KVStore(spec, config)
        _STORES[key] = (store, refs + 1)
        return store


def _release_store(store: KVStore) -> None:
    with _STORES_LOCK:
        for key, (held, refs) in list(_STORES.items()):
            if held is store:
                if refs > 1:
                    _STORES[key] = (held, refs - 1)
                else:
                    del _STORES[key]
                    store.close()
                return


def _align(n: int, to: int) -> int:
    return n - n % to


class KVStoreConnector(KVConnectorBase_V1):
    @property
    def requires_kv_delivery(self) -> bool:
        return False  # best-effort cache: a dropped save is a future miss, not lost output

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.block_size = int(vllm_config.cache_config.block_size)
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            # A cache that lost or failed to verify a block must cost a recompute, never a failed
            # request; the scheduler reads this right after creating its connector.
            log.info("kvstore: setting kv_load_failure_policy=recompute (a cache miss is never an error)")
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        source = extra.pop("kvstore_config", None)
        if extra:
            raise ConfigError(f"unknown kv_connector_extra_config keys {sorted(extra)}; "
                              "kvstore takes its settings under 'kvstore_config' (a mapping or a file path)")
        # Whole chunks only: a partial block's bytes cannot be sliced without knowing the layout.
        config = load_config(source, use_env=True, overrides={"save_partial": False})
        if config.chunk_size % self.block_size:
            raise ConfigError(f"kvstore chunk_size {config.chunk_size} must be a multiple of vLLM's "
                              f"block_size {self.block_size}")
        self.chunk_size = config.chunk_size
        self.spec = spec_for(vllm_config)
        same_process = vllm_config.parallel_config.distributed_executor_backend == "uni"
        if role == KVConnectorRole.SCHEDULER and not same_process:
            config = _shared_tiers_only(config)
        else:
            config = config.with_shared_disk()
        self.store = _acquire_store(self.spec, config)
        self.hooks = KVHooks(self.store)
        # scheduler side
        self._tracked: dict[str, _Tracked] = {}
        self._load_after_alloc: dict[str, tuple[int, int]] = {}
        self._local_hits: dict[str, int] = {}
        self._bypass: set[str] = set()
        self._bypass_logged: set[str] = set()
        self._sessions = SessionTracker()
        # worker side
        self._layers: list[tuple[str, torch.Tensor]] = []
        self._layer_index: dict[str, int] = {}
        self._loading: list[tuple[Transfer, Any]] = []
        # Blocks whose load failed: this step's (reported to vLLM at the step's end), and earlier
        # steps' not yet acknowledged by the scheduler (block id -> reports). A save that covers
        # any of them holds KV never loaded or computed over KV never loaded: it is dropped.
        self._load_errors: set[int] = set()
        self._bad_blocks: Counter[int] = Counter()
        self.dropped_saves = 0
        # scheduler side: failed blocks reported by the workers, acknowledged in the next meta
        self._reported_bad: Counter[int] = Counter()
        self._bad_holders: dict[int, set[str]] = {}  # failed block -> requests holding it then
        log.info("kvstore connector (%s): spec %s, tiers %s", role.name, self.spec.model_id,
                 [t.name for t in self.store.tiers])

    # ==== scheduler side ==================================================================

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        # A session's next turn ends its pause even if this turn bypasses the cache.
        self._sessions.arrived(request.request_id, getattr(request, "kv_transfer_params", None))
        reason = uncacheable(request)
        if reason is not None:
            # Its KV is not a function of its token ids alone: never looked up, never saved.
            self._bypass.add(request.request_id)
            if reason not in self._bypass_logged:
                self._bypass_logged.add(reason)
                log.info("kvstore: requests with %s bypass the cache (their tokens do not determine their KV)",
                         reason)
            return 0, False
        tokens = list(request.prompt_token_ids or [])
        # At least one prompt token is always computed (it yields the first logits).
        limit = _align(len(tokens) - 1, self.block_size)
        hit = min(self.hooks.lookup(tokens, align=self.block_size), limit)
        # vLLM's own prefix cache already holds the first num_computed_tokens: remember where
        # ours starts (request.num_computed_tokens is not updated until after allocation).
        self._local_hits[request.request_id] = num_computed_tokens
        return max(0, hit - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        local = self._local_hits.pop(request.request_id, 0)
        if num_external_tokens > 0:
            self._load_after_alloc[request.request_id] = (local, local + num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self._bypass:
                continue
            tokens = list(new.prompt_token_ids or [])
            blocks = list(new.block_ids[0])
            start, end = self._load_after_alloc.pop(new.req_id, (0, 0))
            if end > start:
                cover = min(len(tokens), -(-end // self.chunk_size) * self.chunk_size)
                nb = -(-end // self.block_size)
                meta.loads.append(Transfer(new.req_id, tuple(tokens[:cover]), tuple(blocks[:nb]), start, end))
            self._tracked[new.req_id] = _Tracked(tokens, blocks, saved_upto=max(end, new.num_computed_tokens))
            self._plan_save(meta, new.req_id, new.num_computed_tokens
                            + scheduler_output.num_scheduled_tokens.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            computed = cached.num_computed_tokens[i]
            if req_id in cached.resumed_req_ids and new_blocks is not None:
                tracked.block_ids = list(new_blocks[0])  # a resumed request gets all its blocks anew
            elif new_blocks is not None:
                tracked.block_ids.extend(new_blocks[0])
            if req_id in cached.resumed_req_ids or computed < tracked.scheduled_upto:
                # Resumed, or rewound by vLLM after a failed load: what it computes again from
                # here is new KV, worth saving once it has been recomputed.
                tracked.saved_upto = min(tracked.saved_upto, computed)
                tracked.rewound_to = computed
            self._plan_save(meta, req_id, computed + scheduler_output.num_scheduled_tokens.get(req_id, 0))
        self._load_after_alloc.clear()
        meta.acked_bad_blocks = self._recomputed_bad_blocks()
        meta.sessions = self._sessions.drain()
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        """The workers' failed blocks: vLLM rewinds every request that read one; once one of
        them has recomputed a block, a meta tells the workers, and they stop dropping saves.

        They also leave vLLM's prefix cache here: under the recompute policy vLLM keeps them
        there, so a request scheduled before the owner recomputed them (or after the owner was
        aborted) would read the failed blocks as a prefix hit."""
        bad = set(getattr(connector_output, "invalid_block_ids", None) or ())
        if not bad:
            return
        self._reported_bad.update(bad)
        evict = set(bad)
        for req_id, t in self._tracked.items():  # and what was computed over them
            first = next((i for i, b in enumerate(t.block_ids) if b in bad), None)
            if first is not None:
                evict.update(t.block_ids[first:])
                for b in bad.intersection(t.block_ids):
                    self._bad_holders.setdefault(b, set()).add(req_id)
        manager = getattr(self, "_kv_cache_manager", None)
        if manager is not None:
            try:
                manager.evict_blocks(evict)
            except Exception:  # never fail vLLM's step over a cache-hygiene call
                log.exception("kvstore: could not evict %d failed blocks from vLLM's prefix cache", len(evict))

    def _recomputed_bad_blocks(self) -> dict[int, int]:
        """Reported blocks that a rewound request recomputes by the end of the step being
        planned (or that no request of ours holds any more), taken off the reported set."""
        done: dict[int, int] = {}
        for block, reports in self._reported_bad.items():
            # Only requests that held the block when it failed: one that got it later (freed by
            # an aborted owner) computes it anew.
            holders = [(t, t.block_ids.index(block)) for req_id in self._bad_holders.get(block, ())
                       if (t := self._tracked.get(req_id)) is not None and block in t.block_ids]
            for t, i in holders:
                if t.rewound_to is None or t.rewound_to > i * self.block_size:
                    t.tainted = True  # a reader of the block, not the one recomputing it
            if not holders or any(not t.tainted and t.scheduled_upto >= (i + 1) * self.block_size
                                  for t, i in holders):
                done[block] = reports
        for block in done:
            del self._reported_bad[block]
            self._bad_holders.pop(block, None)
        return done

    def _plan_save(self, meta: KVStoreConnectorMetadata, req_id: str, computed: int) -> None:
        """Save the prompt chunks this step completes (chunked prefill completes them over steps)."""
        tracked = self._tracked[req_id]
        tracked.scheduled_upto = computed
        if tracked.tainted:
            return
        end = _align(min(computed, len(tracked.tokens)), self.chunk_size)
        start = _align(tracked.saved_upto, self.chunk_size)
        if end <= start:
            return
        nb = end // self.block_size
        if nb > len(tracked.block_ids):
            return
        meta.saves.append(Transfer(req_id, tuple(tracked.tokens[:end]), tuple(tracked.block_ids[:nb]), start, end))
        tracked.saved_upto = end

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves copy their blocks inside the step that computed them: nothing holds blocks here.
        tracked = self._tracked.get(request.request_id)
        self._sessions.finished(request.request_id, None if tracked is None or tracked.tainted else tracked.tokens)
        for state in (self._tracked, self._load_after_alloc, self._local_hits):
            state.pop(request.request_id, None)
        self._bypass.discard(request.request_id)
        return False, None

    # ==== worker side =====================================================================

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Every step, forward pass or not: where the scheduler's acknowledgements arrive."""
        super().bind_connector_metadata(connector_metadata)
        acked = getattr(connector_metadata, "acked_bad_blocks", None)
        if acked:
            self._bad_blocks.subtract(acked)
            self._bad_blocks = +self._bad_blocks  # keep only blocks with unacknowledged reports

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layers = list(kv_caches.items())
        self._layer_index = {name: i for i, (name, _) in enumerate(self._layers)}
        if len(self._layers) != self.spec.num_layers:
            raise ConfigError(f"vLLM registered {len(self._layers)} KV layers, the model config says "
                              f"{self.spec.num_layers}")
        per_block = 2 * self.block_size * self.spec.num_kv_heads * self.spec.head_size
        for name, t in self._layers:
            if t.dtype != self.spec.dtype or t[0].numel() != per_block:
                raise ConfigError(f"KV layer {name} is {tuple(t.shape)} {t.dtype}: expected blocks of {per_block} "
                                  f"{self.spec.dtype} elements (block_size x 2 x heads x head_size)")

    def _block_view(self, layer: int) -> torch.Tensor:
        """The layer's cache as ``[num_blocks, elements per block]`` (block axis first)."""
        t = self._layers[layer][1]
        return t.reshape(t.shape[0], -1)

    def _to_store(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[L, nb, E]`` block bytes -> ``[L, 2, nb * block_size, H, D]``, chunk-local by construction."""
        L, nb, _ = blocks.shape
        s = self.spec
        v = blocks.view(L, nb, 2, self.block_size, s.num_kv_heads, s.head_size).permute(0, 2, 1, 3, 4, 5)
        return v.reshape(L, 2, nb * self.block_size, s.num_kv_heads, s.head_size)

    def _from_store(self, kv_layer: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_to_store`` for one layer: ``[2, T, H, D]`` -> ``[T / block_size, E]``."""
        nb = kv_layer.shape[1] // self.block_size
        s = self.spec
        v = kv_layer.reshape(2, nb, self.block_size, s.num_kv_heads, s.head_size).permute(1, 0, 2, 3, 4)
        return v.reshape(nb, -1)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        self._loading = []
        for t in meta.loads:
            handle = self.hooks.load(list(t.tokens))
            got = _align(min(handle.hit_tokens, t.end), self.block_size)
            if got < t.end:
                # Evicted or corrupt since the lookup: vLLM recomputes these blocks.
                first_bad = max(got, t.start) // self.block_size
                self._load_errors.update(t.block_ids[first_bad:])
                log.warning("kvstore: request %s loaded %d of %d tokens; recomputing the rest", t.req_id,
                            got, t.end)
            if got > t.start:
                self._loading.append((dataclasses.replace(t, end=got), handle))
            else:
                handle.finish()  # nothing usable: let its thread finish and release its leases

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layer_index.get(layer_name)
        if layer is None or not self._loading:
            return
        cache = self._block_view(layer)
        for t, handle in self._loading:
            b0, b1 = t.start // self.block_size, t.end // self.block_size
            try:
                kv_layer = handle.wait(layer)[:, :t.end]
            except LoadFailed:
                log.exception("kvstore: load for request %s failed; vLLM recomputes it", t.req_id)
                self._load_errors.update(t.block_ids[b0:b1])
                continue
            data = self._from_store(kv_layer)[b0:b1]
            ids = torch.tensor(t.block_ids[b0:b1], dtype=torch.int64, device=cache.device)
            cache.index_copy_(0, ids, data.to(cache.device))
        if layer == len(self._layers) - 1:
            for _t, handle in self._loading:
                handle.finish()
            self._loading = []

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Saving happens once per step in ``wait_for_save``: one gather of all layers is cheaper
        than per-layer bookkeeping, and a step's blocks are final only after its last layer."""

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        for t in meta.saves:
            if not self._load_errors.isdisjoint(t.block_ids) or any(b in self._bad_blocks for b in t.block_ids):
                # The request read a block that failed to load (this step, or an earlier one
                # vLLM has not rewound yet): these chunks are not its tokens' KV.
                self.dropped_saves += 1
                log.warning("kvstore: not saving tokens [%d, %d) of request %s: they were computed over "
                            "blocks that failed to load", t.start, t.end, t.req_id)
                continue
            b0, b1 = t.start // self.block_size, t.end // self.block_size
            ids = torch.tensor(t.block_ids[b0:b1], dtype=torch.int64)
            # Copy the blocks now (they are vLLM's to reuse after this step), store in the background.
            blocks = torch.stack([self._block_view(i).index_select(0, ids.to(self._layers[i][1].device)).cpu()
                                  for i in range(len(self._layers))])
            self.hooks.save(t.req_id, list(t.tokens), self._to_store(blocks), kv_start=t.start)
        deliver(self.hooks, meta.sessions)  # after the saves: a pause pins the chunks just saved

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        self._bad_blocks.update(errors)  # bad until the scheduler acknowledges this report
        return errors

    def shutdown(self) -> None:
        self.hooks.close()
        self.store.flush()
        _release_store(self.store)


# ---- config ----------------------------------------------------------------------------

def _shared_tiers_only(config: StoreConfig) -> StoreConfig:
    """The scheduler's view when the worker is another process: memory tiers are the worker's own."""
    config = config.with_shared_disk()
    tiers = {name: tc for name, tc in config.tiers.items() if not tc.is_memory}
    if not tiers:
        log.warning("kvstore: only memory tiers are configured and vLLM runs its worker in another "
                    "process; the scheduler cannot see them, so there will be no hits. Add a disk, "
                    "redis or remote tier.")
        tiers = {"cpu": dataclasses.replace(next(iter(config.tiers.values())), capacity=1 << 20)}
    return dataclasses.replace(config, tiers=tiers)


__all__ = ["KVStoreConnector", "KVStoreConnectorMetadata", "Transfer"]
