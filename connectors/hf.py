"""Prefix reuse for Hugging Face transformers' ``generate()``.

``HFConnector(model, config).generate(input_ids, ...)`` loads the longest stored prefix of the
prompt into a ``DynamicCache``, lets ``generate`` compute only the rest, and stores the prompt's
new chunks. Across calls and processes (disk/Redis/daemon tiers) users of plain transformers get
the reuse an inference server gives, with greedy outputs identical to a run without the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kvstore.connectors.hooks import KVHooks, LoadFailed
from kvstore.errors import InvalidInputError
from kvstore.fingerprint import config_digest, tensors_digest
from kvstore.spec import KVSpec
from kvstore.store import KVStore

log = logging.getLogger(__name__)


def spec_for(model: Any, model_id: str | None = None) -> KVSpec:
    """The KVSpec of a transformers causal LM. Its identity is what the model computes with:
    the weights in memory (a fine-tune, a merged adapter or a quantized load differ from the
    files they came from) and the whole config, RoPE and attention layout included."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    source = Path(str(getattr(cfg, "_name_or_path", "") or ""))
    rope = f"theta={getattr(cfg, 'rope_theta', None)},scaling={getattr(cfg, 'rope_scaling', None)}"
    return KVSpec(model_id=model_id or (source.name or type(model).__name__), num_layers=cfg.num_hidden_layers,
                  num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_size=head_dim,
                  dtype=model.dtype, rope=rope, weights_digest=tensors_digest(model.state_dict().items()),
                  extra=(("engine", "transformers"), ("config", config_digest(cfg.to_dict())),
                         ("attn", str(getattr(cfg, "_attn_implementation", None)))))


def uncacheable(config: Any) -> str | None:
    """Why a model's prefix KV cannot be reused through a ``DynamicCache``, if it cannot: a
    sliding-window cache keeps only the window (what it holds is not the prefix), and dynamic
    or long-context RoPE scaling makes a prefix's keys depend on the whole sequence's length."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return f"a sliding window of {window} tokens"
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "sliding-window attention layers"
    for name in ("rope_scaling", "rope_parameters"):
        rope = getattr(config, name, None)
        kind = (rope.get("rope_type") or rope.get("type")) if isinstance(rope, dict) else None
        if kind in ("dynamic", "longrope"):
            return f"{kind} RoPE scaling (a prefix's keys depend on the sequence length)"
    return None


def _layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


class HFConnector:
    """kvstore for one transformers model. Batch size 1 (prefix reuse is per prompt)."""

    def __init__(self, model: Any, config: Any = None, *, store: KVStore | None = None,
                 model_id: str | None = None) -> None:
        self.model = model
        self.spec = spec_for(model, model_id)
        self.store = store if store is not None else KVStore(self.spec, config)
        if self.store.spec != self.spec:
            raise InvalidInputError(f"the store's spec {self.store.spec} does not match the model's {self.spec}")
        self.hooks = KVHooks(self.store)
        self.last_hit_tokens = 0
        self.bypass = uncacheable(model.config)
        if self.bypass:
            log.warning("kvstore: %s has %s; its prompts are computed without the cache", self.spec.model_id,
                        self.bypass)

    def _prefix_cache(self, tokens: list[int]) -> Any:
        from transformers import DynamicCache

        self.last_hit_tokens = 0
        load = self.hooks.load(tokens)
        hit = min(load.hit_tokens, len(tokens) - 1)  # generate() must compute at least one token
        if hit <= 0:
            load.finish()
            return None
        cache = DynamicCache(config=self.model.config)
        device = self.model.device
        try:
            for layer in range(self.spec.num_layers):
                kv = load.wait(layer)
                # store layout [2, T, H, D] -> transformers' [batch, H, T, D]
                k = kv[0, :hit].transpose(0, 1).unsqueeze(0).to(device)
                v = kv[1, :hit].transpose(0, 1).unsqueeze(0).to(device)
                cache.update(k, v, layer)
        except LoadFailed:  # the prompt is computed whole: none of the half-built cache is kept
            log.warning("kvstore: load failed; transformers computes the whole prompt")
            return None
        finally:
            load.finish()
        self.last_hit_tokens = hit
        return cache

    def _save(self, tokens: list[int], cache: Any) -> None:
        n = len(tokens)
        layers = [torch.stack(_layer_kv(cache, i))[:, 0, :, :n].transpose(1, 2)
                  for i in range(self.spec.num_layers)]  # each [2, n, H, D]
        kv = torch.stack(layers).to("cpu", self.spec.dtype).contiguous()
        self.hooks.save("hf", tokens, kv)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``model.generate`` with the prompt's stored prefix preloaded; same arguments and return."""
        if "past_key_values" in kwargs:
            raise InvalidInputError("HFConnector.generate builds past_key_values itself; do not pass one")
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.shape[0] != 1:
            raise InvalidInputError(f"HFConnector.generate takes one prompt (batch size 1), got {ids.shape[0]}")
        tokens = ids[0].tolist()
        # The last call's save runs in the background; wait for it, so a follow-up prompt (the
        # next chat turn) hits what the last one stored instead of racing it.
        self.hooks.release("hf")
        if self.bypass:
            self.last_hit_tokens = 0
            return self.model.generate(ids.to(self.model.device), **kwargs)
        cache = self._prefix_cache(tokens)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        out = self.model.generate(ids.to(self.model.device), past_key_values=cache, use_cache=True, **kwargs)
        self._save(tokens, cache)
        return out

    def flush(self) -> None:
        self.hooks.release("hf")
        self.store.flush()

    def close(self) -> None:
        self.flush()
        self.hooks.close()
        self.store.close()

    def __enter__(self) -> "HFConnector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
