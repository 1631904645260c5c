"""A small single-request inference engine over ``Transformer`` that uses the hook API.

It is what tests, the demo, the engine benchmark and CacheBlend run: prefill loads the longest
stored prefix layer by layer while computing the rest, saves new chunks in the background, and
decodes greedily or by sampling. One request at a time keeps it readable; batching is vLLM's job.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from kvstore.connectors.hooks import KVHooks, LayerLoad, LoadFailed
from kvstore.connectors.reference.kvcache import BlockPool, ContiguousCache, PagedCache
from kvstore.connectors.reference.model import Transformer
from kvstore.errors import InvalidInputError
from kvstore.fingerprint import checkpoint_digest, config_digest, tensors_digest
from kvstore.spec import KVSpec, dtype_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise InvalidInputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    tokens: list[int]               # generated token ids
    prompt_tokens: int
    hit_tokens: int                 # prompt tokens served by kvstore
    computed_tokens: int            # prompt tokens prefilled here
    ttft_s: float                   # request start -> first token chosen
    total_s: float
    first_logits: torch.Tensor = field(repr=False)  # next-token logits after the prompt


class Engine:
    """``Engine.load(model_dir)`` or ``Engine(transformer)``; pass ``hooks`` to use kvstore."""

    def __init__(self, model: Transformer, hooks: KVHooks | None = None, *,
                 kv_dtype: torch.dtype = torch.float16, paged: bool = False, block_size: int = 16,
                 num_blocks: int = 4096, model_id: str = "", digest: str = "",
                 save_generated: bool = True) -> None:
        self.model = model
        self.config = model.config
        self.kv_dtype = kv_dtype
        self.paged = paged
        self.model_id = model_id or f"reference/{self.config.family}"
        # A model built in memory has no files to digest: its weights are digested instead, so
        # two random test models never share KV.
        self.digest = digest or tensors_digest(model.named_weights())
        self.save_generated = save_generated
        c = self.config
        self.pool = (BlockPool(c.num_layers, c.num_kv_heads, c.head_dim, num_blocks, block_size,
                               kv_dtype, model.device) if paged else None)
        self.hooks: KVHooks | None = None
        self._ids = itertools.count()
        if hooks is not None:
            self.attach(hooks)

    @classmethod
    def load(cls, model_dir: str | Path, hooks: KVHooks | None = None, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None, **kwargs: object) -> "Engine":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = Transformer.load(model_dir, dtype=dtype, device=device)
        kwargs.setdefault("model_id", Path(model_dir).resolve().name)
        kwargs.setdefault("digest", checkpoint_digest(model_dir))
        return cls(model, hooks, **kwargs)  # type: ignore[arg-type]

    def kv_spec(self) -> KVSpec:
        """The store spec for this engine's KV: the weights, the whole model config (RoPE, norm
        epsilon, sliding window, head layout) and the compute dtype (K/V computed in bf16 differ
        from fp32 ones, and must never be served to each other)."""
        c = self.config
        return KVSpec(model_id=self.model_id, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads,
                      head_size=c.head_dim, dtype=self.kv_dtype,
                      rope=f"theta={c.rope_theta}", weights_digest=self.digest,
                      extra=(("compute_dtype", dtype_name(self.model.dtype)),
                             ("config", config_digest(asdict(c)))))

    def attach(self, hooks: KVHooks) -> None:
        if hooks.spec != self.kv_spec():
            raise InvalidInputError(f"the store's spec {hooks.spec} does not match this engine's {self.kv_spec()}")
        self.hooks = hooks

    # ---- prefill and decode --------------------------------------------------------------

    def new_cache(self, capacity: int) -> ContiguousCache | PagedCache:
        """A KV cache for one sequence (paged when the engine is)."""
        c = self.config
        if self.pool is not None:
            return PagedCache(self.pool, capacity)
        return ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, capacity, self.kv_dtype, self.model.device)

    def _forward(self, cache: ContiguousCache | PagedCache, ids: Sequence[int], start: int,
                 load: LayerLoad | None = None, every: bool = False) -> torch.Tensor:
        """Compute tokens ``ids[start:]`` over the cache holding ``ids[:start]``; returns the last
        hidden state (``every``: all of them). ``load`` (a layer-wise store load) is waited for
        one layer at a time."""
        m = self.model
        dev = m.device
        positions = torch.arange(start, len(ids), device=dev)
        h = m.embed_tokens(torch.as_tensor(ids[start:], device=dev))
        for layer in range(self.config.num_layers):
            q, k, v = m.qkv(layer, h, positions)
            if load is not None and load.hit_tokens:
                cache.fill(layer, load.wait(layer))
            cache.write(layer, start, k, v)
            keys, values = cache.read(layer, len(ids))
            h = m.finish(layer, h, m.attend(q, keys, values, positions))
        return h if every else h[-1:]

    @torch.inference_mode()
    def prefill_kv(self, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full prefill without the store: ``(kv [L, 2, T, H, D], next-token logits)``. What
        CacheBlend precomputes for a document, and real KV for codec measurements."""
        ids = [int(t) for t in tokens]
        if not ids:
            raise InvalidInputError("the prompt is empty")
        c = self.config
        cache = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, len(ids), self.kv_dtype, self.model.device)
        h = self._forward(cache, ids, 0)
        return cache.export(len(ids)), self.model.logits(h)[0]

    @torch.inference_mode()
    def continue_from(self, kv: torch.Tensor, tokens: Sequence[int], greedy_tokens: int = 0
                      ) -> tuple[torch.Tensor, list[int]]:
        """What the model does with a given cache: ``kv`` ``[L, 2, start, H, D]`` stands for
        ``tokens[:start]`` (a cache loaded back through a lossy codec, say). Returns the logits at
        every position of ``tokens[start:]`` (teacher forcing: position i predicts token i+1)
        and the ``greedy_tokens`` tokens greedy decoding would produce after ``tokens[:start+1]``."""
        ids = [int(t) for t in tokens]
        start = kv.shape[2]
        if not 0 < start < len(ids):
            raise InvalidInputError(f"the cache holds {start} tokens of a {len(ids)}-token sequence")
        c = self.config
        cache = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, len(ids) + greedy_tokens, self.kv_dtype,
                                self.model.device)
        cache.kv[:, :, :start] = kv.to(self.kv_dtype)
        logits = self.model.logits(self._forward(cache, ids, start, every=True))
        out: list[int] = []
        if greedy_tokens:  # decode overwrites the teacher-forced positions after start as it goes
            prompt = ids[:start + 1]
            out, _ = self.decode(cache, prompt, logits[0], SamplingParams(max_new_tokens=greedy_tokens,
                                                                          stop_at_eos=False), time.perf_counter())
        return logits, out

    @torch.inference_mode()
    def generate(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
                 request_id: str | None = None, *, session: str | None = None,
                 tool: str | None = None) -> Generation:
        """``session``: this is an agent session's next turn, so its pause ends (kvstore.agents).
        ``tool``: the turn will end in a call of that tool, so the session's context (prompt and
        output) is pinned while it runs. A caller that learns the tool only from the output calls
        ``engine.hooks.tool_started(session, tool, prompt + generation.tokens)`` afterwards."""
        t0 = time.perf_counter()
        ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidInputError("the prompt is empty")
        limit = self.config.max_position_embeddings
        if len(ids) + params.max_new_tokens > limit:
            raise InvalidInputError(f"prompt ({len(ids)}) + max_new_tokens ({params.max_new_tokens}) "
                                    f"exceeds max_position_embeddings {limit}")
        rid = request_id or f"req-{next(self._ids)}"
        if tool is not None and session is None:
            raise InvalidInputError("tool= needs the session it pauses (session=)")
        if session is not None and self.hooks:
            self.hooks.tool_finished(session)
        cache = self.new_cache(len(ids) + params.max_new_tokens)
        try:
            load = self.hooks.load(ids, out=cache.load_target(len(ids))) if self.hooks else LayerLoad()
            hit = load.hit_tokens
            start = min(hit, len(ids) - 1)  # the last prompt token is always computed: it gives logits
            try:
                h = self._forward(cache, ids, start, load)
            except LoadFailed:
                log.warning("request %s: kvstore load failed mid-prefill; recomputing the prompt", rid)
                load.finish()
                hit = start = 0
                h = self._forward(cache, ids, 0)
            if self.hooks:
                self.hooks.save(rid, ids, cache.export(len(ids)))
            logits = self.model.logits(h)[0]
            out, ttft = self.decode(cache, ids, logits, params, t0)
            if self.hooks and self.save_generated and len(out) > 1:
                # KV exists for every token but the last sampled one: the next chat turn's prefix.
                done = ids + out[:-1]
                self.hooks.save(rid, done, cache.export(len(done)))
            if tool is not None and self.hooks:
                self.hooks.tool_started(session, tool, ids + out, request_id=rid)  # type: ignore[arg-type]
        finally:
            if self.hooks:
                self.hooks.release(rid)  # saves read the cache: they finish before it is freed
            if isinstance(cache, PagedCache):
                cache.free()
        return Generation(tokens=out, prompt_tokens=len(ids), hit_tokens=hit, computed_tokens=len(ids) - start,
                          ttft_s=ttft, total_s=time.perf_counter() - t0, first_logits=logits)

    @torch.inference_mode()
    def decode(self, cache: ContiguousCache | PagedCache, prompt: list[int], logits: torch.Tensor,
               params: SamplingParams, t0: float) -> tuple[list[int], float]:
        """Sample up to ``max_new_tokens`` after a prefilled ``prompt`` whose next-token logits
        are ``logits``; returns the tokens and the time from ``t0`` to the first one."""
        gen = torch.Generator(device="cpu").manual_seed(params.seed) if params.seed is not None else None
        out: list[int] = []
        ttft = 0.0
        while len(out) < params.max_new_tokens:
            tok = self._sample(logits, params, gen)
            if not out:
                ttft = time.perf_counter() - t0
            out.append(tok)
            if (params.stop_at_eos and tok == self.config.eos_token_id) or len(out) == params.max_new_tokens:
                break
            seq = prompt + out
            logits = self.model.logits(self._forward(cache, seq, len(seq) - 1))[0]
        return out, ttft or time.perf_counter() - t0

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
        if params.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
        if params.top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))
