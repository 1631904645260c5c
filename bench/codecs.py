"""Codec table: size ratio vs fp16, encode/decode MB/s on one thread, relative and attention
error, and the time to fetch one Llama-3-8B 256-token chunk over simulated links, each beside
``raw`` measured in the same run.

Link model: the object's frames arrive back to back at the link rate; a frame is decoded as
soon as it has fully arrived and the previous frame is decoded (codecs without frames decode
after the last byte). Decode times are the measured ones.

    python bench/codecs.py [--layers 32] [--seed 0] [--ablation] [--model DIR]

``--model`` measures real KV instead: a 256-token chunk of Python source prefilled by the
reference engine with that model (the packaged trained one: ``--model default``), and adds what
each codec does to that model's output: next-token KL and greedy agreement, through a real store.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import table  # noqa: E402

from kvstore.codecs import get_codec  # noqa: E402
from kvstore.codecs.cachegen import CacheGenCodec, CacheGenOptions  # noqa: E402
from kvstore.codecs.quality import attention_error, next_token_kl, relative_error, synthetic_kv  # noqa: E402

CODECS = ["raw", "lz4", "int8", "fp8", "cachegen:high", "balanced", "compact", "aggressive"]
LINKS_GBPS = [0.1, 1, 10, 100]


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def frame_times(name: str, blob: bytes, kv: torch.Tensor, repeat: int) -> list[tuple[int, float]]:
    """(bytes, decode seconds) per frame; one frame for codecs without frames."""
    codec = get_codec(name)
    if isinstance(codec, CacheGenCodec):
        lay, frames = codec.frames(memoryview(blob))
        out = []
        header = len(blob) - sum(f.nbytes for f in frames)
        for i, frame in enumerate(frames):
            secs = best(lambda f=frame: codec.decode_frame(lay, f), repeat)
            out.append((frame.nbytes + (header if i == 0 else 0), secs))
        return out
    dst = torch.empty_like(kv)
    secs = best(lambda: dst.copy_(codec.decode(memoryview(blob), tuple(kv.shape), kv.dtype)), repeat)
    return [(len(blob), secs)]


def fetch_seconds(frames: list[tuple[int, float]], gbps: float) -> float:
    arrived = decoded = 0.0
    for nbytes, secs in frames:
        arrived += nbytes * 8 / (gbps * 1e9)
        decoded = max(arrived, decoded) + secs
    return decoded


def ablation(kv: torch.Tensor) -> None:
    """Two design questions, answered on this KV: does delta coding along tokens help, and is
    per-channel or per-token scaling better (at equal quantization bits, entropy-coded size)?"""
    rows = [["variant", "ratio vs fp16", "rel err", "attn err"]]
    for delta in (False, True):
        codec = CacheGenCodec(CacheGenOptions(delta=delta))
        blob = codec.encode(kv)
        out = codec.decode(memoryview(blob), tuple(kv.shape), kv.dtype)
        rows.append([f"cachegen medium, delta {'on' if delta else 'off'}", f"{kv.numel() * 2 / len(blob):.2f}x",
                     f"{100 * relative_error(kv, out):.2f}%", f"{100 * attention_error(kv, out):.2f}%"])
    x = kv.float()
    L, P, T, H, D = x.shape
    xs = x.reshape(L, P, T, H * D)
    for bits in (6, 4):
        for axis, dim in (("per-channel", 2), ("per-token", 3)):
            mu = xs.mean(dim, keepdim=True)
            step = (xs - mu).abs().amax(dim, keepdim=True).clamp_min(1e-8) / (2 ** (bits - 1) - 1)
            q = torch.round((xs - mu) / step)
            dec = (q * step + mu).reshape(x.shape)
            s = (q - q.amin()).long().reshape(L * P, -1)
            counts = torch.zeros(L * P, int(s.max()) + 1).scatter_add_(1, s, torch.ones_like(s, dtype=torch.float))
            p = counts / counts.sum(1, keepdim=True)
            ent = float(-(counts * torch.log2(p.clamp_min(1e-12))).sum() / s.numel())
            params = 2 * 16 * (H * D if dim == 2 else T) / (T * H * D)
            rows.append([f"{bits}-bit {axis} scaling (entropy-coded estimate)", f"{16 / (ent + params):.2f}x",
                         f"{100 * relative_error(kv, dec):.2f}%", f"{100 * attention_error(kv, dec):.2f}%"])
    print(table(rows))


def model_kv(model_dir: str, tokens: int = 256, seed: int = 0) -> torch.Tensor:
    """KV of ``tokens`` tokens of stdlib source, starting 512 tokens into the file so the chunk
    is a mid-prompt one (the common case), computed by the reference engine."""
    import random
    import sysconfig
    from pathlib import Path

    from kvstore.connectors.reference import DEFAULT_MODEL, Engine
    from kvstore.connectors.reference.tokenizer import load_tokenizer

    path = DEFAULT_MODEL if model_dir == "default" else Path(model_dir)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    ids: list[int] = []
    rng = random.Random(seed)
    while len(ids) < 512 + tokens:
        ids = load_tokenizer(path).encode(rng.choice(files).read_text(encoding="utf-8")).ids
    kv, _ = Engine.load(path).prefill_kv(ids[:512 + tokens])
    return kv[:, :, 512:].contiguous()


def model_quality(model_dir: str, names: list[str], prompts: int, seed: int = 0) -> None:
    """What a codec does to the model: prompts of 3 stored chunks (768 tokens) + 1 computed
    token, generated once with the KV computed here and once with the chunks loaded back through
    a disk tier using the codec: next-token KL and greedy agreement over 32 generated tokens."""
    import random
    import statistics
    import sysconfig
    import tempfile
    from pathlib import Path

    from kvstore.connectors.hooks import KVHooks
    from kvstore.connectors.reference import DEFAULT_MODEL, Engine, SamplingParams
    from kvstore.connectors.reference.tokenizer import load_tokenizer
    from kvstore.store import KVStore

    path = DEFAULT_MODEL if model_dir == "default" else Path(model_dir)
    engine = Engine.load(path)
    tok = load_tokenizer(path)
    rng = random.Random(seed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    params = SamplingParams(max_new_tokens=32, stop_at_eos=False)
    cases = []
    while len(cases) < prompts:
        ids = tok.encode(rng.choice(files).read_text(encoding="utf-8")).ids
        if len(ids) >= 769:
            start = rng.randrange(0, len(ids) - 769 + 1)
            cases.append(ids[start:start + 769])
    refs = [engine.generate(ids, params) for ids in cases]
    rows = [["codec", "next-token KL", "KL max", "greedy agreement (32 tokens)", "hit tokens"]]
    for name in names:
        kls, agree, hits = [], [], []
        with tempfile.TemporaryDirectory() as tmp, KVStore(engine.kv_spec(), {
                "chunk_size": 256, "tiers": {"disk": {"path": tmp, "capacity": "1GiB", "codec": name}}}) as store:
            for ids in cases:
                kv, _ = engine.prefill_kv(ids[:768])
                store.put(ids[:768], kv)
            engine.attach(KVHooks(store))
            try:
                for ids, ref in zip(cases, refs):
                    got = engine.generate(ids, params)
                    kls.append(next_token_kl(ref.first_logits, got.first_logits))
                    agree.append(sum(a == b for a, b in zip(ref.tokens, got.tokens)) / len(ref.tokens))
                    hits.append(got.hit_tokens)
            finally:
                engine.hooks.close()
                engine.hooks = None
        rows.append([name, f"{statistics.mean(kls):.2e}", f"{max(kls):.2e}", f"{100 * statistics.mean(agree):.1f}%",
                     f"{min(hits)}-{max(hits)}"])
    print(f"\nmodel quality on {path.name}: {prompts} prompts of 768 stored + 1 computed tokens, "
          f"reference = the same model without kvstore")
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ablation", action="store_true", help="also answer the delta and scaling-axis questions")
    ap.add_argument("--model", help="measure real KV from this model directory ('default': the packaged model), "
                    "and each codec's next-token KL and greedy agreement on that model")
    ap.add_argument("--prompts", type=int, default=8, help="prompts for the model-quality table (--model)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.model:
        kv = model_kv(args.model, seed=args.seed)
        what = f"real KV of {args.model}"
    else:
        kv = synthetic_kv(layers=args.layers, heads=8, head_size=128, tokens=256, seed=args.seed)
        what = "synthetic Llama-3-8B-shaped"
    mb = kv.numel() * kv.element_size() / 1e6
    print(f"{what} chunk: {tuple(kv.shape)} fp16 = {mb:.2f} MB; 1 thread; best of {args.repeat}")
    rows = [["codec", "ratio", "enc MB/s", "dec MB/s", "rel err", "attn err",
             *[f"{g:g} Gb/s ms (x raw)" for g in LINKS_GBPS]]]
    raw_fetch: list[float] = []
    for name in CODECS:
        codec = get_codec(name)
        codec.encode(kv)  # warm-up: the first call loads (or compiles) the CPU coder
        enc = best(lambda: codec.encode(kv), 1 if "cachegen" in name else args.repeat)
        blob = bytes(memoryview(codec.encode(kv)).cast("B"))
        dec_t = best(lambda: codec.decode(memoryview(blob), tuple(kv.shape), kv.dtype), args.repeat)
        out = codec.decode(memoryview(blob), tuple(kv.shape), kv.dtype)
        frames = frame_times(name, blob, kv, args.repeat)
        fetch = [fetch_seconds(frames, g) for g in LINKS_GBPS]
        if name == "raw":
            raw_fetch = fetch
        rows.append([name, f"{mb * 1e6 / len(blob):.2f}x", f"{mb / enc:.0f}", f"{mb / dec_t:.0f}",
                     f"{100 * relative_error(kv, out):.2f}%", f"{100 * attention_error(kv, out):.2f}%",
                     *[f"{1e3 * f:.1f} ({r / f:.2f}x)" for f, r in zip(fetch, raw_fetch)]])
    print(table(rows))
    print("goals: cachegen decode >= 400 MB/s and encode >= 200 MB/s per core; fetch >= 1.5x raw at 1 Gb/s and "
          ">= 4x at 0.1 Gb/s. Quality is judged by the model, not by these errors: bench/codec_quality.py")
    if args.model:
        model_quality(args.model, CODECS, args.prompts, args.seed)
    if args.ablation:
        print()
        ablation(kv if args.model else synthetic_kv(layers=min(args.layers, 8), seed=args.seed))


if __name__ == "__main__":
    main()
