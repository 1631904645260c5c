"""Layer-wise transfer so an engine can overlap loading layer i+1 with computing layer i.

``get_layers`` fixes the hit first (memory chunks are leased, blob chunks fetched and verified),
so ``hit_tokens`` is exact before any layer is consumed; a worker thread then copies layer by
layer into the output and signals each layer as it lands. ``begin_put`` collects the layers of a
forward pass for the chunks the store lacks and stores them when the last layer arrives.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Iterator

import torch

from kvstore.errors import CorruptObjectError, InvalidInputError
from kvstore.hashing import ChunkRef, num_tokens
from kvstore.codecs import CodecError, get_codec
from kvstore.objects import check_meta, decode_object, read_meta
from kvstore.tiers.base import BlobTier, MemoryTierBase

if TYPE_CHECKING:
    from kvstore.store import KVStore


class LayerwiseGet:
    """Handle of a layer-wise load. ``wait(i)`` returns ``out[i, :, :hit_tokens]`` once loaded."""

    def __init__(self, store: "KVStore", tokens: object, out: torch.Tensor | None,
                 device: torch.device | str | None) -> None:
        self._store = store
        refs, where, n = store._resolve(tokens)
        # Pin down the sources now: lease memory chunks, fetch and verify blob chunks.
        self._sources: list[tuple[ChunkRef, torch.Tensor, MemoryTierBase | None]] = []
        # Per tier: seconds spent fetching, verifying and copying its chunks (the copy thread adds
        # its share), reported as the tier's load_seconds like a plain get().
        self._seconds: dict[str, float] = {}
        self._tier_of: list[str] = []
        for ref, tier in zip(refs[:n], where[:n]):
            t0 = time.perf_counter()
            src = self._source(ref, tier)
            if src is None:
                break
            name = tier.name  # type: ignore[union-attr]
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - t0
            self._tier_of.append(name)
            self._sources.append((ref, src, tier if isinstance(tier, MemoryTierBase) else None))
        self.hit_tokens = self._sources[-1][0].end if self._sources else 0
        if out is None:
            out = torch.empty(store.spec.chunk_shape(self.hit_tokens), dtype=store.spec.dtype,
                              device=device or "cpu")
        else:
            store._check_out(out, self.hit_tokens)
        self.out = out
        self.num_layers = store.spec.num_layers
        self._ready = [threading.Event() for _ in range(self.num_layers)]
        self._error: BaseException | None = None
        # Not a daemon: a copy must never be cut off by interpreter exit (torch aborts the process).
        self._thread = threading.Thread(target=self._run, name="kvstore-layerwise-get")
        self._thread.start()
        store._track(self)
        total = num_tokens(tokens)
        store.counters.store("gets")
        store.counters.store("get_tokens", total)
        store.counters.store("get_hit_tokens", self.hit_tokens)
        store.counters.store("get_miss_tokens", total - self.hit_tokens)

    def _source(self, ref: ChunkRef, tier: object) -> torch.Tensor | None:
        store = self._store
        if isinstance(tier, MemoryTierBase):
            got = tier.acquire(ref.key)
            if got is None:
                return None
            store.counters.tier(tier.name, "hits")
            store.counters.tier(tier.name, "hit_tokens", ref.num_tokens)
            return got[0]
        assert isinstance(tier, BlobTier)
        blob = tier.get_blobs([ref.key])[0]
        if blob is None:
            return None
        expect = store._meta(ref)
        try:
            meta, payload = read_meta(blob)  # checksums: after this, decoding cannot meet corruption
            check_meta(meta, expect)
            codec = get_codec(meta.codec)
            kv: torch.Tensor | _FramedSource = (
                _FramedSource(codec, payload, expect) if hasattr(codec, "decode_frame")
                else decode_object(blob, expect))
        except (CorruptObjectError, CodecError):
            store.counters.tier(tier.name, "corrupt")
            tier.delete([ref.key])
            return None
        store.counters.tier(tier.name, "hits")
        store.counters.tier(tier.name, "hit_tokens", ref.num_tokens)
        return kv

    def _run(self) -> None:
        # Inference mode is thread-local: an ``out`` created under it (vLLM, the reference engine)
        # may only be written under it, so the copy thread adopts the mode of its target.
        try:
            with torch.inference_mode(self.out.is_inference()):
                self._copy_layers()
        except BaseException as exc:  # surfaced to the engine thread by wait()
            self._error = exc
            for ev in self._ready:
                ev.set()
        finally:
            for ref, _src, tier in self._sources:
                if tier is not None:
                    tier.release(ref.key)
            for name, seconds in self._seconds.items():
                self._store.counters.tier(name, "load_seconds", seconds)

    def _copy_layers(self) -> None:
        for layer in range(self.num_layers):
            for (ref, src, _tier), name in zip(self._sources, self._tier_of):
                t0 = time.perf_counter()
                part = src.layer(layer) if isinstance(src, _FramedSource) else src[layer]
                self.out[layer, :, ref.start:ref.end].copy_(part, non_blocking=self.out.is_cuda)
                self._seconds[name] += time.perf_counter() - t0
            if self.out.is_cuda:
                torch.cuda.current_stream(self.out.device).synchronize()
            self._ready[layer].set()

    def wait(self, layer: int, timeout_s: float | None = None) -> torch.Tensor:
        if not 0 <= layer < self.num_layers:
            raise InvalidInputError(f"layer {layer} out of range [0, {self.num_layers})")
        if not self._ready[layer].wait(timeout_s):
            raise TimeoutError(f"layer {layer} not loaded within {timeout_s}s")
        if self._error is not None:
            raise self._error
        return self.out[layer, :, :self.hit_tokens]

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for layer in range(self.num_layers):
            yield layer, self.wait(layer)

    def join(self) -> None:
        self._thread.join()

    def result(self) -> tuple[int, torch.Tensor]:
        """Wait for every layer; same return as ``KVStore.get``."""
        self.wait(self.num_layers - 1)
        self._thread.join()
        return self.hit_tokens, self.out[:, :, :self.hit_tokens]


class _FramedSource:
    """A verified object whose codec decodes in layer frames (cachegen): frames are decoded on
    demand in the loader thread, so layer 0 is ready after the first frame, not the whole chunk."""

    def __init__(self, codec: object, payload: memoryview, meta: object) -> None:
        self.codec = codec
        self.layout, self.frames = codec.frames(payload)  # type: ignore[attr-defined]
        shape = (self.layout.layers, self.layout.planes, self.layout.tokens, self.layout.heads, self.layout.head_size)
        self.buf = torch.empty(shape, dtype=self.layout.dtype)
        self.shape = tuple(meta.shape)  # type: ignore[attr-defined]
        self.ready = 0
        self.next_frame = 0

    def layer(self, layer: int) -> torch.Tensor:
        while self.ready <= layer:
            if self.next_frame >= len(self.frames):
                raise CodecError(f"frames end before layer {layer}")
            frame = self.frames[self.next_frame]
            start, part = self.codec.decode_frame(self.layout, frame)  # type: ignore[attr-defined]
            if start != self.ready:
                raise CodecError(f"frame for layer {start} where layer {self.ready} was expected")
            self.buf[start:start + part.shape[0]] = part
            self.ready = start + part.shape[0]
            self.next_frame += 1
        return self.buf[layer].reshape(self.shape[1:])


class LayerwisePut:
    """Collects one forward pass layer by layer; stores the new chunks when every layer is in."""

    def __init__(self, store: "KVStore", tokens: object) -> None:
        self._store = store
        refs = store.chunks(tokens, include_partial=store.config.save_partial)
        self.num_tokens = num_tokens(tokens)
        self._new = store._missing_locally(refs)
        self.new_chunks = len(self._new)
        self._lo = self._new[0].start if self._new else 0
        hi = self._new[-1].end if self._new else 0
        spec = store.spec
        self._staging = torch.empty(spec.chunk_shape(hi - self._lo), dtype=spec.dtype) if self._new else None
        self._seen = [False] * spec.num_layers
        self.committed = False

    def put_layer(self, layer: int, kv_layer: torch.Tensor) -> None:
        """``kv_layer`` is ``kv[layer]`` of the whole prompt: ``[2, num_tokens, heads, head_size]``."""
        spec = self._store.spec
        if not 0 <= layer < spec.num_layers:
            raise InvalidInputError(f"layer {layer} out of range [0, {spec.num_layers})")
        want = spec.chunk_shape(self.num_tokens)[1:]
        if tuple(kv_layer.shape) != want or kv_layer.dtype != spec.dtype:
            raise InvalidInputError(f"layer KV is {tuple(kv_layer.shape)} {kv_layer.dtype}, expected {want} {spec.dtype}")
        if self.committed:
            raise InvalidInputError("put_layer after commit")
        if self._staging is not None:
            self._staging[layer].copy_(kv_layer[:, self._lo:self._lo + self._staging.shape[2]])
        self._seen[layer] = True
        if all(self._seen):
            self.commit()

    def commit(self) -> int:
        """Store the new chunks; every layer must have been given. Returns chunks stored."""
        if self.committed:
            return self.new_chunks
        missing = [i for i, seen in enumerate(self._seen) if not seen]
        if missing:
            raise InvalidInputError(f"cannot commit: layers {missing[:8]}{'...' if len(missing) > 8 else ''} not given")
        store = self._store
        for ref in self._new:
            src = self._staging[:, :, ref.start - self._lo:ref.end - self._lo]  # type: ignore[index]
            store._put_chunk(store._meta(ref), src)
        store.counters.store("puts")
        store.counters.store("put_tokens", self.num_tokens)
        store.counters.store("put_new_chunks", self.new_chunks)
        self.committed = True
        self._staging = None
        return self.new_chunks
