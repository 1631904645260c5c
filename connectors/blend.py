"""CacheBlend: reuse the cached KV of documents wherever they appear in a prompt.

In RAG the same documents come back in many prompts, rarely as the prefix, so prefix caching
misses them. A document's KV computed on its own (positions 0..n-1) is stored under its own
tokens, which is exactly the KV of a prompt that starts with it, so document cache and prefix
cache share objects. To use it mid-prompt: fetch it, re-rotate its keys to the new positions
(RoPE composes additively), and concatenate. What that misses is cross-attention between
documents; CacheBlend (EuroSys '25) recovers it by running layer 0 fully, picking at check
layers the tokens to recompute, and recomputing only those (plus the query) in later layers,
patching their K/V into the blended cache. Attention always reads the whole patched cache, so a
recompute ratio of 1 is exactly full prefill.

Which tokens: the paper picks those whose fresh K/V deviate most from the cached ones. On our
trained model the top 15% by true deviation hold 60% of it, yet recomputing exactly those (an
oracle) removed only 21% of the next-token KL: large deviations sit on tokens the query barely
reads (each document's first tokens, its old attention sinks). The default here ranks tokens by
how much their fresh K/V change what the computed (query) tokens read at that layer,
``||a'_t v'_t - a_t v_t||``: the paper's fresh K/V, weighted by the query's attention before and
after. At 15% and the same compute, KL vs full reuse is 0.10x instead of the paper rule's 0.51x
(bench/blend.py, pylm-6l).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kvstore.connectors.hooks import KVHooks, LayerLoad, LoadFailed
from kvstore.connectors.reference.engine import Engine, Generation, SamplingParams
from kvstore.connectors.reference.kvcache import ContiguousCache
from kvstore.errors import InvalidInputError
from kvstore.store import KVStore


SELECTIONS = ("attention", "deviation")
DEFAULT_CHECK_LAYERS = (1, 2, 3)
_QUERY_WINDOW = 32  # the last computed tokens whose attention ranks tokens: the query's end


@dataclass(frozen=True)
class BlendConfig:
    # Share of the reused (document) tokens recomputed after the check layer(s); query and
    # separator tokens are always computed. 0 = full reuse, 1 = full prefill.
    recompute_ratio: float = 0.15
    # Where tokens are selected. Layers before the first are computed fully (layer 0 at least:
    # its input does not depend on context, so its cached KV is exact only for the first document
    # and the deviation at layer 1 is the first informative signal). Several layers narrow the
    # selection gradually: ratios len(check_layers) * r, ..., 2r, r, each re-ranked with that
    # layer's attention. None: (1, 2, 3), cut to the layers the model has.
    check_layers: tuple[int, ...] | None = None
    # Tokens placed before each document and before the query (always recomputed).
    separator: tuple[int, ...] = ()
    # How tokens are ranked at a check layer: "attention" (how much the token's fresh K/V change
    # what the query reads) or "deviation" (the paper's: how much its K/V change at all).
    selection: str = "attention"

    def __post_init__(self) -> None:
        if not isinstance(self.recompute_ratio, (int, float)) or not 0.0 <= self.recompute_ratio <= 1.0:
            raise InvalidInputError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio!r}")
        if self.check_layers is not None:
            layers = tuple(self.check_layers)
            if (not layers or any(not isinstance(i, int) or i < 1 for i in layers)
                    or list(layers) != sorted(set(layers))):
                raise InvalidInputError(f"check_layers must be increasing layer indexes >= 1 (layer 0 always "
                                        f"runs fully), got {self.check_layers!r}")
            object.__setattr__(self, "check_layers", layers)
        if any(not isinstance(t, int) or t < 0 for t in self.separator):
            raise InvalidInputError(f"separator must be token ids, got {self.separator!r}")
        if self.selection not in SELECTIONS:
            raise InvalidInputError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        object.__setattr__(self, "separator", tuple(self.separator))

    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        """The check layers for a model of ``num_layers`` layers."""
        if self.check_layers is None:
            return tuple(i for i in DEFAULT_CHECK_LAYERS if i < num_layers)
        if self.check_layers[-1] >= num_layers:
            raise InvalidInputError(f"check layer {self.check_layers[-1]} does not exist: the model has "
                                    f"{num_layers} layers")
        return self.check_layers

    def ratios(self, count: int | None = None) -> list[float]:
        """Recompute ratio at each of ``count`` check layers (default: the configured ones)."""
        m = count if count is not None else len(self.check_layers or DEFAULT_CHECK_LAYERS)
        return [min(1.0, self.recompute_ratio * (m - j)) for j in range(m)]


@dataclass
class BlendResult:
    tokens: list[int]          # the assembled prompt
    cache: ContiguousCache     # the blended, patched cache (room for max_new_tokens more), ready to decode
    logits: torch.Tensor       # next-token logits after the prompt
    reused_tokens: int         # tokens whose KV came from the store
    recomputed_tokens: int     # reused tokens recomputed after the (last) check layer
    computed_docs: int         # documents that were missing: prefilled and stored first
    compute_fraction: float    # token-layer computations done / those of full prefill
    seconds: float = 0.0
    selected: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64), repr=False)

    @property
    def kv(self) -> torch.Tensor:
        """``[L, 2, T, H, D]``, a view of the cache."""
        return self.cache.export(len(self.tokens))


class Blender:
    """CacheBlend over the reference engine and a store for that engine's model."""

    def __init__(self, engine: Engine, store: KVStore, config: BlendConfig = BlendConfig()) -> None:
        if store.spec != engine.kv_spec():
            raise InvalidInputError("the store's spec does not match the engine's model")
        self.check_layers = config.layers_for(engine.config.num_layers)
        self.engine = engine
        self.model = engine.model
        self.store = store
        self.hooks = KVHooks(store)
        self.config = config

    # ---- documents -----------------------------------------------------------------------

    def precompute(self, docs: Sequence[Sequence[int]]) -> int:
        """Prefill and store every document the store does not fully hold; returns how many."""
        computed = 0
        for doc in docs:
            ids = [int(t) for t in doc]
            if not ids:
                raise InvalidInputError("a document is empty")
            if self.store.lookup(ids) < len(ids):
                kv, _ = self.engine.prefill_kv(ids)
                self.store.put(ids, kv)
                computed += 1
        return computed

    def assemble(self, docs: Sequence[Sequence[int]], query: Sequence[int], prefix: Sequence[int] = ()
                 ) -> tuple[list[int], list[tuple[int, list[int]]]]:
        """The prompt, and (offset, tokens) of each reusable segment (prefix and documents)."""
        sep = list(self.config.separator)
        tokens: list[int] = []
        segments: list[tuple[int, list[int]]] = []
        if prefix:
            segments.append((0, [int(t) for t in prefix]))
            tokens += segments[-1][1]
        for doc in docs:
            tokens += sep
            segments.append((len(tokens), [int(t) for t in doc]))
            tokens += segments[-1][1]
        tokens += sep + [int(t) for t in query]
        if not query:
            raise InvalidInputError("the query is empty: the prompt must end with tokens to compute")
        return tokens, segments

    # ---- the blend -----------------------------------------------------------------------

    @torch.inference_mode()
    def blend(self, docs: Sequence[Sequence[int]], query: Sequence[int], prefix: Sequence[int] = (),
              max_new_tokens: int = 0) -> BlendResult:
        t0 = time.perf_counter()
        computed_docs = self.precompute(([prefix] if prefix else []) + list(docs))
        tokens, segments = self.assemble(docs, query, prefix)
        m, c = self.model, self.engine.config
        T = len(tokens)
        if T + max_new_tokens > c.max_position_embeddings:
            raise InvalidInputError(f"prompt of {T} tokens + {max_new_tokens} new exceeds max_position_embeddings "
                                    f"{c.max_position_embeddings}")
        dev = m.device
        cache = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, T + max_new_tokens, self.engine.kv_dtype, dev)
        kv = cache.kv
        reused = torch.zeros(T, dtype=torch.bool, device=dev)
        loads: list[tuple[int, LayerLoad]] = []
        for offset, seg in segments:
            load = self.hooks.load(seg, out=kv[:, :, offset:offset + len(seg)])
            if load.hit_tokens:
                loads.append((offset, load))
                reused[offset:offset + load.hit_tokens] = True
        positions = torch.arange(T, device=dev)
        full_reuse = self.config.recompute_ratio == 0.0
        active = (~reused).nonzero().squeeze(1) if full_reuse else positions
        h = m.embed_tokens(torch.as_tensor(tokens, device=dev)[active])
        n_reused = int(reused.sum())
        work = 0
        checks = dict(zip(self.check_layers, self.config.ratios(len(self.check_layers))))
        for layer in range(c.num_layers):
            for offset, load in loads:
                try:
                    part = load.wait(layer)
                except LoadFailed:
                    # Earlier layers already used this segment: only a restart without reuse
                    # recomputes it correctly (a rare path: the store failed mid-load).
                    for _o, other in loads:
                        other.finish()
                    return self._fallback(tokens, cache, computed_docs, t0)
                if offset:
                    part[0] = m.rope.rerotate(part[0], offset)
            q, k, v = m.qkv(layer, h, positions[active])
            if layer in checks and not full_reuse:
                keep = self._select(kv[layer], q, k, v, active, reused, checks[layer], T)
                q, k, v, h, active = q[keep], k[keep], v[keep], h[keep], active[keep]
            work += active.numel()
            kv[layer, 0].index_copy_(0, active, k.to(kv.dtype))
            kv[layer, 1].index_copy_(0, active, v.to(kv.dtype))
            attn = m.attend(q, kv[layer, 0, :T], kv[layer, 1, :T], positions[active])
            h = m.finish(layer, h, attn)
        for _o, load in loads:
            load.finish()
        # the last query token is never reused, so it is always active and last
        logits = m.logits(h[-1:])[0]
        selected = active[reused[active]]
        return BlendResult(tokens=tokens, cache=cache, logits=logits, reused_tokens=n_reused,
                           recomputed_tokens=int(selected.numel()), computed_docs=computed_docs,
                           compute_fraction=work / (T * c.num_layers), seconds=time.perf_counter() - t0,
                           selected=selected)

    def _select(self, kv_layer: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                active: torch.Tensor, reused: torch.Tensor, ratio: float, T: int) -> torch.Tensor:
        """Indexes into ``active`` to keep: every non-reused token, and the ``ratio`` share of
        reused tokens ranked highest by the configured selection."""
        was_reused = reused[active]
        idx = was_reused.nonzero().squeeze(1)
        # Tokens computed fresh (query, separators) are always kept.
        dev = torch.full((active.numel(),), float("inf"), device=k.device)
        if self.config.selection == "attention" and not bool(was_reused.all()):
            dev[idx] = self._read_change(kv_layer, q, k, v, active, was_reused, T)[idx]
        else:
            dev[idx] = self._deviation(kv_layer, k[idx], v[idx], active[idx])
        n_keep = int(round(ratio * int(reused.sum()))) + int((~was_reused).sum())
        keep = torch.topk(dev, min(n_keep, dev.numel())).indices
        return keep.sort().values

    def _deviation(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        """How far each reused token's fresh K/V (at ``positions``) are from the cached ones:
        squared deviation, K and V each normalised by its own scale so neither dominates."""
        old_k = kv_layer[0].index_select(0, positions).float()
        old_v = kv_layer[1].index_select(0, positions).float()
        dk = (k.float() - old_k).pow(2).sum((1, 2)) / old_k.pow(2).sum((1, 2)).mean().clamp_min(1e-12)
        dv = (v.float() - old_v).pow(2).sum((1, 2)) / old_v.pow(2).sum((1, 2)).mean().clamp_min(1e-12)
        return dk + dv

    def _read_change(self, kv_layer: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     active: torch.Tensor, was_reused: torch.Tensor, T: int) -> torch.Tensor:
        """Per active token t: mean over the last computed tokens f and heads of
        ``||a'_ft v'_t - a_ft v_t||``, with ``a`` the attention over the cached keys and ``a'``
        over the fresh ones (tokens not active here keep their cached K/V in both): a first-order
        measure of how much recomputing t changes what the query reads at this layer."""
        c = self.engine.config
        group = c.num_heads // c.num_kv_heads
        fresh = (~was_reused).nonzero().squeeze(1)[-_QUERY_WINDOW:]
        qf = q[fresh].float() * self.model.scale                          # [F, H, D]
        future = torch.arange(T, device=k.device)[None, :] > active[fresh][:, None]   # [F, T] causal mask
        old_k = kv_layer[0, :T].to(torch.float32, copy=True)  # never a view: the cache must not change here
        old_k[active[~was_reused]] = k[~was_reused].float()               # computed tokens have no cached K
        new_k = old_k.clone()
        new_k[active] = k.float()
        old_v = kv_layer[1].index_select(0, active).float()               # [A, Hkv, D]
        new_v = v.float()
        n_new, n_old = new_v.pow(2).sum(-1), old_v.pow(2).sum(-1)         # [A, Hkv]
        dot = (new_v * old_v).sum(-1)
        score = torch.zeros(active.numel(), device=k.device)
        for h in range(c.num_kv_heads):  # one KV head at a time: [F, group, T] stays small for long prompts
            qh = qf[:, h * group:(h + 1) * group]
            p_old = torch.einsum("fgd,td->fgt", qh, old_k[:, h]).masked_fill(future[:, None], float("-inf"))
            p_new = torch.einsum("fgd,td->fgt", qh, new_k[:, h]).masked_fill(future[:, None], float("-inf"))
            a_old, a_new = p_old.softmax(-1)[..., active], p_new.softmax(-1)[..., active]
            sq = a_new.square() * n_new[:, h] - 2 * a_new * a_old * dot[:, h] + a_old.square() * n_old[:, h]
            score += sq.clamp_min(0).sqrt().sum((0, 1))
        return score

    def _fallback(self, tokens: list[int], cache: ContiguousCache, computed_docs: int, t0: float) -> BlendResult:
        kv, logits = self.engine.prefill_kv(tokens)
        cache.kv[:, :, :len(tokens)] = kv
        return BlendResult(tokens=tokens, cache=cache, logits=logits, reused_tokens=0, recomputed_tokens=0,
                           computed_docs=computed_docs, compute_fraction=1.0, seconds=time.perf_counter() - t0)

    # ---- generation ----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, docs: Sequence[Sequence[int]], query: Sequence[int],
                 params: SamplingParams = SamplingParams(), prefix: Sequence[int] = ()) -> Generation:
        """Blend, then decode from the blended cache with the engine's sampler."""
        t0 = time.perf_counter()
        res = self.blend(docs, query, prefix, max_new_tokens=params.max_new_tokens)
        T = len(res.tokens)
        out, ttft = self.engine.decode(res.cache, res.tokens, res.logits, params, t0)
        return Generation(tokens=out, prompt_tokens=T, hit_tokens=res.reused_tokens,
                          computed_tokens=T - res.reused_tokens + res.recomputed_tokens, ttft_s=ttft,
                          total_s=time.perf_counter() - t0, first_logits=res.logits)

    def close(self) -> None:
        self.hooks.close()
