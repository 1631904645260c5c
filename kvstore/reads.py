"""The one read path of chunk KV: from whichever tiers hold a prefix's chunks into a buffer.

``KVStore.get`` and ``KVStore.get_layers`` both build a ``ChunkRead``. It fixes the hit first:
memory chunks are leased, disk chunks read straight into the output where the tier can do it,
other objects fetched and verified (a layer-framed codec is decoded frame by frame later). A
chunk that vanished from its tier since it was located (another thread's put evicted it) or
fails verification there is read from a lower tier that holds it; only a chunk no tier can
deliver ends the hit. Then the layers are copied (all at once for ``get``, one by one for
``get_layers``), and ``finish`` promotes what came from slower tiers, refreshes the prefix in
LRU order (its head most recent, so eviction takes tails first) and releases the leases.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from kvstore.codecs import get_codec
from kvstore.errors import CorruptObjectError
from kvstore.hashing import ChunkRef
from kvstore.objects import ObjectMeta, check_meta, decode_payload, read_meta
from kvstore.tiers.base import BlobTier, MemoryTierBase, ReadResult

if TYPE_CHECKING:
    from kvstore.tierstack import TierStack


@dataclass
class _Source:
    """One chunk of the hit: where it came from and how its layers are had."""

    ref: ChunkRef
    meta: ObjectMeta
    pos: int                          # the tier it was read from
    data: Any = None                  # a tensor [L, ...], a _Frames, or None (already in out)
    blob: Any = None                  # the verified object, for promotions in its codec
    leased: bool = False              # a memory-tier slot to release when done

    def layer(self, layer: int) -> torch.Tensor | None:
        if self.data is None:
            return None
        return self.data.layer(layer) if isinstance(self.data, _Frames) else self.data[layer]


class ChunkRead:
    def __init__(self, stack: "TierStack", refs: list[ChunkRef], where: list[int | None], out: torch.Tensor,
                 meta_of: Callable[[ChunkRef], ObjectMeta]) -> None:
        self.stack = stack
        self.out = out
        self._meta_of = meta_of
        self.seconds: dict[str, float] = {}
        self.sources: list[_Source] = []
        direct = out.device.type == "cpu" and out.is_contiguous()
        self._fetched = self._prefetch(refs, where)
        for ref, pos in zip(refs, where):
            src = self._locate(ref, pos, direct) if pos is not None else None
            if src is None:
                break
            self.sources.append(src)
        self.hit_tokens = self.sources[-1].ref.end if self.sources else 0
        self.usable = len(self.sources)  # sources[:usable] make the hit (fewer if one fails to decode)

    # ---- fixing the hit ------------------------------------------------------------------

    def _prefetch(self, refs: list[ChunkRef], where: list[int | None]) -> dict[tuple[int, bytes], Any]:
        """Every object a remote tier holds for this read, in one batched call per tier (one
        round trip per Redis node or daemon, not one per chunk). Only what the hit will use:
        the chunks up to the first one no tier holds."""
        wanted: dict[int, list[bytes]] = {}
        for ref, pos in zip(refs, where):
            if pos is None:
                break
            if self.stack.tiers[pos].is_remote:
                wanted.setdefault(pos, []).append(ref.key)
        fetched: dict[tuple[int, bytes], Any] = {}
        for pos, keys in wanted.items():
            tier = self.stack.tiers[pos]
            assert isinstance(tier, BlobTier)
            t0 = time.perf_counter()
            blobs = self.stack.guarded(tier, "get_blobs", lambda: tier.get_blobs(keys), [None] * len(keys))
            self.seconds[tier.name] = self.seconds.get(tier.name, 0.0) + time.perf_counter() - t0
            fetched.update(((pos, k), b) for k, b in zip(keys, blobs))
        return fetched

    def _locate(self, ref: ChunkRef, pos: int, direct: bool) -> _Source | None:
        """The chunk from tier ``pos``, else from the first lower tier that has it."""
        tiers = self.stack.tiers
        for p in range(pos, len(tiers)):
            if p > pos and not self.stack.contains(tiers[p], [ref.key])[0]:
                continue
            t0 = time.perf_counter()
            src = self._read(p, ref, direct)
            name = tiers[p].name
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            if src is not None:
                self.stack.hit(p, ref.num_tokens)
                return src
        return None

    def _read(self, pos: int, ref: ChunkRef, direct: bool) -> _Source | None:
        tier = self.stack.tiers[pos]
        meta = self._meta_of(ref)
        if isinstance(tier, MemoryTierBase):
            got = self.stack.guarded(tier, "acquire", lambda: tier.acquire(ref.key), None)
            if got is None:  # evicted since it was located
                return None
            view, stored = got
            if stored.shape != meta.shape:
                tier.release(ref.key)
                self.stack.reject(pos, ref.key, f"shape {stored.shape}, expected {meta.shape}")
                return None
            return _Source(ref, meta, pos, view, leased=True)
        assert isinstance(tier, BlobTier)
        if (pos, ref.key) in self._fetched:
            return self._decode(pos, ref, meta, self._fetched.pop((pos, ref.key)))
        if direct:
            dst = self.out[:, :, ref.start:ref.end]
            planes = [memoryview(dst[i, j].view(torch.uint8).numpy()) for i in range(dst.shape[0])
                      for j in range(dst.shape[1])]
            status = self.stack.guarded(tier, "read_into", lambda: tier.read_into(ref.key, meta, planes),
                                        ReadResult.MISSING)
            if status is ReadResult.OK:
                return _Source(ref, meta, pos)
            if status is ReadResult.MISSING:
                return None
            if status is ReadResult.CORRUPT:
                self.stack.reject(pos, ref.key, tier.last_error or "failed verification")
                return None
        blob = self.stack.guarded(tier, "get_blobs", lambda: tier.get_blobs([ref.key])[0], None)
        return self._decode(pos, ref, meta, blob)

    def _decode(self, pos: int, ref: ChunkRef, meta: ObjectMeta, blob: Any) -> _Source | None:
        """A whole object read from a blob tier, checked against what this chunk must be."""
        if blob is None:
            return None
        try:
            stored, payload = read_meta(blob)  # checksums: after this, decoding cannot meet corruption
            check_meta(stored, meta)
            codec = get_codec(stored.codec)
            data: Any = _Frames(codec, payload, meta) if codec.layer_frames else decode_payload(stored, payload)
        except (CorruptObjectError, ValueError) as exc:  # ValueError: CodecError, an unknown codec
            self.stack.reject(pos, ref.key, exc)
            return None
        return _Source(ref, stored, pos, data, blob=blob)

    # ---- moving layers -------------------------------------------------------------------

    def copy_layer(self, layer: int) -> None:
        """Copy layer ``layer`` of every chunk into ``out`` (frames decode on demand)."""
        out = self.out
        for src in self.sources:
            t0 = time.perf_counter()
            try:
                part = src.layer(layer)
            except ValueError as exc:  # CodecError: checksummed frames that still do not decode
                self.stack.reject(src.pos, src.ref.key, exc)
                raise CorruptObjectError(f"chunk {src.ref.key.hex()} failed to decode layer {layer}: {exc}") from exc
            if part is not None:
                out[layer, :, src.ref.start:src.ref.end].copy_(part, non_blocking=out.is_cuda)
            name = self.stack.tiers[src.pos].name
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def copy_all(self) -> None:
        """Copy every chunk into ``out`` whole: one copy per chunk, not one per layer (a chunk's
        layers are strided in ``out``; 32 small copies cost a third of a memory tier's speed)."""
        out = self.out
        for i, src in enumerate(self.sources):
            t0 = time.perf_counter()
            if isinstance(src.data, _Frames):
                try:
                    for layer in range(out.shape[0]):
                        out[layer, :, src.ref.start:src.ref.end].copy_(src.data.layer(layer))
                except ValueError as exc:  # CodecError: checksummed frames that still do not decode
                    self.stack.reject(src.pos, src.ref.key, exc)
                    self.hit_tokens, self.usable = src.ref.start, i  # the hit ends before this chunk
                    break
            elif src.data is not None:
                out[:, :, src.ref.start:src.ref.end].copy_(src.data, non_blocking=out.is_cuda)
            name = self.stack.tiers[src.pos].name
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        if self.out.is_cuda:
            torch.cuda.current_stream(self.out.device).synchronize()

    def finish(self, copied: bool = True) -> None:
        """Promote (if every layer was copied), refresh LRU, release leases, count seconds."""
        try:
            if copied:
                hit = self.sources[:self.usable]
                for src in hit:
                    if src.pos:
                        kv = self.out[:, :, src.ref.start:src.ref.end]
                        self.stack.promote(src.pos, src.meta, kv=kv, blob=src.blob)
                self.stack.touch([s.ref.key for s in reversed(hit)])
        finally:
            for src in self.sources:
                if src.leased:
                    tier = self.stack.tiers[src.pos]
                    assert isinstance(tier, MemoryTierBase)
                    tier.release(src.ref.key)
                    src.leased = False
            for name, seconds in self.seconds.items():
                self.stack.counters.tier(name, "load_seconds", seconds)
            self.seconds = {}


class _Frames:
    """A verified object whose codec decodes in layer frames (cachegen): frames are decoded on
    demand, so layer 0 is ready after the first frame, not the whole chunk."""

    def __init__(self, codec: Any, payload: memoryview, meta: ObjectMeta) -> None:
        from kvstore.codecs import CodecError
        from kvstore.spec import dtype_from_name

        self.codec = codec
        self.layout, self.frames = codec.frames(payload)
        lay = self.layout
        self.buf = torch.empty((lay.layers, lay.planes, lay.tokens, lay.heads, lay.head_size), dtype=lay.dtype)
        self.shape = tuple(meta.shape)
        if (self.buf.numel() != math.prod(self.shape) or (lay.layers, lay.planes, lay.tokens) != self.shape[:3]
                or lay.dtype != dtype_from_name(meta.dtype)):
            raise CodecError(f"frames hold {tuple(self.buf.shape)} {lay.dtype}; the header says {self.shape} {meta.dtype}")
        self.ready = 0
        self.next_frame = 0

    def layer(self, layer: int) -> torch.Tensor:
        from kvstore.codecs import CodecError

        while self.ready <= layer:
            if self.next_frame >= len(self.frames):
                raise CodecError(f"frames end before layer {layer}")
            start, part = self.codec.decode_frame(self.layout, self.frames[self.next_frame])
            if start != self.ready:
                raise CodecError(f"frame for layer {start} where layer {self.ready} was expected")
            if part.shape[0] < 1 or tuple(part.shape[1:]) != tuple(self.buf.shape[1:]):
                raise CodecError(f"frame of shape {tuple(part.shape)} for a chunk of {tuple(self.buf.shape)}")
            self.buf[start:start + part.shape[0]] = part
            self.ready = start + part.shape[0]
            self.next_frame += 1
        return self.buf[layer].reshape(self.shape[1:])


__all__ = ["ChunkRead"]
