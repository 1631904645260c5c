"""Request traces for capacity planning: the Mooncake FAST'25 JSONL form (the two shipped traces
by name, or any file in that form) and kvstore's own access log, read into one shape.

A request is a list of block ids (equal ids at the same position mean a shared prefix) and an
input length; tokens are made from the ids, deterministically, so the same trace gives the same
chunk keys on every run and machine.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

import numpy as np

from kvstore.errors import ConfigError

SHIPPED = ("conversation", "synthetic")


@dataclass(frozen=True)
class Request:
    at_s: float  # arrival, seconds from the trace's start
    blocks: tuple[int, ...]  # block ids, first to last
    input_length: int  # tokens; the last block holds the rest
    block_size: int
    bytes_per_token: int = 0  # the model's KV bytes per token, where the trace says (an access log)

    def tokens(self) -> np.ndarray:
        """Token ids: block id b at offset i -> a hash of (b, i), so equal ids give equal tokens."""
        ids = np.asarray(self.blocks, dtype=np.uint64)
        pos = np.arange(self.block_size, dtype=np.uint64)
        toks = ((ids[:, None] * np.uint64(self.block_size) + pos[None, :]) * np.uint64(2654435761)) % np.uint64(2**31 - 1)
        return toks.reshape(-1)[:self.input_length].astype(np.int64)


def _open(name: str) -> tuple[IO[str], str]:
    if name in SHIPPED:
        ref = resources.files(__package__) / f"{name}_trace.jsonl.gz"
        return gzip.open(ref.open("rb"), "rt"), name  # type: ignore[arg-type]
    path = Path(name)
    if not path.exists():
        raise ConfigError(f"trace {name!r}: no such file, and not a shipped trace ({', '.join(SHIPPED)})")
    if path.suffix == ".gz":
        return gzip.open(path, "rt"), path.name
    return open(path), path.name


def load(name: str, block_size: int = 512, limit: int | None = None) -> list[Request]:
    """Requests of a Mooncake-form trace, or of a kvstore access log (told apart by its lines)."""
    f, label = _open(name)
    out: list[Request] = []
    asked: dict[str, list[Request]] = {"lookup": [], "get": []}  # an access log's
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if "op" in rec:
                    if rec["op"] in asked and rec["keys"]:
                        asked[rec["op"]].append(_from_access_log(rec))
                else:
                    out.append(_from_mooncake(rec, block_size))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"trace {label}, line {lineno}: not a trace record ({exc})") from None
            if limit and len(out) >= limit:
                break
    # An engine that looks up before it loads asks twice per request: count its lookups only.
    out = out or asked["lookup"] or asked["get"]
    out = out[:limit] if limit else out
    if not out:
        raise ConfigError(f"trace {label}: no requests in it")
    return out


def _from_mooncake(rec: dict, block_size: int) -> Request:
    blocks = tuple(int(b) for b in rec["hash_ids"])
    length = int(rec["input_length"])
    if not blocks or not 0 < length <= block_size * len(blocks):
        raise ValueError(f"input_length {length} does not fit {len(blocks)} blocks of {block_size}")
    return Request(float(rec.get("timestamp", 0)) / 1000.0, blocks, length, block_size)


def _from_access_log(rec: dict) -> Request:
    """A lookup (or get) of the access log is a request; its put follows from it in a replay."""
    # Chunk keys are prefix-chained: a key names its whole prefix, so it is a block id.
    blocks = tuple(int(k[:15], 16) for k in rec["keys"])
    return Request(float(rec["t"]), blocks, int(rec["tokens"]), int(rec["chunk"]), int(rec.get("bytes_per_token", 0)))
