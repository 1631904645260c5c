"""What a model's KV depends on besides the tokens, reduced to digests for ``KVSpec``.

Two engines may share KV only if they compute the same K and V for the same tokens. That is a
function of every weight feeding a layer's K/V (in practice all of them: layer i's keys depend
on every layer below), the effective model config (RoPE type, theta and scaling, norm epsilon,
head layout, sliding window, ...) after any override, the compute and cache dtypes and the
cache's byte layout. The tokenizer is not: tokens are the key.

Sampling a checkpoint is not enough (a fine-tune of two layers' attention keeps 37 of pylm-6l's
56 tensors unsampled), so checkpoints are digested whole. Reading 16 GB at every start would be
too slow, so a file's digest is cached under ``$XDG_CACHE_HOME/kvstore-digests``, keyed by its
real path, device, inode, size, mtime and ctime: a rewrite, a copy or a ``touch`` re-digests, a
restart does not. The cache lives beside kvstore's own, not beside the checkpoint: model
directories are often read-only (the HF hub cache, a mounted volume). Known blind spot: a file
rewritten in place through ``mmap`` may keep its size, mtime and ctime (a second write to an
already dirty page does not update them); the README says to clear the cache after such edits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import xxhash

from kvstore.paths import cache_home

log = logging.getLogger(__name__)

# Files whose bytes are weights. Anything else in a model directory (tokenizer, README,
# generation config) cannot change K or V.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

# Config keys that cannot change K or V: where the files were, which library wrote them, and
# generation-time switches. Everything else counts: an unknown key costs a miss, never wrong KV.
NEUTRAL_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "use_cache",
    "return_dict", "output_attentions", "output_hidden_states", "torchscript", "tokenizer_class",
    "task_specific_params", "id2label", "label2id", "problem_type", "pad_token_id", "bos_token_id",
    "eos_token_id", "sep_token_id", "decoder_start_token_id", "prefix", "finetuning_task",
    "_attn_implementation_autoset", "_attn_implementation_internal", "torch_dtype", "dtype",
})

_READ_BLOCK = 8 << 20
_PROGRESS_MIN_BYTES = 1 << 30  # a progress bar for checkpoints that take seconds to digest


def digest_cache_dir() -> Path:
    return cache_home() / "kvstore-digests"


def _stat_key(path: Path) -> tuple[str, str]:
    real = os.path.realpath(path)
    st = os.stat(real)
    ident = f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return xxhash.xxh3_64_hexdigest(ident.encode()), ident


def _hash_file(path: Path, progress: Any = None) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if progress is not None:
                progress.update(n)
    return h.hexdigest()


def file_digest(path: str | os.PathLike[str], *, cache_dir: Path | None = None, progress: Any = None) -> str:
    """xxh3-128 of a file's whole content, from the digest cache when the file is unchanged."""
    path = Path(path)
    name, ident = _stat_key(path)
    cache = (cache_dir or digest_cache_dir()) / f"{name}.json"
    try:
        rec = json.loads(cache.read_text())
        if rec.get("ident") == ident and isinstance(rec.get("digest"), str):
            if progress is not None:
                progress.update(path.stat().st_size)
            return rec["digest"]
    except (OSError, ValueError):
        pass
    digest = _hash_file(path, progress)
    if _stat_key(path)[1] != ident:  # changed while we read it: do not remember a torn digest
        log.warning("kvstore: %s changed while it was digested; digesting it again", path)
        return file_digest(path, cache_dir=cache_dir, progress=None)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            json.dump({"ident": ident, "digest": digest}, fh)
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only home costs a re-digest at the next start, nothing else
        log.debug("kvstore: cannot cache the digest of %s: %s", path, exc)
    return digest


def weight_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The files of a checkpoint directory that hold weights (top level and one level down)."""
    root = Path(model_dir)
    files = [f for pattern in ("*", "*/*") for f in root.glob(pattern)
             if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith(".")]
    return sorted(set(files))


def checkpoint_digest(model_dir: str | os.PathLike[str], *, cache_dir: Path | None = None) -> str:
    """Digest of every weight file's full content, with its name relative to the directory:
    a byte-identical copy elsewhere has the same digest, a change to any byte does not."""
    root = Path(model_dir)
    files = weight_files(root)
    h = xxhash.xxh3_128(b"kvstore-checkpoint-v2\0")
    total = sum(f.stat().st_size for f in files)
    progress = None
    if total >= _PROGRESS_MIN_BYTES:
        from tqdm import tqdm

        progress = tqdm(total=total, unit="B", unit_scale=True, desc=f"kvstore: digesting {root.name}",
                        disable=None, leave=False)
    try:
        for f in files:
            rel = f.relative_to(root).as_posix()
            h.update(rel.encode() + b"\0" + file_digest(f, cache_dir=cache_dir, progress=progress).encode())
    finally:
        if progress is not None:
            progress.close()
    return h.hexdigest()


def tensors_digest(named: Iterable[tuple[str, Any]]) -> str:
    """Digest of in-memory tensors (name, dtype, shape, bytes): for models that never came from
    a directory (built in memory, or changed after loading). Moves each tensor to the CPU."""
    h = xxhash.xxh3_128(b"kvstore-tensors-v1\0")
    for name, t in sorted(named, key=lambda kv: kv[0]):
        t = t.detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def config_digest(config: Mapping[str, Any], neutral: frozenset[str] = NEUTRAL_CONFIG_KEYS) -> str:
    """Digest of a model config with the keys that cannot change K or V left out (at any depth:
    multimodal configs nest a text config). The same config gives the same digest in every process."""
    def clean(value: Any) -> Any:
        if isinstance(value, Enum):
            value = value.value
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items() if str(k) not in neutral}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (set, frozenset)):
            return sorted((clean(v) for v in value), key=repr)
        if isinstance(value, torch.dtype):
            return str(value)
        # Config objects (a quantization config, a nested HF config): their fields, never a
        # repr that may hold a memory address and differ between vLLM's two processes.
        for method in ("to_dict", "model_dump"):
            if callable(getattr(value, method, None)):
                return {"__type__": type(value).__name__, **clean(getattr(value, method)())}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {"__type__": type(value).__name__, **clean(dataclasses.asdict(value))}
        if hasattr(value, "__dict__") and not isinstance(value, type):
            return {"__type__": type(value).__name__, **clean({k: v for k, v in vars(value).items()
                                                               if not k.startswith("_")})}
        return repr(value)

    blob = json.dumps(clean(config), sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_128_hexdigest(b"kvstore-config-v1\0" + blob.encode())


__all__ = ["NEUTRAL_CONFIG_KEYS", "WEIGHT_SUFFIXES", "checkpoint_digest", "config_digest", "digest_cache_dir",
           "file_digest", "tensors_digest", "weight_files"]
