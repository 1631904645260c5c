"""``kvstore calibrate``: measure how much each layer's KV error costs a model, and write the
profile that cachegen's levels then follow for it (kvstore.codecs.profiles).

How: real text is prefilled once; its KV goes through the codec in 256-token chunks at one
level, first as it is, then with one group of layers at a coarser step, and the model reads
each decoded cache back while it is teacher-forced over the next tokens. A group's
sensitivity is the KL (against the original cache's next-token distributions) it adds per bit
per value it saves. Groups rather than single layers: six configurations instead of thirty,
and neighbouring layers measured alike on SmolLM2. Needs an engine, so it lives here, not in
the core.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from kvstore.codecs.cachegen import LEVELS, CacheGenCodec, CacheGenOptions
from kvstore.codecs.profiles import CodecProfile
from kvstore.codecs.quality import next_token_kl
from kvstore.errors import InvalidInputError
from kvstore.spec import dtype_from_name

CHUNK = 256  # tokens per stored chunk, as engines store them
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # what the reference engine computes in
COARSER = 1.6  # a group's step multiplier while its sensitivity is measured


@dataclass
class GroupRow:
    layers: range
    bits: float  # per value, the whole KV
    kl: float
    sensitivity: float  # added KL per bit per value saved


@dataclass
class Calibration:
    profile: CodecProfile
    base_bits: float
    base_kl: float
    rows: list[GroupRow] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Passage:
    """One calibration text: ``context`` tokens stored, the rest teacher-forced."""

    ids: list[int]
    context: int


def default_texts() -> list[str]:
    """Text shipped with kvstore: its RAG documents (prose) and its own modules (code)."""
    from kvstore.connectors.reference.texts import rag_corpus

    docs, _questions = rag_corpus()
    root = Path(__file__).resolve().parent.parent
    code = [p for p in (root / "kvstore" / "blobstore.py", root / "kvstore" / "writer.py") if p.is_file()]
    return ["\n\n".join(d.text for d in docs)] + [p.read_text(encoding="utf-8") for p in code]


def passages_from(texts: Sequence[str], tokenize: Callable[[str], list[int]], count: int, context: int,
                  forced: int) -> list[Passage]:
    """``count`` passages of ``context + forced + 1`` tokens, taken in turn from each text (so
    prose and code both count), as many from one text as it holds."""
    need = context + forced + 1
    pools = [tokenize(t) for t in texts]
    out: list[Passage] = []
    at = [0] * len(pools)
    while len(out) < count and any(at[i] + need <= len(p) for i, p in enumerate(pools)):
        for i, pool in enumerate(pools):
            if len(out) < count and at[i] + need <= len(pool):
                out.append(Passage(pool[at[i]:at[i] + need], context))
                at[i] += need
    if not out:
        raise InvalidInputError(f"the calibration texts hold no passage of {need} tokens")
    return out


def layer_groups(layers: int, groups: int) -> list[range]:
    groups = max(1, min(groups, layers))
    bounds = [round(i * layers / groups) for i in range(groups + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(groups)]


def calibrate(engine, passages: Sequence[Passage], *, level: str = "compact", groups: int = 6,
              progress: bool = True, model: str = "") -> Calibration:
    """Measure each layer group's sensitivity on ``engine`` (kvstore.connectors.reference) and
    return the profile for its fingerprint (not yet saved)."""
    from tqdm import tqdm

    if level not in LEVELS:
        raise InvalidInputError(f"unknown cachegen level {level!r}; levels: {', '.join(LEVELS)}")
    t0 = time.perf_counter()
    layers = engine.config.num_layers
    spans = layer_groups(layers, groups)
    data = []
    for p in passages:
        kv, _ = engine.prefill_kv(p.ids[:p.context])
        ref, _ = engine.continue_from(kv, p.ids)
        data.append((kv, ref))
    configs: list[tuple[float, ...] | None] = [None] + [
        tuple(COARSER if layer in span else 1.0 for layer in range(layers)) for span in spans]
    results = []
    bar = tqdm(total=len(configs) * len(data), desc="kvstore: calibrating", unit="pass", disable=not progress,
               file=sys.stderr, mininterval=0.5)
    try:
        for factors in configs:
            codec = CacheGenCodec(CacheGenOptions(level=level, layer_factors=factors))
            bits, kls = [], []
            for (kv, ref), p in zip(data, passages):
                back, nbytes = _through(codec, kv)
                got, _ = engine.continue_from(back, p.ids)
                bits.append(8 * nbytes / kv.numel())
                kls.append(next_token_kl(ref, got))
                bar.update()
            results.append((sum(bits) / len(bits), sum(kls) / len(kls)))
    finally:
        bar.close()
    base_bits, base_kl = results[0]
    rows = []
    for span, (bits, kl) in zip(spans, results[1:]):
        saved = base_bits - bits
        rows.append(GroupRow(span, bits, kl, (kl - base_kl) / saved if saved > 0 else 0.0))
    profile = CodecProfile.from_sensitivity(engine.kv_spec().fingerprint, [r.sensitivity for r in rows],
                                            [s.start for s in spans], layers, model=model, level=level)
    return Calibration(profile, base_bits, base_kl, rows, time.perf_counter() - t0)


def _through(codec: CacheGenCodec, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The KV as a store would hand it back: fp16 chunks through the codec."""
    half = kv.half()
    parts, nbytes = [], 0
    for s in range(0, half.shape[2], CHUNK):
        chunk = half[:, :, s:s + CHUNK].contiguous()
        blob = codec.encode(chunk)
        nbytes += len(blob)
        parts.append(codec.decode(memoryview(blob), tuple(chunk.shape), chunk.dtype))
    return torch.cat(parts, 2).to(kv.dtype), nbytes


def describe(cal: Calibration) -> str:
    lines = [f"{cal.profile.level} as it is: {cal.base_bits:.3f} bits/value, KL {cal.base_kl:.3e}; each group "
             f"of layers at {COARSER}x the step:",
             "layers  bits/value  KL         KL per bit saved  step factor"]
    for row in cal.rows:
        factor = cal.profile.layer_factors[row.layers.start]
        lines.append(f"{row.layers.start:>2}-{row.layers.stop - 1:<2}   {row.bits:10.3f}  {row.kl:.3e}  "
                     f"{row.sensitivity:16.3e}  {factor:.2f}")
    spread = max(r.sensitivity for r in cal.rows) / max(min(r.sensitivity for r in cal.rows), 1e-12)
    lines.append(f"sensitivity varies {spread:.1f}x between groups; measured in {cal.seconds:.0f} s")
    if not math.isfinite(spread) or spread < 1.5:
        lines.append("(little to gain: the layers are about equally sensitive)")
    return "\n".join(lines)


def run(model_dir: Path | None, *, level: str, passages: int, groups: int, context: int, forced: int,
        fingerprint: str | None, out_dir: Path | None, dtype: str, save: bool = True) -> int:
    """``kvstore calibrate``: calibrate, print the table, write the profile."""
    from kvstore.codecs.profiles import profile_dir, save_profile
    from kvstore.connectors.demo import demo_model
    from kvstore.connectors.reference import Engine
    from kvstore.connectors.reference.tokenizer import load_tokenizer

    if dtype not in COMPUTE_DTYPES:
        raise InvalidInputError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    if context % CHUNK or context <= 0:
        raise InvalidInputError(f"--context must be a positive multiple of {CHUNK} tokens, got {context}")
    if forced <= 0 or passages <= 0 or groups <= 0:
        raise InvalidInputError("--forced, --passages and --groups must be positive")
    if fingerprint is not None:
        try:
            target = bytes.fromhex(fingerprint)
        except ValueError:
            target = b""
        if not target:
            raise InvalidInputError(f"--fingerprint must be hex (a KVSpec fingerprint), got {fingerprint!r}")
    if save:  # before minutes of measuring, not after
        _check_writable(out_dir or profile_dir())
    path = demo_model(model_dir)
    engine = Engine.load(path, dtype=dtype_from_name(dtype))
    tok = load_tokenizer(path)
    texts = passages_from(default_texts(), lambda t: tok.encode(t).ids, passages, context, forced)
    print(f"calibrating {path.name} ({engine.config.num_layers} layers, {dtype}) at {level} on {len(texts)} passages "
          f"of {context} stored + {forced} teacher-forced tokens")
    cal = calibrate(engine, texts, level=level, groups=groups, model=path.name)
    if fingerprint is not None:
        cal.profile = dataclasses.replace(cal.profile, fingerprint=target.hex())
    print(describe(cal))
    if save:
        try:
            written = save_profile(cal.profile, out_dir)
        except OSError as exc:
            raise InvalidInputError(f"cannot write the profile: {exc}") from None
        print(f"profile for model {cal.profile.fingerprint[:16]}... written to {written}; lossy cachegen levels "
              f"follow it for this model from the next start")
    else:
        print(f"not written (--dry-run); it would go to {(out_dir or profile_dir()) / (cal.profile.fingerprint + '.json')}")
    return 0


def _check_writable(where: Path) -> None:
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InvalidInputError(f"cannot write profiles to {where}: {exc.strerror or exc}") from None
