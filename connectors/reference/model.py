"""The decoder's math, one layer at a time, with explicit positions.

The engine, the hook API and CacheBlend all need to step *into* the forward pass (wait for a
layer's cached KV, recompute a subset of tokens, patch K/V), so the model exposes per-layer
pieces (``qkv``, ``attend``, ``finish``) instead of one opaque ``forward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kvstore.connectors.reference.config import ModelConfig
from kvstore.errors import InvalidInputError


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Norm statistics in fp32 whatever the compute dtype, as HF does; otherwise bf16 drifts.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope:
    """HF-convention (non-interleaved) rotary embedding, cached per position."""

    def __init__(self, head_dim: int, theta: float, device: torch.device) -> None:
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` is ``[(batch,) tokens, heads, head_dim]``; cos/sin are ``[tokens, 1, head_dim]``."""
        return x * cos + rotate_half(x) * sin

    def rerotate(self, k: torch.Tensor, delta: torch.Tensor | int) -> torch.Tensor:
        """Move already-rotated keys by ``delta`` positions (RoPE composes additively)."""
        if isinstance(delta, int):
            delta = torch.full((k.shape[0],), delta, dtype=torch.int64, device=k.device)
        cos, sin = self.cos_sin(delta, torch.float32)
        return self.apply(k.float(), cos, sin).to(k.dtype)


class Transformer:
    """Weights plus the per-layer operations of a Llama-family decoder."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        c = config

        def w(name: str) -> torch.Tensor:
            try:
                return weights[name].to(device=self.device, dtype=dtype)
            except KeyError:
                raise InvalidInputError(f"weight {name!r} missing from the checkpoint") from None

        def opt(name: str) -> torch.Tensor | None:
            return w(name) if name in weights else None

        self.embed = w("model.embed_tokens.weight")
        if tuple(self.embed.shape) != (c.vocab_size, c.hidden_size):
            raise InvalidInputError(f"embed_tokens is {tuple(self.embed.shape)}, config says "
                                    f"({c.vocab_size}, {c.hidden_size})")
        self.norm = w("model.norm.weight")
        self.lm_head = self.embed if c.tie_word_embeddings or "lm_head.weight" not in weights else w("lm_head.weight")
        self.layers: list[LayerWeights] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(LayerWeights(
                input_norm=w(p + "input_layernorm.weight"),
                q=w(p + "self_attn.q_proj.weight"), k=w(p + "self_attn.k_proj.weight"),
                v=w(p + "self_attn.v_proj.weight"), o=w(p + "self_attn.o_proj.weight"),
                post_norm=w(p + "post_attention_layernorm.weight"),
                gate=w(p + "mlp.gate_proj.weight"), up=w(p + "mlp.up_proj.weight"),
                down=w(p + "mlp.down_proj.weight"),
                q_bias=opt(p + "self_attn.q_proj.bias"), k_bias=opt(p + "self_attn.k_proj.bias"),
                v_bias=opt(p + "self_attn.v_proj.bias")))
        self.rope = Rope(c.head_dim, c.rope_theta, self.device)
        self.scale = 1.0 / math.sqrt(c.head_dim)

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Every weight the forward pass reads, as computed with (for in-memory digests)."""
        out = [("embed", self.embed), ("norm", self.norm), ("lm_head", self.lm_head)]
        for i, lw in enumerate(self.layers):
            out += [(f"{i}.{f}", getattr(lw, f)) for f in lw.__dataclass_fields__ if getattr(lw, f) is not None]
        return out

    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> "Transformer":
        config = ModelConfig.load(model_dir)
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise InvalidInputError(f"no *.safetensors in {model_dir}")
        weights: dict[str, torch.Tensor] = {}
        for f in files:
            weights.update(load_file(str(f)))
        return cls(config, weights, dtype=dtype, device=device)

    # ---- per-layer pieces ----------------------------------------------------------------

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed[ids]

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, RoPE-rotated keys and values of hidden states ``h`` ``[(batch,) tokens, hidden]``."""
        c, lw = self.config, self.layers[layer]
        x = rms_norm(h, lw.input_norm, c.rms_norm_eps)
        lead = x.shape[:-1]  # [tokens] at inference, [batch, tokens] when training
        q = F.linear(x, lw.q, lw.q_bias).view(*lead, c.num_heads, c.head_dim)
        k = F.linear(x, lw.k, lw.k_bias).view(*lead, c.num_kv_heads, c.head_dim)
        v = F.linear(x, lw.v, lw.v_bias).view(*lead, c.num_kv_heads, c.head_dim)
        cos, sin = self.rope.cos_sin(positions, q.dtype)
        return self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_positions: torch.Tensor, kv_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of ``q`` ``[n, Hq, D]`` over ``k``/``v`` ``[m, Hkv, D]``.

        Keys are visible when their position is <= the query's (and inside Mistral's window).
        Without ``kv_positions`` keys sit at 0..m-1, the common prefix-cache case.
        """
        c = self.config
        m, n = k.shape[-3], q.shape[-3]
        dtype = q.dtype
        k, v = k.to(dtype), v.to(dtype)
        mask = None
        is_causal = False
        if kv_positions is None and c.sliding_window is None and m == n:
            is_causal = True  # fast path: plain causal prefill from position 0
        elif not (n == 1 and kv_positions is None and c.sliding_window is None):
            kpos = kv_positions if kv_positions is not None else torch.arange(m, device=q.device)
            mask = kpos[None, :] <= q_positions[:, None]
            if c.sliding_window is not None:
                mask &= kpos[None, :] > q_positions[:, None] - c.sliding_window
        out = F.scaled_dot_product_attention(
            q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), attn_mask=mask,
            is_causal=is_causal, scale=self.scale, enable_gqa=c.num_heads != c.num_kv_heads)
        return out.transpose(-3, -2).reshape(*q.shape[:-2], c.num_heads * c.head_dim)

    def finish(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection and SwiGLU MLP, both residual."""
        c, lw = self.config, self.layers[layer]
        h = h + F.linear(attn, lw.o)
        x = rms_norm(h, lw.post_norm, c.rms_norm_eps)
        return h + F.linear(F.silu(F.linear(x, lw.gate)) * F.linear(x, lw.up), lw.down)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.lm_head).float()
