"""The reference engine's KV cache for one sequence: contiguous or paged.

Contiguous is one ``[L, 2, capacity, H, D]`` tensor, the store's own chunk layout, so a hit is
loaded straight into it with no staging copy. Paged keeps fixed-size blocks from a shared pool,
as vLLM and SGLang do; it exists to prove the hook API's block mapping, not to be fast.
"""

from __future__ import annotations

import torch

from kvstore.connectors.hooks import gather_blocks, scatter_blocks
from kvstore.errors import InvalidInputError


class ContiguousCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.kv = torch.empty(num_layers, 2, capacity, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.capacity = capacity

    def load_target(self, num_tokens: int) -> torch.Tensor:
        """Where a store hit lands: the cache itself."""
        return self.kv

    def fill(self, layer: int, kv_layer: torch.Tensor) -> None:
        """Loaded KV is already in place (``load_target`` is the cache)."""

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[0]
        if end > self.capacity:
            raise InvalidInputError(f"sequence of {end} tokens exceeds the cache capacity {self.capacity}")
        self.kv[layer, 0, start:end] = k
        self.kv[layer, 1, start:end] = v

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer, 0, :end], self.kv[layer, 1, :end]

    def export(self, num_tokens: int) -> torch.Tensor:
        """``[L, 2, num_tokens, H, D]`` for saving (a view; the cache outlives the save)."""
        return self.kv[:, :, :num_tokens]


class BlockPool:
    """A shared pool of KV blocks ``[L, 2, num_blocks, block_size, H, D]`` and its free list."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.blocks = torch.empty(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                  dtype=dtype, device=device)
        self.block_size = block_size
        self.free = list(range(num_blocks - 1, -1, -1))

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise InvalidInputError(f"KV block pool exhausted: need {n} blocks, {len(self.free)} free")
        return [self.free.pop() for _ in range(n)]

    def release(self, ids: list[int]) -> None:
        self.free.extend(reversed(ids))


class PagedCache:
    """One sequence's block table over a ``BlockPool``; token slots are computed, never looped."""

    def __init__(self, pool: BlockPool, capacity: int) -> None:
        self.pool = pool
        bs = pool.block_size
        self.block_ids = pool.allocate(-(-capacity // bs))
        self.capacity = len(self.block_ids) * bs
        table = torch.tensor(self.block_ids, dtype=torch.int64, device=pool.blocks.device)
        # slot of token t in the flattened [num_blocks * block_size] axis
        self.slots = (table[:, None] * bs + torch.arange(bs, device=table.device)).reshape(-1)
        self._staging: torch.Tensor | None = None

    def _flat(self, layer: int) -> torch.Tensor:
        b = self.pool.blocks[layer]
        return b.view(2, b.shape[1] * b.shape[2], *b.shape[3:])

    def load_target(self, num_tokens: int) -> torch.Tensor:
        L, _, _, _, H, D = self.pool.blocks.shape
        self._staging = torch.empty(L, 2, num_tokens, H, D, dtype=self.pool.blocks.dtype,
                                    device=self.pool.blocks.device)
        return self._staging

    def fill(self, layer: int, kv_layer: torch.Tensor) -> None:
        """Scatter a loaded layer ``[2, hit, H, D]`` into this sequence's blocks: whole blocks via
        ``scatter_blocks``, the partial last block through its slots."""
        hit = kv_layer.shape[1]
        bs = self.pool.block_size
        full = hit // bs
        layer_blocks = self.pool.blocks[layer].transpose(0, 1)  # [num_blocks, 2, bs, H, D] view
        if full:
            data = kv_layer[:, :full * bs].reshape(2, full, bs, *kv_layer.shape[2:]).transpose(0, 1)
            ids = torch.tensor(self.block_ids[:full], dtype=torch.int64)
            scatter_blocks(layer_blocks, ids, data)
        if hit % bs:
            self.write(layer, full * bs, kv_layer[0, full * bs:], kv_layer[1, full * bs:])

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[0]
        if end > self.capacity:
            raise InvalidInputError(f"sequence of {end} tokens exceeds the cache capacity {self.capacity}")
        flat = self._flat(layer)
        slots = self.slots[start:end]
        flat[0].index_copy_(0, slots, k.to(flat.dtype))
        flat[1].index_copy_(0, slots, v.to(flat.dtype))

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self._flat(layer)
        slots = self.slots[:end]
        return flat[0].index_select(0, slots), flat[1].index_select(0, slots)

    def export(self, num_tokens: int) -> torch.Tensor:
        n_blocks = -(-num_tokens // self.pool.block_size)
        ids = torch.tensor(self.block_ids[:n_blocks], dtype=torch.int64)
        # [L, 2, nb, bs, H, D] -> [L, 2, nb*bs, H, D]: one gather per call, not per token
        got = gather_blocks(self.pool.blocks.transpose(0, 2), ids).transpose(0, 2)
        L, _, nb, bs, H, D = got.shape
        return got.reshape(L, 2, nb * bs, H, D)[:, :, :num_tokens]

    def free(self) -> None:
        self.pool.release(self.block_ids)
        self.block_ids = []
