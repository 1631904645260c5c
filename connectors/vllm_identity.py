"""What makes KV computed by a vLLM engine reusable: the model fingerprint of its config and
checkpoint (for ``KVSpec``), and which requests' KV their token ids do not determine.

Computed from the config alone, so vLLM's scheduler and worker processes agree on it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvstore.errors import ConfigError
from kvstore.fingerprint import checkpoint_digest, config_digest, file_digest
from kvstore.spec import KVSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


def uncacheable(request: "Request") -> str | None:
    """Why a request's KV is not determined by its token ids and the model, if it is not."""
    if getattr(request, "lora_request", None) is not None:
        return "a LoRA adapter"
    if getattr(request, "mm_features", None):
        return "multimodal inputs"
    if getattr(request, "prompt_embeds", None) is not None:
        return "prompt embeddings"
    if getattr(request, "cache_salt", None):
        return "a cache_salt"
    return None


def spec_for(vllm_config: "VllmConfig") -> KVSpec:
    """The same spec on the scheduler and worker sides, computed from the config alone.

    Besides shapes, dtype, parallelism and block layout it covers what changes K or V for the
    same tokens: every weight file's full content and the effective HF config after
    ``hf_overrides`` (RoPE, sliding window, norm epsilon, head layout), plus vLLM's own knobs
    that change the computed KV (quantization, model implementation, KV cache dtype)."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    dtype = mc.dtype if cc.cache_dtype in (None, "auto") else _cache_dtype(cc.cache_dtype)
    head_size = mc.get_head_size()
    path = Path(mc.model)
    lc = getattr(vllm_config, "load_config", None)
    knobs = {"hf_config": mc.hf_config.to_dict(), "quantization": mc.quantization,
             "load_format": getattr(lc, "load_format", None),  # "dummy" weights are not the checkpoint's
             "model_loader_extra_config": getattr(lc, "model_loader_extra_config", None),
             "pipeline_stage": (_pp_rank() if pc.pipeline_parallel_size > 1 else 0, pc.pipeline_parallel_size),
             "quantization_config": mc.quantization_config, "model_impl": mc.model_impl,
             "disable_sliding_window": mc.disable_sliding_window, "compute_dtype": str(mc.dtype),
             "model_class_overrides": mc.model_class_overrides, "cache_dtype": cc.cache_dtype,
             "kv_cache_dtype_skip_layers": cc.kv_cache_dtype_skip_layers,
             "calculate_kv_scales": getattr(cc, "calculate_kv_scales", None)}
    if _rope_depends_on_length(knobs["hf_config"]):
        knobs["max_model_len"] = mc.max_model_len  # longrope and dynamic scaling pick factors by it
    layout = _layout_tag(dtype, cc.block_size, head_size, cc.cache_dtype)
    return KVSpec(model_id=path.name if path.is_dir() else str(mc.model), num_layers=mc.get_num_layers(pc),
                  num_kv_heads=mc.get_num_kv_heads(pc), head_size=head_size, dtype=dtype,
                  weights_digest=_weights_identity(mc), tp_size=pc.tensor_parallel_size,
                  tp_rank=_tp_rank() if pc.tensor_parallel_size > 1 else 0,
                  extra=(("layout", layout), ("engine", "vllm"), ("config", config_digest(knobs))))


def _weights_identity(mc: Any) -> str:
    """The checkpoint's full-content digest; for a hub id, that of its local snapshot (which
    vLLM has downloaded before any connector exists). Only a snapshot that cannot be found
    falls back to the id and revision, with a warning: a moving revision would then share KV."""
    weights = Path(getattr(mc, "model_weights", "") or mc.model)
    if weights.is_dir():
        return checkpoint_digest(weights)
    if weights.is_file():  # a single-file checkpoint (GGUF)
        return "file=" + file_digest(weights)
    try:
        from huggingface_hub import snapshot_download

        return checkpoint_digest(snapshot_download(str(mc.model), revision=mc.revision, local_files_only=True))
    except Exception as exc:  # no snapshot on this machine, or no huggingface_hub
        log.warning("kvstore: cannot find %s's weights on disk (%s); keying its KV by name and revision %s "
                    "only: set a 'salt' in the kvstore config when the weights change", mc.model, exc,
                    mc.revision)
        return f"revision={mc.revision}"


def _cache_dtype(name: str) -> torch.dtype:
    if name.startswith("fp8"):
        return torch.float8_e5m2 if "e5m2" in name else torch.float8_e4m3fn
    raise ConfigError(f"unsupported vLLM kv cache dtype {name!r}")


def _layout_tag(dtype: torch.dtype, block_size: int, head_size: int, cache_dtype: str) -> str:
    """Which byte layout a block has: the attention backend and, on CPU, the kernel ISA."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return f"cpu_attn:{_get_attn_isa(dtype, block_size, head_size, cache_dtype)}:bs{block_size}"
    return f"{current_platform.device_name}:bs{block_size}"


_LENGTH_FREE_ROPE = (None, "default", "linear", "llama3", "yarn", "mrope")


def _rope_depends_on_length(hf: dict[str, Any]) -> bool:
    """Whether RoPE's factors depend on the configured context length (vLLM's longrope uses its
    long factors only past ``original_max_position_embeddings``, dynamic NTK scales by it)."""
    found = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k in ("rope_type", "type") and isinstance(v, str):
                    found.append(v)
                walk(v)

    walk({k: v for k, v in hf.items() if k in ("rope_scaling", "rope_parameters", "text_config")})
    return any(kind not in _LENGTH_FREE_ROPE for kind in found)


def _pp_rank() -> int:
    try:
        from vllm.distributed import get_pp_group

        return get_pp_group().rank_in_group
    except Exception:  # the scheduler process has no PP group: stage 0 answers lookups
        return 0


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # the scheduler process has no TP group: rank 0 answers lookups
        return 0


__all__ = ["spec_for", "uncacheable"]
