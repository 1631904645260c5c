"""Train the small reference model on this machine's Python standard library sources.

``python -m kvstore.connectors.reference.train --out DIR`` reproduces the committed model
(``models/pylm-6l``): a byte-level BPE tokenizer, then a 6-layer Llama trained on CPU for a
fixed number of steps from a fixed seed. Real trained weights matter because random weights give
KV with none of the structure (attention sinks, outlier channels, smooth layers) that codecs,
CacheBlend and quality metrics depend on. The stdlib is on every machine and Apache/PSF licensed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import xxhash

from kvstore.connectors.reference.config import ModelConfig
from kvstore.connectors.reference.model import Transformer
from kvstore.connectors.reference.tokenizer import EOS, train_tokenizer
from kvstore.connectors.reference.weights import random_weights, save_model

log = logging.getLogger(__name__)

MODEL = dict(family="llama", vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=6,
             num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0, max_position_embeddings=8192,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, torch_dtype="float16")


def corpus_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """Standard-library sources split by a hash of the relative path: 1 in 20 is validation."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, val = [], []
    for p in files:
        (val if xxhash.xxh64_intdigest(str(p.relative_to(root)).encode()) % 20 == 0 else train).append(p)
    return train, val


def read_texts(files: list[Path]) -> list[str]:
    out = []
    for p in files:
        try:
            out.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def encode(tok: object, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok.encode_batch(texts):  # type: ignore[attr-defined]
        ids.extend(enc.ids)
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.int64)


def batch(data: torch.Tensor, batch_size: int, seq: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq - 1, (batch_size,), generator=g)
    return torch.stack([data[s:s + seq + 1] for s in starts.tolist()])


def loss_of(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    inp, tgt = x[:, :-1], x[:, 1:]
    positions = torch.arange(inp.shape[1])
    h = model.embed_tokens(inp)
    for layer in range(model.config.num_layers):
        q, k, v = model.qkv(layer, h, positions)
        h = model.finish(layer, h, model.attend(q, k, v, positions))
    return F.cross_entropy(model.logits(h).flatten(0, 1), tgt.flatten())


@torch.no_grad()
def evaluate(model: Transformer, data: torch.Tensor, seq: int, batches: int = 8) -> float:
    g = torch.Generator().manual_seed(1234)
    return sum(loss_of(model, batch(data, 8, seq, g)).item() for _ in range(batches)) / batches


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--layers", type=int, default=MODEL["num_layers"],
                    help="decoder layers (CacheBlend's premise is measured on deeper models than the packaged one)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (slower)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    train_files, val_files = corpus_files()
    train_texts, val_texts = read_texts(train_files), read_texts(val_files)
    tok = train_tokenizer(train_texts, out, vocab_size=MODEL["vocab_size"])  # type: ignore[arg-type]
    train_ids, val_ids = encode(tok, train_texts), encode(tok, val_texts)
    log.info("corpus: %d train files (%d tokens), %d val files (%d tokens)",
             len(train_texts), train_ids.numel(), len(val_texts), val_ids.numel())
    cfg = ModelConfig(**{**MODEL, "num_layers": args.layers})  # type: ignore[arg-type]
    weights = {k: v.requires_grad_() for k, v in random_weights(cfg, args.seed, std=0.004).items()}
    model = Transformer(cfg, weights)
    opt = torch.optim.AdamW(list(weights.values()), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        # bf16 autocast halves step time on CPUs with avx512_bf16/AMX; master weights stay fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = loss_of(model, batch(train_ids, args.batch, args.seq, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(weights.values()), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.3f lr %.2e %.0fs", step, args.steps, loss.item(), lr, time.time() - t0)
    val = evaluate(model, val_ids, args.seq)
    save_model(out, cfg, weights, dtype=torch.float16, tokenizer_dir=out)
    report = {"layers": args.layers, "bf16_autocast": args.bf16, "val_loss": round(val, 4), "val_ppl": round(math.exp(val), 2), "steps": args.steps,
              "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
              "train_tokens": int(train_ids.numel()), "train_seconds": round(time.time() - t0, 1),
              "params": sum(v.numel() for v in weights.values())}
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("validation loss %.3f (ppl %.1f); wrote %s", val, math.exp(val), out)


if __name__ == "__main__":
    main()
