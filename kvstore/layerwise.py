"""Layer-wise transfer so an engine can overlap loading layer i+1 with computing layer i.

``LayerwiseGet`` runs the store's one read path (:class:`kvstore.reads.ChunkRead`): the hit is
fixed before it is returned, so ``hit_tokens`` is exact before any layer is consumed; a worker
thread then copies layer by layer into the output and signals each layer as it lands, and
finishes the read (promotions, LRU refresh, leases) after the last one. ``LayerwisePut``
collects the layers of a forward pass for the chunks the store lacks and puts them when the
last layer arrives.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Iterator

import torch

from kvstore.errors import InvalidInputError
from kvstore.hashing import num_tokens
from kvstore.reads import ChunkRead

if TYPE_CHECKING:
    from kvstore.store import KVStore


class LayerwiseGet:
    """Handle of a layer-wise load. ``wait(i)`` returns ``out[i, :, :hit_tokens]`` once loaded."""

    def __init__(self, read: ChunkRead) -> None:
        self._read = read
        self.hit_tokens = read.hit_tokens
        self.out = read.out
        self.num_layers = read.out.shape[0]
        self._ready = [threading.Event() for _ in range(self.num_layers)]
        self._error: BaseException | None = None
        # Not a daemon: a copy must never be cut off by interpreter exit (torch aborts the process).
        self._thread = threading.Thread(target=self._run, name="kvstore-layerwise-get")
        self._thread.start()

    def _run(self) -> None:
        # Inference mode is thread-local: an ``out`` created under it (vLLM, the reference engine)
        # may only be written under it, so the copy thread adopts the mode of its target.
        copied = False
        try:
            with torch.inference_mode(self.out.is_inference()):
                for layer in range(self.num_layers):
                    self._read.copy_layer(layer)
                    if self.out.is_cuda:
                        torch.cuda.current_stream(self.out.device).synchronize()
                    self._ready[layer].set()
                copied = True
                self._read.finish()
        except BaseException as exc:  # surfaced to the engine thread by wait()
            self._error = exc
            for ev in self._ready:
                ev.set()
            if not copied:
                self._read.finish(copied=False)

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


class LayerwisePut:
    """Collects one forward pass layer by layer; stores the new chunks when every layer is in."""

    def __init__(self, store: "KVStore", tokens: object) -> None:
        self._store = store
        self._tokens = tokens
        self.num_tokens = num_tokens(tokens)
        new = store.new_chunks(tokens)
        self.new_chunks = len(new)
        self._lo = new[0].start if new else 0
        hi = new[-1].end if new else 0
        spec = store.spec
        self._staging = torch.empty(spec.chunk_shape(hi - self._lo), dtype=spec.dtype) if new else None
        self._seen = [False] * spec.num_layers
        self.committed = False
        self.stored = 0

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
            return self.stored
        missing = [i for i, seen in enumerate(self._seen) if not seen]
        if missing:
            raise InvalidInputError(f"cannot commit: layers {missing[:8]}{'...' if len(missing) > 8 else ''} not given")
        if self._staging is not None:
            end = self._lo + self._staging.shape[2]
            self.stored = self._store.put(self._tokens[:end], self._staging, kv_start=self._lo)  # type: ignore[index]
        self.committed = True
        self._staging = None
        return self.stored
