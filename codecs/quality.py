"""How much a lossy codec changes KV: relative error and attention-output error, plus a
synthetic KV generator with the structure real caches have.

Attention-output error is the number that matters to a model: softmax(QK^T/sqrt(d))V with
decoded K,V against the original, for random queries. Relative error alone overstates V noise
(attention averages it) and understates K outliers (softmax amplifies them).
"""

from __future__ import annotations

import math

import torch


def next_token_kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    """KL(ref || got) in nats between next-token distributions given as logits ``[..., vocab]``,
    averaged over positions: how a decoded cache changes what the model predicts."""
    p, q = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def relative_error(original: torch.Tensor, decoded: torch.Tensor) -> float:
    a, b = original.float(), decoded.float()
    return float(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a).clamp_min(1e-12))


LOGIT_STD = 2.0


def attention_error(original: torch.Tensor, decoded: torch.Tensor, num_queries: int = 16, seed: int = 0) -> float:
    """Mean over layers and heads of ||attn(decoded) - attn(original)|| / ||attn(original)||.

    ``original``/``decoded``: ``[layers, 2, tokens, heads, head_size]``. Queries are drawn with
    logits of standard deviation ``LOGIT_STD`` over the chunk.
    """
    if original.shape[1] != 2:
        raise ValueError("attention_error needs K and V planes ([layers, 2, tokens, heads, head_size])")
    g = torch.Generator().manual_seed(seed)
    k, v = original[:, 0].float(), original[:, 1].float()   # [L, T, H, D]
    k2, v2 = decoded[:, 0].float(), decoded[:, 1].float()
    layers, _tokens, heads, dim = k.shape
    q = torch.randn(layers, num_queries, heads, dim, generator=g)
    # Scale each query so its logits over the chunk have std LOGIT_STD: attention as peaky as in
    # trained models (a few tokens dominate), not the near-argmax that raw outlier keys give.
    logits = torch.einsum("lqhd,lthd->lhqt", q, k)
    q = q * (LOGIT_STD / logits.std(dim=-1).clamp_min(1e-6)).permute(0, 2, 1)[..., None]

    def attn(kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        w = torch.einsum("lqhd,lthd->lhqt", q, kk)
        return torch.einsum("lhqt,lthd->lhqd", w.softmax(-1), vv)

    ref, got = attn(k, v), attn(k2, v2)
    err = torch.linalg.vector_norm(got - ref, dim=(-2, -1)) / torch.linalg.vector_norm(ref, dim=(-2, -1)).clamp_min(1e-12)
    return float(err.mean())


def synthetic_kv(layers: int = 32, heads: int = 8, head_size: int = 128, tokens: int = 256,
                 dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.Tensor:
    """KV with the structure codecs exploit and must survive: keys with per-channel offsets and
    a few outlier channels (10-20x), RoPE-like rotation smooth along tokens, values with
    per-token magnitude changes and local correlation, and scales that differ per layer."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(tokens, dtype=torch.float32)
    half = head_size // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)          # RoPE frequencies
    angle = t[:, None] * freqs[None, :]                                          # [T, half]
    out = torch.empty(layers, 2, tokens, heads, head_size)
    for layer in range(layers):
        lscale = 0.5 + 2.0 * layer / max(layers - 1, 1)
        # keys: per-channel amplitude (log-normal) with outliers, rotated along tokens, plus noise
        amp = torch.exp(0.5 * torch.randn(heads, half, generator=g))
        outliers = torch.rand(heads, half, generator=g) < 0.03
        amp = torch.where(outliers, amp * (10 + 10 * torch.rand(heads, half, generator=g)), amp)
        phase = 2 * math.pi * torch.rand(heads, half, generator=g)
        content = torch.randn(tokens, heads, half, generator=g) * 0.3               # token content
        base = amp[None] * (1 + content)
        a = angle[:, None, :] + phase[None]
        k = torch.cat([base * torch.cos(a), base * torch.sin(a)], dim=-1)
        k = k + 0.3 * torch.randn(heads, head_size, generator=g)[None]              # channel offsets
        out[layer, 0] = lscale * k
        # values: AR(1) along tokens (local similarity), per-token magnitude, per-channel scale
        noise = torch.randn(tokens, heads, head_size, generator=g)
        v = torch.empty_like(noise)
        v[0] = noise[0]
        rho = 0.8
        for i in range(1, tokens):
            v[i] = rho * v[i - 1] + math.sqrt(1 - rho * rho) * noise[i]
        mag = torch.exp(0.3 * torch.randn(tokens, 1, 1, generator=g))
        chan = torch.exp(0.3 * torch.randn(1, heads, head_size, generator=g))
        out[layer, 1] = 0.5 * lscale * v * mag * chan
    return out.to(dtype)
