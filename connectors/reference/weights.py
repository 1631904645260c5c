"""Model directories: write one (config.json + model.safetensors + tokenizer), and
build tiny ones with deterministic random weights for tests and benchmarks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvstore.connectors.reference.config import ModelConfig

# The committed trained model (see train.py); its tokenizer is reused by tiny test models.
PACKAGED_MODELS = Path(__file__).parent / "models"
DEFAULT_MODEL = PACKAGED_MODELS / "pylm-6l"


def random_weights(config: ModelConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """HF-named weights drawn from a seeded generator: the same seed gives the same model on
    every machine, which is what makes KV from two test processes interchangeable."""
    g = torch.Generator().manual_seed(seed)
    c = config

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(c.vocab_size, c.hidden_size) * 25,
                                  "model.norm.weight": torch.ones(c.hidden_size)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(c.hidden_size)
        w[p + "post_attention_layernorm.weight"] = torch.ones(c.hidden_size)
        w[p + "self_attn.q_proj.weight"] = rnd(q_out, c.hidden_size) * 5
        w[p + "self_attn.k_proj.weight"] = rnd(kv_out, c.hidden_size) * 5
        w[p + "self_attn.v_proj.weight"] = rnd(kv_out, c.hidden_size) * 5
        w[p + "self_attn.o_proj.weight"] = rnd(c.hidden_size, q_out)
        w[p + "mlp.gate_proj.weight"] = rnd(c.intermediate_size, c.hidden_size) * 5
        w[p + "mlp.up_proj.weight"] = rnd(c.intermediate_size, c.hidden_size) * 5
        w[p + "mlp.down_proj.weight"] = rnd(c.hidden_size, c.intermediate_size)
        if c.attention_bias:
            for name, n in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                w[p + f"self_attn.{name}_proj.bias"] = rnd(n)
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = rnd(c.vocab_size, c.hidden_size) * 25
    return w


def save_model(model_dir: str | Path, config: ModelConfig, weights: dict[str, torch.Tensor],
               dtype: torch.dtype = torch.float16, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a directory that our engine, transformers and vLLM all load."""
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = config.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in weights.items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    return out


def tiny_config(family: str = "llama", *, vocab_size: int = 4096, hidden_size: int = 128, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 32, intermediate_size: int = 256,
                **extra: object) -> ModelConfig:
    return ModelConfig(family=family, vocab_size=vocab_size, hidden_size=hidden_size,
                       intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, attention_bias=family == "qwen2",
                       bos_token_id=1, eos_token_id=2, **extra)  # type: ignore[arg-type]


def build_tiny_model(model_dir: str | Path, family: str = "llama", seed: int = 0,
                     dtype: torch.dtype = torch.float16, **config: object) -> Path:
    """A deterministic random model (with the packaged tokenizer when present), for fast tests."""
    cfg = tiny_config(family, **config)  # type: ignore[arg-type]
    tok = DEFAULT_MODEL if (DEFAULT_MODEL / "tokenizer.json").is_file() else None
    return save_model(model_dir, cfg, random_weights(cfg, seed), dtype=dtype, tokenizer_dir=tok)
