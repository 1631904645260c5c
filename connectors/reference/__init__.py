"""The reference engine: a small Llama/Qwen2/Mistral decoder in torch that loads HF-style model
directories and talks to kvstore through the hook API (``kvstore.connectors.hooks``)."""

from kvstore.connectors.reference.config import ModelConfig
from kvstore.connectors.reference.engine import Engine, Generation, SamplingParams
from kvstore.connectors.reference.model import Transformer
from kvstore.connectors.reference.weights import DEFAULT_MODEL, build_tiny_model

__all__ = ["DEFAULT_MODEL", "Engine", "Generation", "ModelConfig", "SamplingParams", "Transformer",
           "build_tiny_model"]
