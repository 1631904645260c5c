"""CacheBlend quality and speed, each beside full prefill of the same prompt in the same run.

quality: a trained model (the packaged one unless --model); prompts of 2-8 stdlib-source documents plus a question.
  For full reuse (ratio 0) and CacheBlend at 5%, 15% and 30%: next-token KL divergence from
  full prefill and greedy agreement over the first 32 generated tokens. Also 15% with the paper's
  selection rule (largest K/V deviation) in place of ours (largest change in what the query reads),
  and how concentrated the true KV deviation is.
  With ``--model smollm2``: RAG on the real model over the shipped documents and their question
  set (kvstore.connectors.reference.texts): each question's prompt holds its document and
  --rag-docs - 1 others in a seeded order; the same measures plus answer accuracy (the answer span
  in the reply), against full prefill of the same prompt.
speed: a 16-layer model with random weights (speed does not depend on them), or with
  ``--model smollm2`` the real SmolLM2-135M-Instruct on English text; 4 documents of 1K tokens
  plus a 64-token question, documents in the cpu tier; blend time against full prefill, beside
  the ideal compute fraction.

    python bench/blend.py [quality|speed|all] [--prompts 5] [--repeat 3] [--model DIR|smollm2]
    python bench/blend.py quality --model smollm2 [--questions 48] [--rag-docs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import median, table, timed  # noqa: E402

from kvstore.codecs.quality import next_token_kl  # noqa: E402
from kvstore.connectors.blend import BlendConfig, Blender  # noqa: E402
from kvstore.connectors.reference import DEFAULT_MODEL, Engine, SamplingParams, Transformer  # noqa: E402
from kvstore.connectors.reference.tokenizer import load_tokenizer  # noqa: E402
from kvstore.connectors.reference.weights import random_weights, tiny_config  # noqa: E402
from kvstore.store import KVStore  # noqa: E402

RATIOS = [0.0, 0.05, 0.15, 0.30, 1.0]  # 1.0 must equal full prefill: the machinery check
CONTINUATION = 32
PAPER = "paper"  # CacheBlend 15% ranking tokens by K/V deviation, the paper's rule


def true_deviation(engine: Engine, reused_kv: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Per position: squared KV error of full reuse against full prefill, normalised per layer and plane."""
    full, _ = engine.prefill_kv(tokens)
    err = (reused_kv.float() - full.float()).pow(2).sum((3, 4))           # [L, 2, T]
    return (err / full.float().pow(2).sum((3, 4)).mean(-1, keepdim=True)).sum((0, 1))


def top_share(deviation: torch.Tensor, segments: list[tuple[int, list[int]]], ratio: float) -> float:
    """Share of the documents' total deviation in their ``ratio`` most deviating tokens."""
    dev = torch.cat([deviation[o:o + len(seg)] for o, seg in segments])
    top = torch.topk(dev, max(1, round(ratio * dev.numel()))).values
    return float(top.sum() / dev.sum().clamp_min(1e-30))


def corpus(model_dir: Path) -> list[list[int]]:
    tok = load_tokenizer(model_dir)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out = []
    for p in files:
        try:
            ids = tok.encode(p.read_text(encoding="utf-8")).ids
        except (OSError, UnicodeDecodeError):
            continue
        if len(ids) > 1200:
            out.append(ids)
    return out


def quality(args: argparse.Namespace) -> None:
    model_dir = Path(args.model)
    engine = Engine.load(model_dir)
    texts = corpus(model_dir)
    rng = random.Random(args.seed)
    sep = load_tokenizer(model_dir).token_to_id("<|sep|>")

    def cut(n: int) -> list[int]:
        ids = rng.choice(texts)
        s = rng.randrange(0, len(ids) - n)
        return ids[s:s + n]

    params = SamplingParams(max_new_tokens=CONTINUATION, stop_at_eos=False)
    methods: list[float | str] = [*RATIOS, PAPER]
    kls: dict[float | str, list[float]] = {r: [] for r in methods}
    agree: dict[float | str, list[float]] = {r: [] for r in methods}
    fractions: dict[float | str, list[float]] = {r: [] for r in methods}
    concentration: list[float] = []
    with KVStore(engine.kv_spec(), {"chunk_size": 64, "tiers": {"cpu": {"capacity": "2GiB"}}}) as store:
        for n_docs in (2, 4, 6, 8):
            for _ in range(args.prompts):
                docs = [cut(args.doc_tokens) for _ in range(n_docs)]
                question = cut(32)
                blenders: dict[float | str, Blender] = {
                    r: Blender(engine, store, BlendConfig(recompute_ratio=r, separator=(sep,),
                                                          check_layers=args.check_layers))
                    for r in RATIOS}
                blenders[PAPER] = Blender(engine, store, BlendConfig(
                    recompute_ratio=0.15, separator=(sep,), check_layers=args.check_layers, selection="deviation"))
                tokens, segments = blenders[0.0].assemble(docs, question)
                full = engine.generate(tokens, params)
                for r in methods:
                    b = blenders[r]
                    res = b.blend(docs, question, max_new_tokens=CONTINUATION)
                    kls[r].append(next_token_kl(full.first_logits, res.logits))
                    if r == 0.0:
                        dev = true_deviation(engine, res.cache.kv[:, :, :len(tokens)], tokens)
                        concentration.append(top_share(dev, segments, 0.15))
                    fractions[r].append(res.compute_fraction)
                    got, _ = engine.decode(res.cache, res.tokens, res.logits, params, time.perf_counter())
                    agree[r].append(sum(a == g for a, g in zip(full.tokens, got)) / CONTINUATION)
                    b.close()
            print(f"  {n_docs} documents done", flush=True)
    base = statistics.mean(kls[0.0])
    rows = [["method", "KL mean", "KL p90", "KL vs full reuse", "greedy agreement", "compute fraction"]]
    for r in methods:
        name = ("CacheBlend 15%, paper's rule" if r == PAPER else "full reuse (0%)" if r == 0
                else f"CacheBlend {100 * r:g}%")
        ks = sorted(kls[r])
        rows.append([name, f"{statistics.mean(ks):.4f}", f"{ks[int(0.9 * (len(ks) - 1))]:.4f}",
                     f"{statistics.mean(ks) / base:.3f}x", f"{100 * statistics.mean(agree[r]):.1f}%",
                     f"{statistics.mean(fractions[r]):.3f}"])
    print(f"\nquality on {model_dir.name} ({engine.config.num_layers} layers): {4 * args.prompts} prompts of "
          f"2/4/6/8 documents x {args.doc_tokens} tokens + a 32-token question; "
          "reference = full prefill of the same prompt")
    print(table(rows))
    print(f"share of the reused tokens' total KV deviation held by their top 15%: "
          f"{100 * statistics.mean(concentration):.1f}% (CacheBlend's premise: most of it; uniform would be 15%)")
    r15 = statistics.mean(kls[0.15]) / base
    a15 = statistics.mean(agree[0.15])
    print(f"goal at 15%: KL <= 0.2x full reuse ({r15:.3f}x: {'met' if r15 <= 0.2 else 'NOT met'}), "
          f"greedy agreement >= 90% ({100 * a15:.1f}%: {'met' if a15 >= 0.9 else 'NOT met'})")


def rag_quality(args: argparse.Namespace) -> None:
    """CacheBlend on SmolLM2 answering the shipped question set, each method against full
    prefill of the same prompt (the question set is fixed: never tuned to a method)."""
    from engine import smollm2_model_dir  # bench/engine.py's loader

    from kvstore.connectors.demo import RAG_SYSTEM
    from kvstore.connectors.reference.chat import ChatFormat
    from kvstore.connectors.reference.texts import rag_corpus

    model_dir = smollm2_model_dir()
    engine = Engine.load(model_dir, dtype=torch.float32)
    fmt = ChatFormat.for_tokenizer(load_tokenizer(model_dir))
    documents, questions = rag_corpus()
    questions = questions[:args.questions] if args.questions else questions
    rng = random.Random(args.seed)
    params = SamplingParams(max_new_tokens=CONTINUATION, stop_at_eos=False)
    methods: list[float | str] = [0.0, 0.05, 0.15, 0.30, PAPER]
    kls: dict[float | str, list[float]] = {r: [] for r in methods}
    agree: dict[float | str, list[float]] = {r: [] for r in methods}
    right: dict[float | str, int] = {r: 0 for r in [*methods, "full"]}
    fractions: dict[float | str, list[float]] = {r: [] for r in methods}
    eos = fmt.end_of_reply

    def reply(ids: list[int]) -> str:
        return fmt.decode(ids[:ids.index(eos)] if eos in ids else ids)

    print(f"RAG quality on {engine.model_id} ({engine.config.num_layers} layers): {len(questions)} questions, "
          f"{args.rag_docs} documents per prompt; reference = full prefill of the same prompt", flush=True)
    with KVStore(engine.kv_spec(), {"chunk_size": 256, "tiers": {"cpu": {"capacity": "4GiB"}}}) as store:
        blenders: dict[float | str, Blender] = {r: Blender(engine, store, BlendConfig(
            recompute_ratio=0.15 if r == PAPER else float(r), check_layers=args.check_layers,
            selection="deviation" if r == PAPER else "attention")) for r in methods}
        for n, q in enumerate(questions, 1):
            gold = next(d for d in documents if d.id == q.doc)
            others = rng.sample([d for d in documents if d.id != q.doc], args.rag_docs - 1)
            chosen = [gold, *others]
            rng.shuffle(chosen)
            opening, docs, query = fmt.user_parts(f"Question: {q.question}",
                                                  [f"Document: {d.title}\n\n{d.text}\n\n" for d in chosen])
            prefix = fmt.system(RAG_SYSTEM) + opening
            tokens, _ = blenders[0.0].assemble(docs, query, prefix)
            full = engine.generate(tokens, params)
            right["full"] += q.answered_by(reply(full.tokens))
            for r in methods:
                res = blenders[r].blend(docs, query, prefix, max_new_tokens=CONTINUATION)
                got, _ = engine.decode(res.cache, res.tokens, res.logits, params, time.perf_counter())
                kls[r].append(next_token_kl(full.first_logits, res.logits))
                agree[r].append(sum(a == g for a, g in zip(full.tokens, got)) / CONTINUATION)
                fractions[r].append(res.compute_fraction)
                right[r] += q.answered_by(reply(got))
            if n % 8 == 0 or n == len(questions):
                print(f"  {n}/{len(questions)} questions", flush=True)
        for b in blenders.values():
            b.close()
    base = statistics.mean(kls[0.0])
    n = len(questions)
    rows = [["method", "KL mean", "KL vs full reuse", "greedy agreement", "accuracy", "compute fraction"],
            ["full prefill", "0", "-", "100%", f"{100 * right['full'] / n:.1f}%", "1.000"]]
    for r in methods:
        name = ("CacheBlend 15%, paper's rule" if r == PAPER else "full reuse (0%)" if r == 0
                else f"CacheBlend {100 * r:g}%")
        rows.append([name, f"{statistics.mean(kls[r]):.4f}", f"{statistics.mean(kls[r]) / base:.3f}x",
                     f"{100 * statistics.mean(agree[r]):.1f}%", f"{100 * right[r] / n:.1f}%",
                     f"{statistics.mean(fractions[r]):.3f}"])
    print(table(rows))
    r15, a15 = statistics.mean(kls[0.15]) / base, statistics.mean(agree[0.15])
    acc15, acc_full, acc_reuse = (100 * right[k] / n for k in (0.15, "full", 0.0))
    print(f"goals at 15%: KL <= 0.2x full reuse ({r15:.3f}x: {'met' if r15 <= 0.2 else 'NOT met'}); greedy "
          f"agreement >= 90% ({100 * a15:.1f}%: {'met' if a15 >= 0.9 else 'NOT met'}); accuracy within 2 points "
          f"of full prefill and above full reuse ({acc15:.1f}% vs {acc_full:.1f}% and {acc_reuse:.1f}%: "
          f"{'met' if acc15 >= acc_full - 2 and acc15 > acc_reuse else 'NOT met'})")


def speed(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    if args.model == "smollm2":
        from engine import smollm2  # bench/engine.py's loader: the model and English text

        engine, text = smollm2()
        cfg = engine.config
        starts = [rng.randrange(0, len(text) - 1100) for _ in range(5)]
        docs = [text[s:s + 1024] for s in starts[:4]]
        question = text[starts[4]:starts[4] + 64]
    else:
        cfg = tiny_config("llama", vocab_size=4096, hidden_size=256, num_layers=16, num_heads=4, num_kv_heads=2,
                          head_dim=64, intermediate_size=768, max_position_embeddings=16384)
        engine = Engine(Transformer(cfg, random_weights(cfg, seed=0)), model_id="bench/llama-16l-256")
        docs = [[rng.randrange(6, 4090) for _ in range(1024)] for _ in range(4)]
        question = [rng.randrange(6, 4090) for _ in range(64)]
    print(f"speed on {engine.model_id}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, 4 documents x 1024 tokens + 64-token "
          f"question, documents in the cpu tier; {torch.get_num_threads()} threads; median of {args.repeat}")
    with KVStore(engine.kv_spec(), {"chunk_size": 256, "tiers": {"cpu": {"capacity": "4GiB"}}}) as store:
        rows = [["method", "prefill s", "vs full", "ideal compute", "recomputed"]]
        blender = Blender(engine, store, BlendConfig(recompute_ratio=0.15, check_layers=args.check_layers))
        blender.precompute(docs)
        tokens, _ = blender.assemble(docs, question)
        engine.prefill_kv(tokens[:512])  # warm-up
        full = median(timed(lambda: engine.prefill_kv(tokens), args.repeat))
        rows.append(["full prefill", f"{full:.2f}", "1.00x", "1.000", f"{len(tokens)}"])
        for r in (0.0, 0.15, 0.30):
            b = Blender(engine, store, BlendConfig(recompute_ratio=r, check_layers=args.check_layers))
            runs = [b.blend(docs, question) for _ in range(args.repeat)]
            t = median([x.seconds for x in runs])
            rows.append([f"CacheBlend {100 * r:g}%", f"{t:.2f}", f"{t / full:.3f}x",
                         f"{runs[-1].compute_fraction:.3f}", f"{runs[-1].recomputed_tokens}"])
            b.close()
            if r == 0.15:
                ratio15 = t / full
        print(table(rows))
        print(f"goal: CacheBlend 15% <= 0.35x full prefill: {ratio15:.3f}x ({'met' if ratio15 <= 0.35 else 'NOT met'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="all", choices=["quality", "speed", "all"])
    ap.add_argument("--prompts", type=int, default=5, help="prompts per document count (quality)")
    ap.add_argument("--doc-tokens", type=int, default=128, help="tokens per document (quality)")
    ap.add_argument("--model", default=str(DEFAULT_MODEL),
                    help="trained model directory (quality), e.g. one from reference.train --layers 12; "
                         "for speed: 'smollm2' runs the real model (else a random 16-layer one)")
    ap.add_argument("--check-layers", type=lambda text: tuple(int(x) for x in text.split(",")), default=None,
                    help="e.g. 1 or 1,2,3 (default: the library's)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--questions", type=int, default=0, help="RAG questions on smollm2 (default: all)")
    ap.add_argument("--rag-docs", type=int, default=3, help="documents per RAG prompt on smollm2 (default 3)")
    args = ap.parse_args()
    if args.what in ("quality", "all"):
        (rag_quality if args.model == "smollm2" else quality)(args)
    if args.what in ("speed", "all"):
        speed(args)


if __name__ == "__main__":
    main()
