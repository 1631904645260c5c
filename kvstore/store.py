"""KVStore: the engine-facing contract (lookup, get, put, pin) over a tier stack.

A view over :class:`~kvstore.tierstack.TierStack`: it cuts tokens into prefix-chained chunk
keys and says what a valid chunk object is; the stack holds the tiers, writes, promotes,
demotes and pins. Reads go through the one read path (:mod:`kvstore.reads`) and return the
longest chunk-aligned prefix that verifies; writes land in the fastest tier synchronously and
flow down through per-tier writer threads.
"""

from __future__ import annotations

import atexit
import functools
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch

from kvstore.accesslog import AccessLog
from kvstore.agents import AgentSessions, ToolTTLConfig
from kvstore.config import StoreConfig, load_config
from kvstore.errors import ConfigError, InvalidInputError
from kvstore.hashing import ChunkHasher, ChunkRef, num_tokens
from kvstore.objects import ObjectMeta
from kvstore.reads import ChunkRead
from kvstore.spec import KVSpec, dtype_name
from kvstore.tierstack import TierStack

if TYPE_CHECKING:
    from kvstore.layerwise import LayerwiseGet, LayerwisePut

log = logging.getLogger(__name__)
_LIVE_STORES: "weakref.WeakSet[KVStore]" = weakref.WeakSet()


@atexit.register
def _close_live_stores() -> None:
    """A store left open at exit still flushes its queued writes (and stops its threads cleanly)."""
    for store in list(_LIVE_STORES):
        store.close()


class KVStore:
    """A tiered KV-cache store for one model (``spec``) and one tenant (``config.tenant``)."""

    def __init__(self, spec: KVSpec, config: Any = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` times pins and agent sessions (a replay gives simulated time)."""
        self.spec = spec
        self.config: StoreConfig = load_config(config)
        self.chunk_size = self.config.chunk_size
        self.hasher = ChunkHasher(spec.fingerprint, self.config.tenant, self.chunk_size, self.config.salt)
        self._dtype_name = dtype_name(spec.dtype)
        self._closed = False
        self._loads: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.stack = TierStack(self.config, namespace=self.hasher.root, spec=spec, clock=clock)
        self.tiers = self.stack.tiers
        self.counters = self.stack.counters
        self.pins = self.stack.pins
        # Tiers that keep agent sessions themselves (the daemon learns from every engine it
        # serves) get the events instead of a pin at this process's predicted TTL.
        turnover = self.stack.turnover
        self.agents = AgentSessions(functools.partial(self.stack.pin, session=True),
                                    functools.partial(self.stack.unpin, session=True),
                                    ToolTTLConfig.of(self.config), clock=clock,
                                    turnover=turnover.seconds if turnover is not None else None)
        self._access: AccessLog | None = None
        try:
            self._check_budgets()
            if self.config.access_log:
                try:
                    self._access = AccessLog(self.config.access_log, self.chunk_size, spec.bytes_per_token)
                except OSError as exc:
                    raise ConfigError(f"access_log {self.config.access_log}: {exc.strerror or exc}") from None
        except BaseException:
            self.stack.close()
            raise
        _LIVE_STORES.add(self)

    def _check_budgets(self) -> None:
        """A tier whose budget cannot hold one chunk would refuse every write, silently."""
        need = self.spec.bytes_per_token * self.chunk_size
        for tier in self.tiers:
            cap = tier.config.capacity
            if cap is not None and cap < need:
                raise ConfigError(
                    f"tiers.{tier.config.kind}.capacity {cap} bytes cannot hold one chunk of {need} bytes "
                    f"({self.chunk_size} tokens x {self.spec.bytes_per_token} bytes/token)")

    # ---- context manager -----------------------------------------------------------------

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- keys ----------------------------------------------------------------------------

    def chunks(self, tokens: object, include_partial: bool = True) -> list[ChunkRef]:
        """The chunk keys of ``tokens`` (what lookup/get/put/pin all operate on)."""
        return self.hasher.chunks(tokens, include_partial=include_partial)

    def _meta(self, ref: ChunkRef) -> ObjectMeta:
        return ObjectMeta(key=ref.key, fingerprint=self.spec.fingerprint, shape=self.spec.chunk_shape(ref.num_tokens),
                          dtype=self._dtype_name, num_tokens=ref.num_tokens,
                          partial=ref.num_tokens < self.chunk_size)

    def _resolve(self, tokens: object) -> tuple[list[ChunkRef], list[int | None], int]:
        """Chunks of ``tokens``, the tier holding each, and how many leading chunks hit.

        When the chain breaks at chunk n, a partial tail stored by an earlier, shorter prompt
        (e.g. the previous chat turn) may still cover the start of chunk n: the longest such
        tail in any tier extends the hit and replaces ``refs[n]`` (one batched call per tier).
        """
        data, refs = self.hasher.split(tokens)
        where = self.stack.holders([r.key for r in refs])
        n = next((i for i, pos in enumerate(where) if pos is None), len(where))
        if n < len(refs) and self.config.save_partial and refs[n].num_tokens > 1:
            tails = self.hasher.tail_keys(data, refs, n)  # longest first
            found = self.stack.holders([t.key for t in tails])
            best = next((j for j, pos in enumerate(found) if pos is not None), None)
            if best is not None:
                refs[n], where[n] = tails[best], found[best]
                n += 1
        return refs, where, n

    # ---- lookup / get --------------------------------------------------------------------

    def lookup(self, tokens: object) -> int:
        """Tokens of the longest stored prefix (chunk-aligned; a stored partial tail counts)."""
        refs, _where, n = self._resolve(tokens)
        hit = refs[n - 1].end if n else 0
        if self._access is not None:
            self._access.record("lookup", [r.key for r in refs], num_tokens(tokens), hit=hit)
        self.counters.store("lookups")
        self.counters.store("lookup_tokens", num_tokens(tokens))
        self.counters.store("lookup_hit_tokens", hit)
        return hit

    def _read(self, tokens: object, out: torch.Tensor | None, device: torch.device | str | None) -> ChunkRead:
        """Fix the hit of ``tokens`` into ``out`` (allocated when None): the start of every read."""
        refs, where, n = self._resolve(tokens)
        hit_upper = refs[n - 1].end if n else 0
        if out is None:
            out = torch.empty(self.spec.chunk_shape(hit_upper), dtype=self.spec.dtype, device=device or "cpu")
        else:
            self._check_out(out, hit_upper)
        read = ChunkRead(self.stack, refs[:n], where[:n], out, self._meta)
        total = num_tokens(tokens)
        if self._access is not None:
            self._access.record("get", [r.key for r in refs], total, hit=read.hit_tokens)
        self.counters.store("gets")
        self.counters.store("get_tokens", total)
        self.counters.store("get_hit_tokens", read.hit_tokens)
        self.counters.store("get_miss_tokens", total - read.hit_tokens)
        return read

    def get(self, tokens: object, out: torch.Tensor | None = None,
            device: torch.device | str | None = None) -> tuple[int, torch.Tensor]:
        """Load the longest stored prefix. Returns ``(hit_tokens, kv[:, :, :hit_tokens])``.

        With ``out`` (shaped like the prompt's KV or longer) the KV is written into it and the
        returned tensor is a view of ``out``. A chunk that fails verification in every tier
        holding it ends the hit there."""
        read = self._read(tokens, out, device)
        try:
            with torch.inference_mode(read.out.is_inference()):  # an inference tensor takes writes only so
                read.copy_all()
        except BaseException:
            read.finish(copied=False)
            raise
        read.finish()
        return read.hit_tokens, read.out[:, :, :read.hit_tokens]

    def _check_out(self, out: torch.Tensor, needed: int) -> None:
        if not isinstance(out, torch.Tensor):
            raise InvalidInputError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != self.spec.dtype:
            raise InvalidInputError(f"out dtype {out.dtype} does not match the spec's {self.spec.dtype}")
        want = self.spec.chunk_shape(max(needed, out.shape[2] if out.dim() > 2 else 0))
        if out.dim() != len(want) or tuple(out.shape[:2]) != want[:2] or tuple(out.shape[3:]) != want[3:]:
            raise InvalidInputError(f"out shape {tuple(out.shape)} does not match the spec layout {want}")
        if out.shape[2] < needed:
            raise InvalidInputError(f"out holds {out.shape[2]} tokens, the hit needs {needed}")

    def get_layers(self, tokens: object, out: torch.Tensor | None = None,
                   device: torch.device | str | None = None) -> "LayerwiseGet":
        """Start a layer-wise load; ``handle.hit_tokens`` is exact at once, ``handle.wait(i)``
        returns layer ``i`` as soon as it is copied (overlap it with computing layer ``i-1``)."""
        from kvstore.layerwise import LayerwiseGet

        handle = LayerwiseGet(self._read(tokens, out, device))
        self._loads.add(handle)
        return handle

    def begin_put(self, tokens: object) -> "LayerwisePut":
        """Store a prompt's KV as the engine computes it: ``put_layer(i, kv_i)`` for each layer."""
        from kvstore.layerwise import LayerwisePut

        return LayerwisePut(self, tokens)

    # ---- put -----------------------------------------------------------------------------

    def new_chunks(self, tokens: object, kv_start: int = 0) -> list[ChunkRef]:
        """The chunks of ``tokens`` from ``kv_start`` on that no local tier holds (what a put
        would store; remote tiers dedupe in their writer)."""
        return self._unheld(self.chunks(tokens, include_partial=self.config.save_partial), kv_start)

    def _unheld(self, refs: list[ChunkRef], kv_start: int) -> list[ChunkRef]:
        refs = [r for r in refs if r.start >= kv_start]
        return [r for r, held in zip(refs, self.stack.held_locally([r.key for r in refs])) if not held]

    def put(self, tokens: object, kv: torch.Tensor, kv_start: int = 0) -> int:
        """Store the chunks of ``tokens`` not already stored locally; returns how many of them a
        tier took (stored, or queued for a slower tier); refusals are counted per tier.

        ``kv`` is ``[num_layers, 2, len(tokens) - kv_start, num_kv_heads, head_size]`` (MLA: 4-D):
        the KV of ``tokens[kv_start:]``. Engines that computed only a suffix (the rest came from
        a cache) pass just that; chunks before ``kv_start`` (a chunk boundary) are left alone.
        Returns once the fastest tier holds the chunks; slower tiers are written asynchronously.
        """
        total = num_tokens(tokens)
        if kv_start < 0 or kv_start % self.chunk_size or kv_start > total:
            raise InvalidInputError(f"kv_start {kv_start} must be a multiple of chunk_size {self.chunk_size} "
                                    f"within the {total} tokens")
        self.spec.check_kv(kv, num_tokens=total - kv_start)
        refs = self.chunks(tokens, include_partial=self.config.save_partial)
        new = self._unheld(refs, kv_start)
        # Tail first: when the prompt is larger than the fastest tier, the chunks its own put
        # evicts are then its tail, never its head (which would leave nothing to hit).
        stored = self.stack.write_many([(self._meta(r), kv[:, :, r.start - kv_start:r.end - kv_start])
                                        for r in reversed(new)])
        if new and not stored:
            log.debug("kvstore: no tier took any of %d new chunks", len(new))
        self.stack.touch([r.key for r in reversed(refs)])
        if self._access is not None:
            self._access.record("put", [r.key for r in refs], total, new=len(new))
        self.counters.store("puts")
        self.counters.store("put_tokens", total)
        self.counters.store("put_new_chunks", stored)
        return stored

    # ---- pins ------------------------------------------------------------------------------

    def pin(self, tokens: object, ttl_s: float) -> int:
        """Keep the stored prefix of ``tokens`` from eviction for ``ttl_s`` seconds.

        Returns the pinned token count (the stored prefix; nothing beyond it can be pinned).
        Raises PinLimitError, pinning nothing, if any tier's pinned-bytes cap would be exceeded.
        """
        if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool) or not 0 < ttl_s <= self.config.max_pin_ttl_s:
            raise InvalidInputError(f"ttl_s must be a number in (0, {self.config.max_pin_ttl_s}], got {ttl_s!r}")
        refs, _where, n = self._resolve(tokens)
        self.stack.pin([r.key for r in refs[:n]], ttl_s)
        if self._access is not None:
            self._access.record("pin", [r.key for r in refs[:n]], num_tokens(tokens), ttl_s=ttl_s)
        return refs[n - 1].end if n else 0

    def tool_started(self, session: str, tool: str, tokens: object, *, ago_s: float = 0.0) -> float:
        """An agent's turn ended in a call of ``tool``: pin the stored prefix of ``tokens`` (the
        session's context so far) for as long as that tool is expected to take (kvstore.agents).
        Returns this process's TTL, 0.0 if it pinned nothing (nothing stored, the pin cap
        refused, a tool expected to outlast the pause limit). ``ago_s``: how long ago the call
        started, for an engine that reports it late. A daemon tier is told too and pins on its
        own prediction (a network round trip; an unreachable daemon is skipped, never raised)."""
        refs, _where, n = self._resolve(tokens)
        keys = [r.key for r in refs[:n]]
        ttl = self.agents.tool_started(session, tool, keys, ago_s)
        self.stack.tool_started(self._shared_session(session), tool, keys, ago_s)
        if self._access is not None:
            self._access.record("tool_started", keys, num_tokens(tokens), ttl_s=ttl)
        return ttl

    def tool_finished(self, session: str, *, ago_s: float = 0.0) -> float | None:
        """The session's next turn is here (since ``ago_s``): learn the tool's duration and
        release its pins. Returns how long the tool took, None if the session was not paused."""
        took = self.agents.tool_finished(session, ago_s=ago_s)
        self.stack.tool_finished(self._shared_session(session), ago_s)
        if self._access is not None and took is not None:
            self._access.record("tool_finished", [], 0, duration_s=took)
        return took

    def _shared_session(self, session: str) -> str:
        """The session's name in a shared tier: scoped by this store's model and rank (its key
        namespace), so the tensor-parallel ranks of one engine, each with its own keys, pause
        side by side instead of each ending the other's pause."""
        return f"{session}@{self.hasher.root.hex()[:16]}"

    def unpin(self, tokens: object) -> int:
        """Release pins on the chunks of ``tokens``; returns how many tokens were pinned."""
        refs, _where, n = self._resolve(tokens)
        released = self.stack.unpin([r.key for r in refs[:n]])
        return sum(r.num_tokens for r in refs[:released])

    # ---- housekeeping --------------------------------------------------------------------

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write has reached its tier."""
        return self.stack.flush(timeout_s)

    def stats(self) -> dict[str, Any]:
        store, tiers = self.stack.tier_stats()
        return {**store, "pinned_chunks": len(self.pins.active()), "tiers": tiers}

    def clear(self) -> None:
        """Remove everything this store holds in every tier (pins included)."""
        self.stack.clear()

    def close(self) -> None:
        """Flush queued writes and release every tier. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for load in list(getattr(self, "_loads", ())):
            load.join()  # layer-wise loads hold leases on memory slots
        stack = getattr(self, "stack", None)
        if stack is not None:
            stack.close()
        if getattr(self, "_access", None) is not None:
            self._access.close()
        _LIVE_STORES.discard(self)
