"""The peers bench/codec_quality.py measures kvstore's codecs against, each as a pair of
functions ``encode(kv) -> bytes`` and ``decode(bytes, kv) -> tensor`` on one chunk
``[layers, 2, tokens, heads, head_size]``:

- TurboQuant (a random rotation, then per-coordinate Lloyd-Max codebooks) through PyPI's
  ``lmcache-turbo-quant-serde`` (needs ``tqai``);
- KIVI (asymmetric uniform quantization, keys per channel over groups of tokens, values per
  token over groups of channels, an fp16 scale and zero per group), a short reference
  implementation written here from the paper's description;
- LMCache 0.5.6's CacheGen serializer, in LMCache's own venv through a worker process.

A peer whose package is missing is returned with the reason, never dropped silently.
"""

from __future__ import annotations

import atexit
import json
import os
import struct
import subprocess
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Peer:
    name: str
    encode: Callable[[torch.Tensor], bytes] | None
    decode: Callable[[bytes, torch.Tensor], torch.Tensor] | None
    missing: str = ""  # why it cannot run here


def turboquant(bits: int) -> Peer:
    name = f"TurboQuant {bits}-bit"
    try:
        from lmcache_turbo_quant_serde import TurboQuantDeserializer, TurboQuantSerializer
    except ImportError as exc:
        return Peer(name, None, None, f"not installed ({exc.name}): pip install lmcache-turbo-quant-serde tqai")
    ser, des = TurboQuantSerializer(bits=bits), TurboQuantDeserializer()
    return Peer(name, lambda kv: ser.to_bytes(kv), lambda blob, like: des.from_bytes(blob).to(like.dtype))


def kivi(bits: int, group: int) -> Peer:
    """KIVI's layout: K quantized per channel (a group is ``group`` tokens of one channel), V per
    token (a group is ``group`` channels of one token); round to nearest on ``2**bits`` levels."""
    levels = (1 << bits) - 1

    def quant(x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        scale = ((hi - lo) / levels).clamp_min(1e-8).half().float()
        lo = lo.half().float()
        q = torch.round((x - lo) / scale).clamp_(0, levels).to(torch.uint8)
        return _pack(q.numpy().reshape(-1), bits), scale.half(), lo.half()

    def groups(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, P, T, H, D = kv.shape
        assert T % group == 0 and (H * D) % group == 0, "tokens and channels must be multiples of the group"
        k = kv[:, 0].float().reshape(L, T // group, group, H * D).transpose(2, 3)  # [L, T/g, C, g]
        v = kv[:, 1].float().reshape(L, T, (H * D) // group, group)               # [L, T, C/g, g]
        return k, v

    def encode(kv: torch.Tensor) -> bytes:
        k, v = groups(kv)
        parts = []
        for x in (k, v):
            packed, scale, lo = quant(x)
            parts += [packed.tobytes(), scale.numpy().tobytes(), lo.numpy().tobytes()]
        return struct.pack("<6I", *map(len, parts)) + b"".join(parts)

    def decode(blob: bytes, like: torch.Tensor) -> torch.Tensor:
        sizes = struct.unpack_from("<6I", blob)
        off, chunks = 24, []
        for n in sizes:
            chunks.append(blob[off:off + n])
            off += n
        k_shape, v_shape = (t.shape for t in groups(like))
        out = []
        for (packed, scale, lo), shape in zip((chunks[0:3], chunks[3:6]), (k_shape, v_shape)):
            q = torch.from_numpy(_unpack(np.frombuffer(packed, np.uint8), bits, int(np.prod(shape))).reshape(shape))
            s = torch.from_numpy(np.frombuffer(scale, np.float16).copy()).float().reshape(*shape[:-1], 1)
            z = torch.from_numpy(np.frombuffer(lo, np.float16).copy()).float().reshape(*shape[:-1], 1)
            out.append(q.float() * s + z)
        L, P, T, H, D = like.shape
        k = out[0].transpose(2, 3).reshape(L, T, H, D)
        v = out[1].reshape(L, T, H, D)
        return torch.stack([k, v], 1).to(like.dtype)

    return Peer(f"KIVI {bits}-bit, group {group}", encode, decode)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit values packed little-endian into bytes (any width 1-8)."""
    bitplanes = ((q[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bitplanes, bitorder="little")


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed, bitorder="little")[:count * bits].reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(1).astype(np.uint8)


def lmcache_cachegen(model_dir: Path) -> Peer:
    """LMCache 0.5.6's CacheGen, in its own venv (scripts/test_lmcache.sh makes it; it pins
    packages the main environment must not get): a worker process there encodes and decodes
    over a pipe (bench/_lmcache_cachegen_worker.py). Its speed includes the pipe (a few ms a
    chunk, under 2% of its time)."""
    name = "LMCache 0.5.6 CacheGen"
    venv = Path(os.environ.get("KVSTORE_LMCACHE_VENV", ROOT / ".venv-lmcache"))
    python = venv / "bin" / "python"
    if not python.exists():
        return Peer(name, None, None, f"not installed: no venv at {venv} (bash scripts/test_lmcache.sh makes it)")
    worker = subprocess.Popen([str(python), str(Path(__file__).with_name("_lmcache_cachegen_worker.py")),
                               str(model_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    atexit.register(worker.kill)

    def call(op: bytes, shape: tuple[int, ...], body: bytes) -> bytes:
        assert worker.stdin is not None and worker.stdout is not None
        msg = op + struct.pack("<5I", *shape) + body
        worker.stdin.write(struct.pack("<I", len(msg)) + msg)
        worker.stdin.flush()
        head = worker.stdout.read(4)
        if len(head) < 4:
            raise RuntimeError(f"the LMCache worker exited (status {worker.poll()})")
        return worker.stdout.read(struct.unpack("<I", head)[0])

    def encode(kv: torch.Tensor) -> bytes:
        return call(b"e", tuple(kv.shape), kv.half().contiguous().numpy().tobytes())

    def decode(blob: bytes, like: torch.Tensor) -> torch.Tensor:
        raw = call(b"d", tuple(like.shape), blob)
        return torch.from_numpy(np.frombuffer(raw, np.float16).copy()).reshape(like.shape).to(like.dtype)

    try:  # one round trip now: a venv without lmcache (or a broken one) is reported, not a crash later
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        probe = torch.randn(cfg["num_hidden_layers"], 2, 256, heads, head_dim).half()
        decode(encode(probe), probe)
    except Exception as exc:  # noqa: BLE001 - any failure means the peer cannot run here
        worker.kill()
        return Peer(name, None, None, f"not run: its worker failed in {venv} ({exc})")
    return Peer(name, encode, decode)


FAMILIES = ("turboquant", "kivi", "lmcache")


def peers(model_dir: Path, families: list[str] | None = None) -> list[Peer]:
    """Every peer, or those of the named ``FAMILIES`` (chosen by family before any is built:
    LMCache's starts a worker process)."""
    made: list[Peer] = []
    for family in FAMILIES:
        if families and family not in families:
            continue
        if family == "turboquant":
            made += [turboquant(4), turboquant(3), turboquant(2)]
        elif family == "kivi":
            made += [kivi(4, 64), kivi(3, 64), kivi(2, 32)]
        else:
            made.append(lmcache_cachegen(model_dir))
    return made
