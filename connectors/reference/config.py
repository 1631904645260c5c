"""The model architectures the reference engine runs, read from a Hugging Face ``config.json``.

Llama, Qwen2 and Mistral share one decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU);
they differ only in the handful of fields below, so one frozen record covers all three.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvstore.errors import InvalidInputError

# HF ``architectures`` entry -> our family name. Qwen2 adds biases to q/k/v; Mistral may use a
# sliding window; everything else is shared.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
_FAMILY_TO_ARCH = {v: k for k, v in ARCHITECTURES.items()}


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.family not in _FAMILY_TO_ARCH:
            raise InvalidInputError(f"unsupported model family {self.family!r}; supported: {sorted(_FAMILY_TO_ARCH)}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidInputError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise InvalidInputError(f"head_dim {self.head_dim} must be even for RoPE")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        archs = hf.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            raise InvalidInputError(
                f"unsupported architectures {archs}; the reference engine runs {sorted(ARCHITECTURES)}")
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise InvalidInputError(f"rope_scaling {scaling} is not supported by the reference engine")
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id")
        return cls(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
            sliding_window=(hf.get("sliding_window") if family == "mistral" or hf.get("use_sliding_window")
                            else None),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise InvalidInputError(f"{path} not found: a model directory holds config.json + *.safetensors")
        return cls.from_hf(json.loads(path.read_text()))

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers and vLLM load as the same model."""
        out: dict[str, Any] = {
            "architectures": [_FAMILY_TO_ARCH[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.family == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.family in ("mistral", "qwen2"):
            out["sliding_window"] = self.sliding_window
        if self.family == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
        return out

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())
