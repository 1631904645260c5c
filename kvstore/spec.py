"""What makes KV from two runs interchangeable: the model fingerprint and the chunk shapes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import cached_property

import msgpack
import torch
import xxhash

from kvstore.errors import InvalidInputError

# Dtypes an engine may keep its KV in. Names are the stable on-disk spelling; torch's repr is not
# guaranteed stable across releases, so every object header records these names.
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidInputError(f"unsupported KV dtype {dtype}; supported: {sorted(DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidInputError(f"unknown dtype name {name!r}; supported: {sorted(DTYPES)}") from None


class KVKind(str, Enum):
    """MHA/GQA caches keep K and V per head; MLA caches one latent vector per token."""

    MHA = "mha"
    MLA = "mla"


@dataclass(frozen=True)
class KVSpec:
    """The layout of one model's KV cache and everything that makes it reusable.

    Chunk KV is ``[num_layers, 2, tokens, num_kv_heads, head_size]`` for MHA/GQA and
    ``[num_layers, 1, tokens, head_size]`` for MLA (``head_size`` is then the latent width).
    The token axis is always axis 2, which is what lets the store slice chunks generically.
    """

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype = torch.float16
    kv_kind: KVKind = KVKind.MHA
    # Anything that changes K values for the same tokens belongs here: RoPE base/scaling, a
    # weights digest when model_id alone is ambiguous (fine-tunes), TP slicing.
    rope: str = ""
    weights_digest: str = ""
    tp_rank: int = 0
    tp_size: int = 1
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.model_id:
            raise InvalidInputError("KVSpec.model_id must be a non-empty string")
        for name in ("num_layers", "num_kv_heads", "head_size", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidInputError(f"KVSpec.{name} must be a positive int, got {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise InvalidInputError(f"KVSpec.tp_rank {self.tp_rank} not in [0, tp_size={self.tp_size})")
        dtype_name(self.dtype)  # validates
        object.__setattr__(self, "kv_kind", KVKind(self.kv_kind))
        if self.kv_kind is KVKind.MLA and self.num_kv_heads != 1:
            raise InvalidInputError("an MLA KVSpec has num_kv_heads=1 (one latent vector per token)")

    @property
    def kv_planes(self) -> int:
        return 2 if self.kv_kind is KVKind.MHA else 1

    def chunk_shape(self, num_tokens: int) -> tuple[int, ...]:
        if self.kv_kind is KVKind.MHA:
            return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_size)
        return (self.num_layers, 1, num_tokens, self.head_size)

    @cached_property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * self.kv_planes * self.num_kv_heads * self.head_size * elem

    @cached_property
    def fingerprint(self) -> bytes:
        """16-byte digest of every field; part of every chunk key and every object header."""
        fields = asdict(self)
        fields["dtype"] = dtype_name(self.dtype)
        fields["kv_kind"] = self.kv_kind.value
        fields["extra"] = [list(kv) for kv in self.extra]
        blob = msgpack.packb(sorted(fields.items()), use_bin_type=True)
        return xxhash.xxh3_128_digest(b"kvstore-spec-v1\0" + blob)

    def check_kv(self, kv: torch.Tensor, num_tokens: int | None = None) -> None:
        """Raise InvalidInputError naming what differs between ``kv`` and this spec."""
        if not isinstance(kv, torch.Tensor):
            raise InvalidInputError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        if kv.dtype != self.dtype:
            raise InvalidInputError(f"kv dtype {kv.dtype} does not match the spec's {self.dtype}")
        tokens = kv.shape[2] if kv.dim() > 2 else -1
        expected = self.chunk_shape(tokens if num_tokens is None else num_tokens)
        if tuple(kv.shape) != expected:
            layout = ("[num_layers, 2, tokens, num_kv_heads, head_size]" if self.kv_kind is KVKind.MHA
                      else "[num_layers, 1, tokens, latent]")
            raise InvalidInputError(
                f"kv shape {tuple(kv.shape)} does not match the spec: expected {expected} {layout}")
