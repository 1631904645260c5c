"""KV codecs judged by what the model does with the decoded cache (SmolLM2-135M-Instruct).

Per passage (9 of prose, 7 Python modules, all shipped with this repository): a 1,024-token
context is prefilled, its KV cast to fp16 and stored per 256-token chunk through each codec,
decoded, and the model then reads it back: 512 tokens teacher-forced over the decoded cache
(perplexity, and KL of each next-token distribution against the one over the original cache)
and 32 tokens decoded greedily (agreement with the original's). Prefill logits are never used:
prefill does not read a stored cache.

Printed per codec, kvstore's and its peers' in the same run: bits per value counting every
payload byte, ratio vs fp16, Δppl (mean and worst passage), mean KL, greedy agreement, and
encode/decode MB/s on one thread (one chunk, best of 10).

First a calibration (``kvstore calibrate``, kvstore.connectors.calibrate) measures SmolLM2's
per-layer sensitivity on held-out text (the README beyond the windows used here and two
modules not among the seven), and every cachegen level also runs following that profile
("+ profile" rows), through the path a store takes (``for_model``); ``--no-profile`` skips it.

    python bench/codec_quality.py [--passages 16] [--codecs int8,compact,...] [--no-peers | --peers lmcache,kivi]
                                  [--no-profile]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
import _codec_peers  # noqa: E402
from _common import table  # noqa: E402
from engine import smollm2_model_dir  # noqa: E402

from kvstore.codecs import get_codec  # noqa: E402
from kvstore.codecs.cachegen import CacheGenCodec  # noqa: E402
from kvstore.codecs.quality import next_token_kl  # noqa: E402
from kvstore.connectors.reference import Engine  # noqa: E402
from kvstore.connectors.reference.texts import rag_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONTEXT, FORCED, GREEDY, CHUNK = 1024, 512, 32, 256
# Seven of this repository's own modules: real Python, shipped with every checkout.
CODE = ("kvstore/tierstack.py", "kvstore/config.py", "service/server.py", "connectors/vllm.py",
        "connectors/blend.py", "codecs/cachegen.py", "kvstore/store.py")
HELD_OUT = ("kvstore/blobstore.py", "kvstore/writer.py")  # calibration only (--profile)
CODECS = ("int8", "fp8", "cachegen:high", "balanced", "compact", "aggressive", "cachegen:extreme")


@dataclass
class Passage:
    name: str
    kind: str  # prose | code
    ids: list[int]


@dataclass
class Row:
    name: str
    bits: list[float] = field(default_factory=list)
    dppl: list[float] = field(default_factory=list)  # percent, per passage
    kl: list[float] = field(default_factory=list)
    agree: list[float] = field(default_factory=list)
    enc_mbs: float = 0.0
    dec_mbs: float = 0.0
    note: str = ""


def passages(tokenize: Callable[[str], list[int]], count: int) -> list[Passage]:
    """Prose: the shipped RAG documents (about 500 tokens each) joined in order until a passage
    is long enough, then the README cut in windows; code: the modules above."""
    need = CONTEXT + FORCED + 1
    prose: list[Passage] = []
    docs, _questions = rag_corpus()
    ids: list[int] = []
    names: list[str] = []
    for doc in docs:
        ids += tokenize(doc.text + "\n\n")
        names.append(doc.id)
        if len(ids) >= need:
            prose.append(Passage("+".join(names[:2]) + ("..." if len(names) > 2 else ""), "prose", ids[:need]))
            ids, names = [], []
    readme = tokenize((ROOT / "README.md").read_text(encoding="utf-8"))
    for i in range(0, len(readme) - need + 1, need):
        if len(prose) >= 9:
            break
        prose.append(Passage(f"README@{i}", "prose", readme[i:i + need]))
    code = []
    for rel in CODE:
        toks = tokenize((ROOT / rel).read_text(encoding="utf-8"))
        if len(toks) >= need:
            code.append(Passage(rel, "code", toks[:need]))
    chosen = prose[:9] + code[:7]
    return chosen[:count]


def chunks(kv: torch.Tensor) -> list[torch.Tensor]:
    return [kv[:, :, s:s + CHUNK].contiguous() for s in range(0, kv.shape[2], CHUNK)]


def ppl_and_kl(ref: torch.Tensor, got: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
    """(reference perplexity, perplexity over the decoded cache, mean KL(ref || got))."""
    lr, lg = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    nll_r = -lr.gather(1, targets[:, None]).mean().item()
    nll_g = -lg.gather(1, targets[:, None]).mean().item()
    return math.exp(nll_r), math.exp(nll_g), next_token_kl(ref, got)


def speed(encode: Callable[[torch.Tensor], bytes], decode: Callable[[bytes], torch.Tensor],
          kv: torch.Tensor) -> tuple[float, float]:
    mb = kv.numel() * 2 / 1e6
    blob = encode(kv)
    decode(blob)
    # Best of 10: one chunk takes 15-40 ms through kvstore's codecs, and best of 3 was still
    # 20-30% below a quiet machine's figure.
    enc = min(_timed(lambda: encode(kv)) for _ in range(10))
    dec = min(_timed(lambda: decode(blob)) for _ in range(10))
    return mb / enc, mb / dec


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def calibrated(engine: Engine, tok) -> Callable[[CacheGenCodec], CacheGenCodec]:
    """Calibrate on held-out text into a private profile directory; returns codec -> the variant
    a store would encode this model's KV with."""
    import atexit
    import shutil
    import tempfile

    from kvstore.codecs import profiles
    from kvstore.connectors.calibrate import calibrate, describe, passages_from

    need = CONTEXT + FORCED + 1
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ids = tok.encode(readme, add_special_tokens=False)[5 * need:]  # past the 5 README windows above
    texts = [tok.decode(ids), *((ROOT / rel).read_text(encoding="utf-8") for rel in HELD_OUT)]
    held = passages_from(texts, lambda t: tok.encode(t, add_special_tokens=False), 4, CONTEXT, FORCED // 2)
    torch.set_num_threads(1)
    cal = calibrate(engine, held, level="compact", model="SmolLM2-135M-Instruct")
    print(describe(cal))
    where = tempfile.mkdtemp(prefix="kvstore-bench-profiles-")
    atexit.register(shutil.rmtree, where, True)
    os.environ["KVSTORE_CODEC_PROFILES"] = where
    profiles.save_profile(cal.profile)
    fingerprint = engine.kv_spec().fingerprint
    return lambda codec: codec.for_model(fingerprint)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=16, help="how many of the 16 passages (default all)")
    ap.add_argument("--codecs", default=",".join(CODECS), help="kvstore codecs, comma-separated")
    ap.add_argument("--no-peers", action="store_true", help="skip the peers (TurboQuant, KIVI, LMCache's CacheGen)")
    ap.add_argument("--peers", default="", help="only these peer families, comma-separated: "
                    + ", ".join(_codec_peers.FAMILIES))
    ap.add_argument("--no-profile", action="store_true", help="skip the calibration and the cachegen levels run "
                    "with its per-layer profile")
    args = ap.parse_args()
    families = [w.strip().lower() for w in args.peers.split(",") if w.strip()]
    unknown = sorted(set(families) - set(_codec_peers.FAMILIES))
    if unknown:
        ap.error(f"unknown peer family {', '.join(unknown)}; choose from {', '.join(_codec_peers.FAMILIES)}")
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model_dir = smollm2_model_dir()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    engine = Engine.load(model_dir, dtype=torch.float32)
    ps = passages(lambda text: tok.encode(text, add_special_tokens=False), args.passages)
    print(f"{len(ps)} passages ({sum(p.kind == 'prose' for p in ps)} prose, {sum(p.kind == 'code' for p in ps)} "
          f"code) on {model_dir.name}: {CONTEXT} context tokens in {CONTEXT // CHUNK} chunks of {CHUNK}, "
          f"{FORCED} teacher-forced, {GREEDY} greedy")
    ours = [(name, get_codec(name)) for name in args.codecs.split(",") if name]
    entries: list[tuple[str, Callable | None, Callable | None, str]] = [("fp16 (raw)", None, None, "")]
    if not args.no_profile:
        profiled = calibrated(engine, tok)
        ours += [(f"{name} + profile", profiled(codec)) for name, codec in ours if isinstance(codec, CacheGenCodec)]
    for name, codec in ours:
        entries.append((name, lambda kv, c=codec: bytes(memoryview(c.encode(kv)).cast("B")),
                        lambda blob, kv, c=codec: c.decode(memoryview(blob), tuple(kv.shape), kv.dtype), ""))
    if not args.no_peers:
        for peer in _codec_peers.peers(model_dir, families):
            entries.append((peer.name, peer.encode, peer.decode, peer.missing))
    rows = {name: Row(name, note=missing) for name, _e, _d, missing in entries}
    torch.set_num_threads(1)
    for i, p in enumerate(ps):
        t0 = time.perf_counter()
        kv, _ = engine.prefill_kv(p.ids[:CONTEXT])
        ref_logits, ref_greedy = engine.continue_from(kv, p.ids[:CONTEXT + FORCED], GREEDY)
        targets = torch.tensor(p.ids[CONTEXT + 1:CONTEXT + FORCED + 1])
        half = kv.half()
        for name, enc, dec, missing in entries:
            if missing:
                continue
            row = rows[name]
            if enc is None:  # fp16 as stored raw: 16 bits, no codec
                back, nbytes = half, half.numel() * 2
            else:
                parts = chunks(half)
                blobs = [enc(c) for c in parts]
                nbytes = sum(len(b) for b in blobs)
                back = torch.cat([dec(b, c) for b, c in zip(blobs, parts)], 2)
                if not row.enc_mbs:
                    row.enc_mbs, row.dec_mbs = speed(enc, lambda b, c=parts[0]: dec(b, c), parts[0])
            got_logits, got_greedy = engine.continue_from(back.float(), p.ids[:CONTEXT + FORCED], GREEDY)
            ppl_r, ppl_g, kl = ppl_and_kl(ref_logits[:FORCED], got_logits[:FORCED], targets)
            row.bits.append(8 * nbytes / half.numel())
            row.dppl.append(100 * (ppl_g / ppl_r - 1))
            row.kl.append(kl)
            row.agree.append(sum(a == b for a, b in zip(ref_greedy, got_greedy)) / GREEDY)
        print(f"  passage {i + 1}/{len(ps)} {p.kind} {p.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    out = [["codec", "bits/value", "x fp16", "Δppl mean", "Δppl worst", "mean KL", "greedy agree",
            "enc MB/s", "dec MB/s"]]
    for row in rows.values():
        if row.note:
            out.append([row.name, row.note, *[""] * 7])
            continue
        bits = statistics.mean(row.bits)
        worst = max(range(len(row.dppl)), key=lambda j: row.dppl[j])
        out.append([row.name, f"{bits:.2f}", f"{16 / bits:.2f}x", f"{statistics.mean(row.dppl):+.3f}%",
                    f"{row.dppl[worst]:+.2f}% ({ps[worst].name[:18]})", f"{statistics.mean(row.kl):.2e}",
                    f"{100 * statistics.mean(row.agree):.1f}%",
                    f"{row.enc_mbs:.0f}" if row.enc_mbs else "-", f"{row.dec_mbs:.0f}" if row.dec_mbs else "-"])
    print()
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
