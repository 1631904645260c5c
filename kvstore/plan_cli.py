"""``kvstore plan``: memory and disk for a workload, from its request trace (kvstore.planning)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from kvstore.config import parse_size
from kvstore.errors import ConfigError
from kvstore.planning import POLICIES, Plan, human_bytes, plan, recommend
from kvstore.traces import SHIPPED, Request, load

LLAMA3_8B = 32 * 2 * 8 * 128 * 2
"""KV bytes per token of Llama-3-8B in fp16 (32 layers, 8 KV heads of 128): the default model."""

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}


def kv_bytes_per_token(path: str) -> tuple[int, str]:
    """(bytes, description) from an HF config.json (or its model directory) or a KVSpec JSON."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg: dict[str, Any] = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model {path}: cannot read a JSON model config ({exc})") from None
    if "num_layers" in cfg and "head_size" in cfg:  # a KVSpec
        from kvstore.spec import KVSpec, dtype_from_name

        fields = {k: cfg[k] for k in ("model_id", "num_layers", "num_kv_heads", "head_size") if k in cfg}
        spec = KVSpec(**{"model_id": "plan", **fields, "dtype": dtype_from_name(cfg.get("dtype", "float16"))})
        return spec.bytes_per_token, f"{spec.model_id}: {spec.bytes_per_token} B/token"
    try:
        layers = int(cfg["num_hidden_layers"])
        dtype = _DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16").replace("torch.", ""), 2)
        if "kv_lora_rank" in cfg:  # MLA: one latent plus the rope part per token and layer
            per = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim", 0))
        else:
            heads = int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
            per = 2 * kv_heads * head_dim
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"--model {path}: not an HF config.json or a KVSpec ({exc!r} missing or wrong)") from None
    n = layers * per * dtype
    return n, f"{cfg.get('_name_or_path') or cfg.get('model_type') or p.parent.name}: {n} B/token"


def _sizes(text: str, bytes_per_token: int, what: str) -> list[int]:
    """``8GiB,16GiB`` or token counts ``2Mtok``; 0 for none."""
    out = []
    for part in (t.strip() for t in text.split(",")):
        if not part:
            continue
        if part.lower().endswith("tok"):
            out.append(int(token_count(part[:-3], what)) * bytes_per_token)
        else:
            out.append(parse_size(part, what))
    if not out:
        raise ConfigError(f"{what}: no capacities given")
    return sorted(set(out))


def token_count(text: str, what: str) -> float:
    """``500K``, ``2M``, ``1.5G`` or a plain number of tokens."""
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper(), 1)
    try:
        return float(text[:-1] if mult > 1 else text) * mult
    except ValueError:
        raise ConfigError(f"{what}: cannot read token count {text!r}tok (examples: 500Ktok, 2Mtok)") from None


def add_plan_parser(sub: Any, measure: Callable[[], tuple[float, str]]) -> None:
    p = sub.add_parser(
        "plan", help="how much memory and disk a workload needs, from its request trace",
        description="Replay a request trace through kvstore's real tiers at a grid of capacities and print the "
                    "prefix-hit token ratio of kvstore's policy beside FIFO, LRU and Belady's optimum, the prefill "
                    "saved, and the smallest capacity that reaches 95% of the infinite-capacity bound. Traces: "
                    "the Mooncake FAST'25 JSONL form (timestamp, input_length, output_length, hash_ids; shipped: "
                    f"{', '.join(SHIPPED)}) or a kvstore access log (access_log in the store config).")
    p.add_argument("--trace", default="conversation", help="a shipped trace name or a JSONL(.gz) path (default %(default)s)")
    p.add_argument("--block-size", type=int, default=512, help="tokens per hash id in the trace (default 512)")
    p.add_argument("--limit", type=int, help="replay only the first N requests")
    p.add_argument("--model", help="HF config.json (or its directory) or a KVSpec JSON: KV bytes per token "
                                   "(default: what an access log says, else Llama-3-8B, 128 KiB/token)")
    p.add_argument("--cpu", default="16GiB,64GiB,256GiB,1TiB",
                   help="memory capacities, comma-separated: sizes (16GiB) or tokens (2Mtok) (default %(default)s)")
    p.add_argument("--disk", default="0", help="disk capacities, the same way; 0 for none (default %(default)s)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--policies", default=",".join(POLICIES), help="of " + ", ".join(POLICIES) + " (default all)")
    p.add_argument("--prefill-tps", type=float, help="prefill throughput, tokens/s, for the TTFT estimate")
    p.add_argument("--measure", action="store_true",
                   help="measure prefill throughput on the reference engine (SmolLM2 if installed) instead")
    p.add_argument("--png", default="kvstore-plan.png", help="plot to write ('' for none; default %(default)s)")
    p.set_defaults(func=lambda args: _cmd_plan(args, measure))


def _cmd_plan(args: argparse.Namespace, measure: Callable[[], tuple[float, str]]) -> int:
    if args.chunk_size <= 0 or args.block_size <= 0:
        raise ConfigError("--chunk-size and --block-size must be positive")
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    unknown = [x for x in policies if x not in POLICIES]
    if unknown or not policies:
        raise ConfigError(f"--policies: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(POLICIES)}")
    requests = load(args.trace, args.block_size, args.limit)
    if args.model:
        bpt, model = kv_bytes_per_token(args.model)
    elif requests[0].bytes_per_token:
        bpt, model = requests[0].bytes_per_token, f"as logged: {requests[0].bytes_per_token} B/token"
    else:
        bpt, model = LLAMA3_8B, f"Llama-3-8B shape (fp16): {LLAMA3_8B} B/token"
    cpu = _sizes(args.cpu, bpt, "--cpu")
    disk = _sizes(args.disk, bpt, "--disk")
    tps, how = (args.prefill_tps, "given") if args.prefill_tps else (None, "")
    if args.measure:
        tps, how = measure()
    print(f"trace {args.trace}: {len(requests)} requests, {sum(r.input_length for r in requests) / 1e6:.1f}M "
          f"prompt tokens; model {model}; chunk {args.chunk_size} tokens")
    result = plan(requests, cpu, disk, bpt, args.chunk_size, policies, progress_bar)
    print(report(result, tps, how))
    if args.png:
        print(plot(result, args.png, args.trace))
    return 0


def progress_bar(items: Iterable[Request], label: str) -> Iterable[Request]:
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="req", leave=False, mininterval=0.5, file=sys.stderr)


def report(result: Plan, tps: float | None, how: str) -> str:
    policies = sorted({p.policy for p in result.points}, key=POLICIES.index)
    grid = sorted({(p.cpu_bytes, p.disk_bytes) for p in result.points})
    by = {(p.policy, p.cpu_bytes, p.disk_bytes): p for p in result.points}
    head = ["cpu", "disk", *policies, "prefill saved (kvstore)" if "kvstore" in policies else "prefill saved"]
    rows = [head]
    lead = "kvstore" if "kvstore" in policies else policies[0]
    for c, d in grid:
        saved = by[(lead, c, d)].hit_tokens
        rows.append([human_bytes(c), human_bytes(d) if d else "-", *(f"{by[(pol, c, d)].ratio:.3f}" for pol in policies),
                     f"{saved / 1e6:.1f}M tokens" + (f", {saved / tps / result.requests:.2f} s TTFT/request" if tps else "")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"infinite capacity (bound): hit ratio {result.bound:.3f}")
    if tps:
        lines.append(f"TTFT saved at {tps:,.0f} prefill tokens/s ({how}), mean per request")
    lines.append("recommendation: " + recommend(result, policy=lead))
    return "\n".join(lines)


def plot(result: Plan, path: str, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'kvstore[demo]'): no plot"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in sorted({p.policy for p in result.points}, key=POLICIES.index):
        pts = sorted((p.cpu_bytes + p.disk_bytes, p.ratio) for p in result.points if p.policy == policy)
        ax.plot([x / 2**30 for x, _ in pts], [y for _, y in pts], "o-", label=policy)
    ax.axhline(result.bound, color="gray", linestyle="--", label=f"infinite capacity ({result.bound:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("cache capacity, memory + disk (GiB of KV)")
    ax.set_ylabel("prefix-hit token ratio")
    ax.set_title(f"{title}: {result.requests} requests")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
