"""KVStore: the engine-facing contract (lookup, get, put, pin) over the configured tiers.

Reads consult tiers fastest first and return the longest chunk-aligned prefix that verifies;
writes land in the fastest tier synchronously and flow down through per-tier writer threads.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Sequence

import torch

from kvstore.codecs import CodecError, get_codec
from kvstore.config import StoreConfig, load_config
from kvstore.errors import CorruptObjectError, InvalidInputError
from kvstore.hashing import ChunkHasher, ChunkRef, num_tokens
from kvstore.objects import ObjectMeta, decode_object, encode_object, read_meta
from kvstore.pins import PinRegistry, check_pin_budget
from kvstore.spec import KVSpec, dtype_from_name, dtype_name
from kvstore.stats import Counters
from kvstore.tiers.base import BlobTier, MemoryTierBase, Tier
from kvstore.tiers.disk import DiskTier, ReadResult
from kvstore.tiers.factory import build_tier
from kvstore.writer import PendingWrite, TierWriter

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

    def __init__(self, spec: KVSpec, config: Any = None) -> None:
        self.spec = spec
        self.config: StoreConfig = load_config(config)
        self.chunk_size = self.config.chunk_size
        self.hasher = ChunkHasher(spec.fingerprint, self.config.tenant, self.chunk_size, self.config.salt)
        self.counters = Counters()
        self.pins = PinRegistry()
        self._dtype_name = dtype_name(spec.dtype)
        self.tiers: list[Tier] = []
        self._writers: dict[str, TierWriter] = {}
        self._closed = False
        try:
            for tc in self.config.tiers.values():
                self.tiers.append(build_tier(tc, spec=spec, chunk_size=self.chunk_size, counters=self.counters,
                                             pins=self.pins, namespace=self.hasher.root, on_evict=self._on_evict))
            for tier in self.tiers[1:]:
                if isinstance(tier, BlobTier):
                    self._writers[tier.name] = TierWriter(
                        tier, self.counters, tier.config.queue_size, self.config.queue_full == "block",
                        self.config.put_timeout_s)
        except BaseException:
            self.close()
            raise
        self._loads: "weakref.WeakSet[Any]" = weakref.WeakSet()
        _LIVE_STORES.add(self)
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="kvstore-pin-sweeper", daemon=True)
        self._sweeper.start()

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

    def _locate(self, refs: Sequence[ChunkRef]) -> list[Tier | None]:
        """For each chunk, the fastest tier that has it, checked per tier in one batched call."""
        where: list[Tier | None] = [None] * len(refs)
        todo = list(range(len(refs)))
        for tier in self.tiers:
            if not todo:
                break
            found = tier.contains([refs[i].key for i in todo])
            for i, hit in zip(todo, found):
                if hit:
                    where[i] = tier
            todo = [i for i in todo if where[i] is None]
        return where

    @staticmethod
    def _prefix_len(where: Sequence[Tier | None]) -> int:
        for i, tier in enumerate(where):
            if tier is None:
                return i
        return len(where)

    def _resolve(self, tokens: object) -> tuple[list[ChunkRef], list[Tier | None], int]:
        """Chunks of ``tokens``, where each is stored, and how many leading chunks hit.

        When the chain breaks at chunk n, a partial tail stored by an earlier, shorter prompt
        (e.g. the previous chat turn) may still cover the start of chunk n: the longest such tail
        in a local tier extends the hit, and replaces ``refs[n]``.
        """
        data, refs = self.hasher.split(tokens)
        where = self._locate(refs)
        n = self._prefix_len(where)
        if n < len(refs) and self.config.save_partial and refs[n].num_tokens > 1:
            tails = self.hasher.tail_keys(data, refs, n)
            for tier in self.tiers:
                if tier.is_remote:
                    continue
                found = tier.contains([t.key for t in tails])
                if any(found):
                    best = found.index(True)  # tails are longest first
                    refs[n] = tails[best]
                    where[n] = tier
                    n += 1
                    break
        return refs, where, n

    # ---- lookup / get --------------------------------------------------------------------

    def lookup(self, tokens: object) -> int:
        """Tokens of the longest stored prefix (chunk-aligned; a stored partial tail counts)."""
        refs, _where, n = self._resolve(tokens)
        hit = refs[n - 1].end if n else 0
        self.counters.store("lookups")
        self.counters.store("lookup_tokens", num_tokens(tokens))
        self.counters.store("lookup_hit_tokens", hit)
        return hit

    def get(self, tokens: object, out: torch.Tensor | None = None,
            device: torch.device | str | None = None) -> tuple[int, torch.Tensor]:
        """Load the longest stored prefix. Returns ``(hit_tokens, kv[:, :, :hit_tokens])``.

        With ``out`` (shaped like the prompt's KV or longer) the KV is written into it and the
        returned tensor is a view of ``out``. Chunks that fail verification end the hit there.
        """
        refs, where, n = self._resolve(tokens)
        hit_upper = refs[n - 1].end if n else 0
        if out is None:
            out = torch.empty(self.spec.chunk_shape(hit_upper), dtype=self.spec.dtype, device=device or "cpu")
        else:
            self._check_out(out, hit_upper)
        loaded = self._load(refs[:n], where[:n], out)
        self._touch(refs[:loaded])
        hit = refs[loaded - 1].end if loaded else 0
        total = num_tokens(tokens)
        self.counters.store("gets")
        self.counters.store("get_tokens", total)
        self.counters.store("get_hit_tokens", hit)
        self.counters.store("get_miss_tokens", total - hit)
        return hit, out[:, :, :hit]

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

    def _load(self, refs: Sequence[ChunkRef], where: Sequence[Tier | None], out: torch.Tensor) -> int:
        """Copy located chunks into ``out``; returns how many leading chunks loaded and verified."""
        failed = len(refs)
        by_tier: dict[str, list[int]] = {}
        for i, tier in enumerate(where):
            by_tier.setdefault(tier.name, []).append(i)  # type: ignore[union-attr]
        for tier in self.tiers:
            idx = [i for i in by_tier.get(tier.name, ()) if i < failed]
            if not idx:
                continue
            t0 = time.perf_counter()
            if isinstance(tier, MemoryTierBase):
                bad = self._load_memory(tier, [refs[i] for i in idx], out)
            else:
                bad = self._load_blobs(tier, [refs[i] for i in idx], out)
            self.counters.tier(tier.name, "load_seconds", time.perf_counter() - t0)
            if bad is not None:
                failed = min(failed, idx[bad])
        return failed

    def _load_memory(self, tier: MemoryTierBase, refs: list[ChunkRef], out: torch.Tensor) -> int | None:
        for j, ref in enumerate(refs):
            got = tier.acquire(ref.key)
            if got is None:  # evicted since we located it
                return j
            view, meta = got
            try:
                if meta.shape != self.spec.chunk_shape(ref.num_tokens):
                    self.counters.tier(tier.name, "corrupt")
                    return j
                out[:, :, ref.start:ref.end].copy_(view, non_blocking=view.is_cuda or out.is_cuda)
                if self.config.promote and tier is not self.tiers[0]:
                    self._promote(tier, meta, view, None)  # still leased: the view is stable
            finally:
                if view.is_cuda or out.is_cuda:
                    torch.cuda.synchronize()
                tier.release(ref.key)
            self.counters.tier(tier.name, "hits")
            self.counters.tier(tier.name, "hit_tokens", ref.num_tokens)
        return None

    def _load_blobs(self, tier: Tier, refs: list[ChunkRef], out: torch.Tensor) -> int | None:
        assert isinstance(tier, BlobTier)
        if isinstance(tier, DiskTier) and out.device.type == "cpu" and out.is_contiguous():
            return self._load_disk_direct(tier, refs, out)
        return self._load_blobs_decoded(tier, refs, out)

    def _load_blobs_decoded(self, tier: BlobTier, refs: list[ChunkRef], out: torch.Tensor) -> int | None:
        blobs = tier.iter_blobs([r.key for r in refs])
        for j, (ref, blob) in enumerate(zip(refs, blobs)):
            if blob is None:
                return j
            meta = self._meta(ref)
            try:
                kv = decode_object(blob, meta)
            except CorruptObjectError as exc:
                log.warning("tier %s: chunk %s rejected: %s", tier.name, ref.key.hex(), exc)
                self.counters.tier(tier.name, "corrupt")
                tier.delete([ref.key])
                return j
            out[:, :, ref.start:ref.end].copy_(kv)
            self.counters.tier(tier.name, "hits")
            self.counters.tier(tier.name, "hit_tokens", ref.num_tokens)
            if self.config.promote:
                self._promote(tier, meta, kv, blob)
        return None

    def _load_disk_direct(self, tier: DiskTier, refs: list[ChunkRef], out: torch.Tensor) -> int | None:
        """Disk hits read straight into ``out`` (no read buffer, no copy); see DiskTier.read_into."""
        for j, ref in enumerate(refs):
            meta = self._meta(ref)
            dst = out[:, :, ref.start:ref.end]
            planes = [dst[layer, plane] for layer in range(dst.shape[0]) for plane in range(dst.shape[1])]
            status = tier.read_into(ref.key, meta, [memoryview(p.view(torch.uint8).numpy()) for p in planes])
            if status is ReadResult.FALLBACK:
                if self._load_blobs_decoded(tier, [ref], out) is not None:
                    return j
                continue
            if status is ReadResult.MISSING:
                return j
            if status is ReadResult.CORRUPT:
                log.warning("tier %s: chunk %s rejected: %s", tier.name, ref.key.hex(), tier.last_error)
                self.counters.tier(tier.name, "corrupt")
                tier.delete([ref.key])
                return j
            self.counters.tier(tier.name, "hits")
            self.counters.tier(tier.name, "hit_tokens", ref.num_tokens)
            if self.config.promote:
                self._promote(tier, meta, dst, None)
        return None

    def _promote(self, source: Tier, meta: ObjectMeta, kv: torch.Tensor, blob: Any) -> None:
        """Copy a chunk found in a slower tier into every faster one."""
        for tier in self.tiers:
            if tier is source:
                break
            if isinstance(tier, MemoryTierBase):
                if tier.put(meta, kv) is not None:
                    self.counters.tier(tier.name, "promotions")
            elif tier.name in self._writers and not tier.contains([meta.key])[0]:
                # The blob buffer is reused by the next read: the async writer gets its own copy.
                if blob is not None and tier.config.codec == read_meta(blob)[0].codec:
                    item = PendingWrite(meta, blob=[bytes(blob)])
                else:
                    item = PendingWrite(meta, kv.clone())
                if self._writers[tier.name].submit(item):
                    self.counters.tier(tier.name, "promotions")

    def get_layers(self, tokens: object, out: torch.Tensor | None = None,
                   device: torch.device | str | None = None) -> "LayerwiseGet":
        """Start a layer-wise load; ``handle.hit_tokens`` is exact at once, ``handle.wait(i)``
        returns layer ``i`` as soon as it is copied (overlap it with computing layer ``i-1``)."""
        from kvstore.layerwise import LayerwiseGet

        return LayerwiseGet(self, tokens, out, device)

    def begin_put(self, tokens: object) -> "LayerwisePut":
        """Store a prompt's KV as the engine computes it: ``put_layer(i, kv_i)`` for each layer."""
        from kvstore.layerwise import LayerwisePut

        return LayerwisePut(self, tokens)

    # ---- put -----------------------------------------------------------------------------

    def put(self, tokens: object, kv: torch.Tensor, kv_start: int = 0) -> int:
        """Store the chunks of ``tokens`` not already stored locally; returns how many were new.

        ``kv`` is ``[num_layers, 2, len(tokens) - kv_start, num_kv_heads, head_size]`` (MLA: 4-D):
        the KV of ``tokens[kv_start:]``. Engines that computed only a suffix (the rest came from
        a cache) pass just that; chunks before ``kv_start`` (a chunk boundary) are left alone.
        Returns once the fastest tier holds the chunks; slower tiers are written asynchronously.
        """
        total = num_tokens(tokens)
        if kv_start < 0 or kv_start % self.chunk_size or kv_start > total:
            raise InvalidInputError(f"kv_start {kv_start} must be a multiple of chunk_size {self.chunk_size} "
                                    f"within the {total} tokens")
        refs = self.chunks(tokens, include_partial=self.config.save_partial)
        self.spec.check_kv(kv, num_tokens=total - kv_start)
        new = self._missing_locally([r for r in refs if r.start >= kv_start])
        for ref in new:
            self._put_chunk(self._meta(ref), kv[:, :, ref.start - kv_start:ref.end - kv_start])
        self._touch(refs)
        self.counters.store("puts")
        self.counters.store("put_tokens", num_tokens(tokens))
        self.counters.store("put_new_chunks", len(new))
        return len(new)

    def _touch(self, refs: Sequence[ChunkRef]) -> None:
        """Refresh a used prefix so its *first* chunk ends up most recent. Plain LRU order would
        evict a prompt's first chunk first, and a prefix chain without its head is worthless;
        this way eviction takes tails before the prefixes many prompts share."""
        keys = [r.key for r in reversed(refs)]
        for tier in self.tiers:
            if not tier.is_remote:
                tier.touch(keys)

    def _missing_locally(self, refs: Sequence[ChunkRef]) -> list[ChunkRef]:
        """Chunks no in-process or on-disk tier holds (remote tiers dedupe in their writer)."""
        present = [False] * len(refs)
        keys = [r.key for r in refs]
        for tier in self.tiers:
            if tier.is_remote:
                continue
            for i, hit in enumerate(tier.contains(keys)):
                present[i] = present[i] or hit
        return [r for r, there in zip(refs, present) if not there]

    def _put_chunk(self, meta: ObjectMeta, src: torch.Tensor) -> None:
        first = self.tiers[0]
        through = [t for t in self.tiers[1:] if t.config.write == "through"]
        slow = [t for t in through if t.name in self._writers]
        fast = [t for t in through if isinstance(t, MemoryTierBase)]
        if isinstance(first, MemoryTierBase):
            t0 = time.perf_counter()
            stored = first.put(meta, src, hold=len(slow))
            self.counters.tier(first.name, "write_seconds", time.perf_counter() - t0)
            if stored is None and first.contains([meta.key])[0]:
                return  # a concurrent put of the same chunk won the race
        else:
            stored = None
        for tier in fast:
            tier.put(meta, src)
        if stored is not None:
            # Async writers read the leased slot; each releases its lease when written.
            for tier in slow:
                self._writers[tier.name].submit(
                    PendingWrite(meta, stored, release=lambda k=meta.key: first.release(k)))
            return
        if isinstance(first, BlobTier):
            t0 = time.perf_counter()
            first.put_blobs([(meta, encode_object(meta, src, first.config.codec))])
            self.counters.tier(first.name, "write_seconds", time.perf_counter() - t0)
        if slow:
            # No memory tier holds it: writers get a private copy (the caller may reuse ``src``).
            owned = src.detach().to("cpu", copy=True).contiguous()
            for tier in slow:
                self._writers[tier.name].submit(PendingWrite(meta, owned))

    # ---- eviction / demotion ---------------------------------------------------------------

    def _on_evict(self, tier: Tier, key: bytes, fetch: Any) -> None:
        """Demote an evicted chunk one tier down, unless that tier already has it."""
        pos = self.tiers.index(tier)
        if pos + 1 == len(self.tiers):
            return
        lower = self.tiers[pos + 1]
        if lower.contains([key])[0]:
            return
        if isinstance(lower, MemoryTierBase):
            view, meta = fetch()
            if lower.put(meta, view) is not None:
                self.counters.tier(tier.name, "demotions")
            return
        writer = self._writers.get(lower.name)
        data = fetch() if writer is not None else None
        if data is None:
            return
        if isinstance(data, tuple):  # from a memory tier: (slot view, meta); the slot is reused next
            view, meta = data
            item = PendingWrite(meta, view.detach().to("cpu", copy=True))
        else:  # an encoded object from a blob tier: pass it through, re-encode only across codecs
            try:
                meta, payload = read_meta(data)
                if lower.config.codec == meta.codec:
                    item = PendingWrite(meta, blob=[data])
                else:
                    kv = get_codec(meta.codec).decode(payload, meta.shape, dtype_from_name(meta.dtype))
                    item = PendingWrite(meta, kv)
            except (CorruptObjectError, CodecError):
                self.counters.tier(tier.name, "corrupt")
                return
        if writer.submit(item):
            self.counters.tier(tier.name, "demotions")

    # ---- pins ------------------------------------------------------------------------------

    def pin(self, tokens: object, ttl_s: float) -> int:
        """Keep the stored prefix of ``tokens`` from eviction for ``ttl_s`` seconds.

        Returns the pinned token count (the stored prefix; nothing beyond it can be pinned).
        Raises PinLimitError, pinning nothing, if any tier's pinned-bytes cap would be exceeded.
        """
        if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool) or not 0 < ttl_s <= self.config.max_pin_ttl_s:
            raise InvalidInputError(f"ttl_s must be a number in (0, {self.config.max_pin_ttl_s}], got {ttl_s!r}")
        refs, _where, n = self._resolve(tokens)
        keys = [r.key for r in refs[:n]]
        check_pin_budget(self.tiers, self.pins.active(), keys)
        self.pins.pin(keys, ttl_s)
        for tier in self.tiers:
            if isinstance(tier, BlobTier):
                tier.expire(keys, ttl_s)
        return refs[n - 1].end if n else 0

    def unpin(self, tokens: object) -> int:
        """Release pins on the chunks of ``tokens``; returns how many tokens were pinned."""
        refs, _where, n = self._resolve(tokens)
        released = self.pins.unpin(r.key for r in refs[:n])
        return sum(r.num_tokens for r in refs[:released])

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.config.pin_sweep_s):
            self.pins.sweep()

    def _track(self, load: Any) -> None:
        self._loads.add(load)

    # ---- housekeeping --------------------------------------------------------------------

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write has reached its tier."""
        return all(w.flush(timeout_s) for w in self._writers.values())

    def stats(self) -> dict[str, Any]:
        store, per_tier = self.counters.snapshot(t.name for t in self.tiers)
        tiers: dict[str, Any] = {}
        for tier in self.tiers:
            st = tier.stats()
            entry: dict[str, Any] = per_tier[tier.name]
            entry.update(objects=st.objects, bytes=st.bytes, capacity=st.capacity,
                         pinned_bytes=st.pinned_bytes, available=st.available)
            if tier.name in self._writers:
                entry["queued_writes"] = self._writers[tier.name].pending
            tiers[tier.name] = entry
        return {**store, "pinned_chunks": len(self.pins.active()), "tiers": tiers}

    def clear(self) -> None:
        """Remove everything this store holds in every tier (pins included)."""
        self.flush()
        self.pins.unpin(self.pins.active())
        for tier in self.tiers:
            tier.clear()

    def close(self) -> None:
        """Flush queued writes and release every tier. Idempotent."""
        if self._closed:
            return
        self._closed = True
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        for load in list(getattr(self, "_loads", ())):
            load.join()  # layer-wise loads hold leases on memory slots
        for writer in self._writers.values():
            writer.close()
        for tier in self.tiers:
            tier.close()
        _LIVE_STORES.discard(self)
