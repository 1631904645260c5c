"""The engine-neutral hook API every connector is built on.

An engine asks four things of kvstore per request: how many leading tokens can you supply
(``lookup``), give them to me layer by layer (``load``), keep what I computed (``save``, off the
critical path), and I am done with this request (``release``). Engines serving agents add two
per session: its turn ended in a tool call (``tool_started``), its next turn came
(``tool_finished``); kvstore pins the session's context meanwhile (kvstore.agents). Paged engines add one mapping
between their KV blocks and the store's chunks (``blocks_for``/``gather_blocks``/``scatter_blocks``),
done with tensor indexing, never a per-token Python loop.

Failures of the store (a tier down, a corrupt object) are misses here, never exceptions: the
engine recomputes, it never fails a request because a cache did.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Sequence, TypeVar

import torch

from kvstore.errors import InvalidInputError
from kvstore.layerwise import LayerwiseGet
from kvstore.spec import KVSpec
from kvstore.store import KVStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class LoadFailed(Exception):
    """A started load could not deliver a layer. The engine recomputes those tokens; it is
    the one failure the engine must handle, and it never means wrong data was delivered."""


class LayerLoad:
    """A layer-wise load in progress: ``hit_tokens`` is exact at once; ``wait(i)`` returns layer
    ``i`` (``[2, hit_tokens, H, D]``) once it has landed, or raises ``LoadFailed``."""

    def __init__(self, handle: LayerwiseGet | None = None) -> None:
        self._handle = handle
        self.hit_tokens = handle.hit_tokens if handle is not None else 0

    def wait(self, layer: int, timeout_s: float | None = None) -> torch.Tensor:
        if self._handle is None:
            raise LoadFailed("nothing was loaded")
        try:
            return self._handle.wait(layer, timeout_s)
        except InvalidInputError:
            raise  # a layer index out of range is the engine's bug, not a cache failure
        except Exception as exc:
            raise LoadFailed(f"layer {layer}: {exc}") from exc

    def finish(self) -> None:
        """Wait for the copy thread (it holds leases on memory-tier chunks until done)."""
        if self._handle is not None:
            self._handle.join()


class KVHooks:
    """What an engine calls, for one model (``store.spec``).

    ``save`` runs on a small worker pool so the forward pass never waits for the store; the KV
    handed to ``save`` must stay valid until ``release`` of that request returns, which is what
    paged engines already do with blocks they keep alive until a transfer is done.
    """

    def __init__(self, store: KVStore, *, save_threads: int = 1) -> None:
        self.store = store
        self.spec: KVSpec = store.spec
        self.chunk_size = store.chunk_size
        self._pool = ThreadPoolExecutor(max_workers=save_threads, thread_name_prefix="kvstore-save")
        self._saves: dict[str, set[Future]] = {}
        self._lock = threading.Lock()
        self.save_errors = 0
        self.session_errors = 0

    # ---- lookup and load -----------------------------------------------------------------

    def lookup(self, tokens: Sequence[int] | torch.Tensor, align: int = 1) -> int:
        """Leading tokens the store holds, rounded down to a multiple of ``align`` (an engine's
        block size when it can only take whole blocks)."""
        try:
            hit = self.store.lookup(tokens)
        except Exception:  # a broken tier is a miss, never a failed request
            log.exception("kvstore lookup failed; treating as a miss")
            return 0
        return hit - hit % align if align > 1 else hit

    def load(self, tokens: Sequence[int] | torch.Tensor, out: torch.Tensor | None = None) -> LayerLoad:
        """Start loading the longest stored prefix of ``tokens`` into ``out`` (``[L, 2, T, H, D]``
        or longer) while the engine computes: wait for layer ``i`` just before it is needed."""
        try:
            return LayerLoad(self.store.get_layers(tokens, out=out))
        except InvalidInputError:
            raise  # the engine's bug (wrong out shape), not the store's
        except Exception:
            log.exception("kvstore load failed; treating as a miss")
            return LayerLoad()

    # ---- save and release ----------------------------------------------------------------

    def save(self, request_id: str, tokens: Sequence[int] | torch.Tensor, kv: torch.Tensor,
             kv_start: int = 0) -> Future:
        """Store the chunks of ``tokens`` in the background. ``kv`` holds the KV of
        ``tokens[kv_start:]`` (``[L, 2, >= len(tokens) - kv_start, H, D]``); ``kv_start`` is a
        chunk boundary, for engines that computed only a suffix. Stored chunks are skipped.

        The caller's promise, which the store cannot check: every token's KV up to the end of
        ``tokens`` was computed in this request or loaded and verified. A load that failed
        (``LoadFailed``, or fewer tokens than the lookup said) taints everything computed over
        it; such KV is the wrong tokens' KV under a valid key and must not be saved."""
        n = len(tokens) - kv_start
        kv = kv[:, :, :n]
        self.spec.check_kv(kv, num_tokens=n)
        fut = self._pool.submit(self._save, tokens, kv, kv_start)
        with self._lock:
            self._saves.setdefault(request_id, set()).add(fut)
        fut.add_done_callback(lambda f: self._forget(request_id, f))
        return fut

    def _forget(self, request_id: str, fut: Future) -> None:
        with self._lock:
            futs = self._saves.get(request_id)
            if futs is not None:
                futs.discard(fut)
                if not futs:
                    del self._saves[request_id]

    def _save(self, tokens: Sequence[int] | torch.Tensor, kv: torch.Tensor, kv_start: int) -> int:
        try:
            return self.store.put(tokens, kv, kv_start=kv_start)
        except Exception:
            self.save_errors += 1
            log.exception("kvstore save failed; the request is unaffected")
            return 0

    def release(self, request_id: str, timeout_s: float | None = None) -> bool:
        """Wait for the request's saves; after this the KV memory they read may be reused.
        False on timeout. Engines whose saves read copies need not call it."""
        with self._lock:
            futs = list(self._saves.get(request_id, ()))
        for fut in futs:
            try:
                fut.result(timeout=timeout_s)
            except FutureTimeout:  # not the builtin TimeoutError before Python 3.11
                return False
        return True

    # ---- agent sessions -------------------------------------------------------------------

    def tool_started(self, session: str, tool: str, tokens: Sequence[int] | torch.Tensor, *,
                     request_id: str | None = None, ago_s: float = 0.0) -> Future:
        """The session's turn (``tokens``: its context so far) ended in a call of ``tool``
        ``ago_s`` seconds ago: pin its stored prefix while the tool runs. In the background,
        after ``request_id``'s saves (so the turn's own chunks are pinned too); never raises."""
        t0 = time.monotonic()
        waits = self._pending_saves(request_id)
        tokens = list(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)

        def run() -> float:
            for fut in waits:
                fut.exception()  # waits; a failed save was logged by itself
            return self.store.tool_started(session, tool, tokens, ago_s=ago_s + time.monotonic() - t0)
        return self._submit(run, 0.0)

    def tool_finished(self, session: str, *, ago_s: float = 0.0) -> Future:
        """The session's next turn arrived ``ago_s`` seconds ago: release its pins (in the
        background; never raises). The future gives how long the tool took (None: not paused)."""
        t0 = time.monotonic()
        return self._submit(lambda: self.store.tool_finished(session, ago_s=ago_s + time.monotonic() - t0), None)

    def _submit(self, fn: Callable[[], T], default: T) -> Future:
        """On the save pool, in order with the saves (one save thread keeps a session's events in
        order too); after ``close`` the event is dropped, counted, never raised."""
        try:
            return self._pool.submit(self._quietly, fn, default)
        except RuntimeError:  # the pool is shut down
            self.session_errors += 1
            done: Future = Future()
            done.set_result(default)
            return done

    def _pending_saves(self, request_id: str | None) -> list[Future]:
        with self._lock:
            return list(self._saves.get(request_id, ())) if request_id is not None else []

    def _quietly(self, fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except Exception:
            self.session_errors += 1
            log.exception("kvstore agent-session event failed; the session goes on unpinned")
            return default

    def pending(self) -> int:
        with self._lock:
            return sum(len(futs) for futs in self._saves.values())

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# ---- paged engines: blocks <-> chunks ---------------------------------------------------

def blocks_for(block_table: Sequence[int] | torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Block ids holding tokens ``[start, end)``; both ends must be block-aligned (or ``end`` the
    request's last token), which chunk boundaries are when ``chunk_size % block_size == 0``."""
    if start % block_size:
        raise InvalidInputError(f"start {start} is not a multiple of the block size {block_size}")
    table = torch.as_tensor(block_table, dtype=torch.int64)
    first, last = start // block_size, -(-end // block_size)
    if last > table.numel():
        raise InvalidInputError(f"tokens [{start}, {end}) need {last} blocks, the table has {table.numel()}")
    return table[first:last]


def gather_blocks(layer_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``layer_cache[block_ids]`` as one contiguous tensor (a single index_select)."""
    return layer_cache.index_select(0, block_ids.to(layer_cache.device))


def scatter_blocks(layer_cache: torch.Tensor, block_ids: torch.Tensor, data: torch.Tensor) -> None:
    """Write whole blocks ``data`` (``[len(block_ids), *block_shape]``) into ``layer_cache``."""
    layer_cache.index_copy_(0, block_ids.to(layer_cache.device), data.to(layer_cache.device, layer_cache.dtype))
