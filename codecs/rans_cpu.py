"""CPU kernels for cachegen, compiled with numba: the rANS streams of :mod:`kvstore.codecs.rans`
and the quantization before them.

Why a second implementation: the torch coder advances all lanes one step per handful of tensor
ops, which is what a GPU wants, but on a CPU each op is a pass over memory; a compiled scalar
loop per lane keeps the lane's state in a register and decodes 2-3x faster, and fuses the
dequantization (mean, step, running sum for delta lanes) into the same pass. The bitstreams are
the same: tests check both coders against each other, and the torch one remains the path for
CUDA tensors and for machines where numba does not import.

Corrupt input must never read out of bounds: callers run ``rans.check_stream`` first (as
``rans.decode`` does), the tables come from ``decode_tables`` here (which refuses rows that do
not sum to M, as ``rans.decode_tables`` does), contexts come from the frame layout, and the
loops here check every word read against the stream's own range.
"""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import numpy as np

from kvstore.codecs.rans import _XMAX_SHIFT, M, RANS_L, SCALE_BITS, RansError

log = logging.getLogger(__name__)

ENABLED = True
"""Tests switch this off to exercise the torch coder on CPU."""

_lock = threading.Lock()
_kernels: SimpleNamespace | None = None
_failed = False


def available() -> bool:
    """Whether the compiled coder can run here. numba is imported (and the kernels loaded from
    numba's cache or compiled) on first use, not when kvstore.codecs is imported: most processes
    never touch cachegen, and importing llvmlite into an engine's process is not free (vLLM's
    kernel-override scan trips over an llvmlite object)."""
    return ENABLED and _load() is not None


def _load() -> SimpleNamespace | None:
    global _kernels, _failed
    if _kernels is None and not _failed:
        with _lock:
            if _kernels is None and not _failed:
                try:  # a dependency, but a broken install (a numpy mismatch in an engine's venv)
                    import numba  # must not make the codecs unusable: the torch coder covers all
                except Exception as exc:  # pragma: no cover - depends on the environment
                    _failed = True
                    log.info("numba unavailable (%s): rANS runs on the torch coder", exc)
                    return None
                jit = numba.njit(cache=True, nogil=True, boundscheck=False)
                _kernels = SimpleNamespace(decode=jit(_decode_dequant), encode=jit(_encode),
                                           quantize=jit(_quantize), tables=jit(_decode_tables))
    return _kernels


def _compiled() -> SimpleNamespace:
    kernels = _load()
    if kernels is None:
        raise RuntimeError("the compiled rANS coder is unavailable: check available() first")
    return kernels


def _decode_dequant(states, counts, words, ctx, fb_table, sym_table, mu, step, delta, qmax, steps,
                    channels, group, out):  # pragma: no cover - compiled
    """Decode every stream (``group`` lanes in a row) and write ``mu + step * q`` (q summed
    along tokens on delta lanes) to ``out[lane // channels, t, lane % channels]``. Returns 0,
    or -1 for a corrupt stream.

    Two streams advance side by side: one stream's symbols form a chain (each state comes from
    the one before), so a lone stream leaves the core waiting on each table load; two chains
    interleaved keep it busy (1.5x measured). An odd stream out is paired with itself: both
    chains decode it alike and write the same values."""
    streams = states.shape[0]
    starts = np.empty(streams + 1, np.int64)
    starts[0] = 0
    for s in range(streams):
        starts[s + 1] = starts[s] + np.int64(counts[s])
    for s in range(0, streams, 2):
        s2 = s + 1 if s + 1 < streams else s
        xa = np.int64(states[s])
        xb = np.int64(states[s2])
        pa, ea = starts[s], starts[s + 1]
        pb, eb = starts[s2], starts[s2 + 1]
        for off in range(group):
            la = s * group + off
            lb = s2 * group + off
            ra = la // channels
            ca = la - ra * channels
            rb = lb // channels
            cb = lb - rb * channels
            basea = np.int64(ctx[la]) * M
            baseb = np.int64(ctx[lb]) * M
            ma, sa, runa = mu[la], step[la], delta[la]
            mb, sb, runb = mu[lb], step[lb], delta[lb]
            acca = np.float32(0.0)
            accb = np.float32(0.0)
            for t in range(steps):
                ia = basea + (xa & (M - 1))
                ib = baseb + (xb & (M - 1))
                ba = np.int64(fb_table[ia])
                bb = np.int64(fb_table[ib])
                xa = (ba >> 16) * (xa >> SCALE_BITS) + (ba & 0xFFFF)
                xb = (bb >> 16) * (xb >> SCALE_BITS) + (bb & 0xFFFF)
                qa = np.float32(sym_table[ia] - qmax)
                qb = np.float32(sym_table[ib] - qmax)
                acca = acca + qa if runa else qa
                accb = accb + qb if runb else qb
                out[ra, t, ca] = ma + acca * sa
                out[rb, t, cb] = mb + accb * sb
                if xa < RANS_L:
                    if pa >= ea:
                        return -1
                    xa = (xa << 16) | (np.int64(words[pa]) & 0xFFFF)
                    pa += 1
                if xb < RANS_L:
                    if pb >= eb:
                        return -1
                    xb = (xb << 16) | (np.int64(words[pb]) & 0xFFFF)
                    pb += 1
        if pa != ea or xa != RANS_L or pb != eb or xb != RANS_L:
            return -1
    return 0


def _encode(symbols, ctx, mul, add, alphabet, group, states, counts, words):  # pragma: no cover - compiled
    """rANS-encode each stream (``group`` lanes in a row; lane ``(r, c)`` holds ``symbols[r, :,
    c]``) backwards; words land stream-major in decode order. Returns the number of words
    written, or -1 when a symbol is outside the alphabet or has no frequency in its table.

    ``x // f * M + x % f + cum`` is computed as ``x + bias + q * cmpl`` with ``q = x // f`` from a
    multiply by a precomputed reciprocal (exact for states below 2**31, which rANS keeps them):
    an integer division per symbol was half of the encoder's time. ``mul`` and ``add`` (flat,
    ``table * alphabet + symbol``) pack what a symbol needs into two loads (``_reciprocals``),
    and two streams are coded side by side so that their dependency chains overlap (as in the
    decoder)."""
    rows, steps, channels = symbols.shape
    lanes = rows * channels
    streams = lanes // group
    flat = symbols.reshape(-1)
    scratch_a = np.empty(steps * group, np.int32)
    scratch_b = np.empty(steps * group, np.int32)
    ptr = 0
    for s in range(0, streams, 2):
        pair = s + 1 < streams
        xa = np.uint64(RANS_L)
        xb = np.uint64(RANS_L)
        ka = 0
        kb = 0
        for off in range(group - 1, -1, -1):
            la = s * group + off
            lb = la + group if pair else la
            ra = la // channels
            rb = lb // channels
            at_a = ra * steps * channels + la - ra * channels  # symbols[ra, 0, ca] in flat
            at_b = rb * steps * channels + lb - rb * channels
            ta = ctx[la] * alphabet
            tb = ctx[lb] * alphabet
            for back in range(steps):
                t = steps - 1 - back
                sa = flat[at_a + t * channels]
                sb = flat[at_b + t * channels]
                if sa < 0 or sa >= alphabet or sb < 0 or sb >= alphabet:
                    return -1
                ma = mul[ta + sa]
                mb = mul[tb + sb]
                aa = add[ta + sa]
                ab = add[tb + sb]
                if aa == 0 or ab == 0:  # no frequency: a symbol its table cannot code
                    return -1
                # Renormalization without branches (a word is written every few symbols, at
                # random: a branch there mispredicts often): store always, advance if needed.
                fa = np.uint64(xa >= ((aa >> np.uint64(32)) << np.uint64(_XMAX_SHIFT)))
                fb = np.uint64(xb >= ((ab >> np.uint64(32)) << np.uint64(_XMAX_SHIFT)))
                scratch_a[ka] = xa & np.uint64(0xFFFF)
                scratch_b[kb] = xb & np.uint64(0xFFFF)
                ka += np.int64(fa)
                kb += np.int64(fb)
                xa >>= fa << np.uint64(4)
                xb >>= fb << np.uint64(4)
                qa = ((xa * (ma & np.uint64(0xFFFFFFFF))) >> np.uint64(32)) >> (ma >> np.uint64(32))
                qb = ((xb * (mb & np.uint64(0xFFFFFFFF))) >> np.uint64(32)) >> (mb >> np.uint64(32))
                xa = xa + (aa & np.uint64(0xFFFF)) + qa * ((aa >> np.uint64(16)) & np.uint64(0xFFFF))
                xb = xb + (ab & np.uint64(0xFFFF)) + qb * ((ab >> np.uint64(16)) & np.uint64(0xFFFF))
        states[s] = xa
        counts[s] = ka
        for j in range(ka):  # emitted last = read first
            words[ptr + j] = scratch_a[ka - 1 - j]
        ptr += ka
        if pair:
            states[s + 1] = xb
            counts[s + 1] = kb
            for j in range(kb):
                words[ptr + j] = scratch_b[kb - 1 - j]
            ptr += kb
    return ptr


def _reciprocals(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (table, symbol), what the encoder needs to turn its division by the frequency into a
    multiply (Alverson's method, as in ryg_rans: exact for dividends below 2**31), in two
    words: ``mul`` = reciprocal | shift << 32, ``add`` = bias | complement << 16 | frequency
    << 32. A zero frequency leaves ``add`` 0, which the encoder refuses."""
    f = freqs.astype(np.uint64)
    cum = (np.cumsum(freqs, axis=1) - freqs).astype(np.uint64)
    shift = np.ceil(np.log2(np.maximum(freqs, 1))).astype(np.uint64)  # exact: f <= 4096
    safe = np.maximum(f, np.uint64(1))
    rcp = ((np.uint64(1) << (shift + np.uint64(31))) + safe - np.uint64(1)) // safe
    rshift = np.where(shift > 0, shift - np.uint64(1), np.uint64(0)).astype(np.uint64)
    one = f == 1
    rcp[one] = np.uint64(0xFFFFFFFF)
    bias = cum + np.where(one, np.uint64(M - 1), np.uint64(0)).astype(np.uint64)
    cmpl = np.uint64(M) - np.where(one, np.uint64(1), f)
    mul = rcp | (rshift << np.uint64(32))
    add = np.where(f > 0, bias | (cmpl << np.uint64(16)) | (f << np.uint64(32)), np.uint64(0)).astype(np.uint64)
    return mul, add


def _quantize(v, mu, inv, qmax, allow_delta, sym, mode, ctx, hist):  # pragma: no cover - compiled
    """Cachegen's symbols: ``round((v - mu) * inv)`` direct, closed-loop delta ones (as
    ``cachegen._delta_quantize``), the lane's mode (delta where its symbols are smaller in sum
    and none clamps), the chosen symbols offset by ``qmax``, the lane's table (``row * 2 +
    mode``) and the tables' histograms. Per row one pass over its ``[T, C]`` values with the
    channels innermost (so the compiler vectorizes across lanes) keeps both candidates in small
    buffers, and a second pass over those picks, instead of the dozen passes over every value
    the same steps take as tensor operations."""
    rows, steps, channels = v.shape
    alphabet = 2 * int(qmax) + 1
    total = np.empty(channels, np.float32)
    direct = np.empty(channels, np.float32)
    summed = np.empty(channels, np.float32)
    peak = np.empty(channels, np.float32)
    cand_q = np.empty((steps, channels), np.int16)
    cand_d = np.empty((steps, channels), np.int16)
    use = np.empty(channels, np.bool_)
    for r in range(rows):
        total[:] = 0
        direct[:] = 0
        summed[:] = 0
        peak[:] = 0
        for t in range(steps):
            for c in range(channels):
                x = (v[r, t, c] - mu[r, c]) * inv[r, c]
                q = min(max(np.rint(x), -qmax), qmax)
                direct[c] += abs(q)
                d = min(max(np.rint(x - total[c]), -qmax), qmax)
                summed[c] += abs(d)
                peak[c] = max(peak[c], abs(d))
                total[c] += d
                cand_q[t, c] = np.int16(q)
                cand_d[t, c] = np.int16(d)
        for c in range(channels):
            use[c] = allow_delta and summed[c] < direct[c] and peak[c] < qmax
            lane = r * channels + c
            mode[lane] = use[c]
            ctx[lane] = r * 2 + (1 if use[c] else 0)
        for t in range(steps):
            for c in range(channels):
                k = np.int32(cand_d[t, c] if use[c] else cand_q[t, c]) + np.int32(qmax)
                sym[r, t, c] = k
                hist[ctx[r * channels + c] * alphabet + k] += 1


def _decode_tables(freqs, fb, sym):  # pragma: no cover - compiled
    """``rans.decode_tables`` as one loop (the tensor version is ~15 ops over every slot of
    every table, a fifth of a frame's decode). Returns False for rows that are negative or do
    not sum to M."""
    rows, alphabet = freqs.shape
    for r in range(rows):
        total = 0
        for a in range(alphabet):
            if freqs[r, a] < 0:
                return False
            total += freqs[r, a]
        if total != M:
            return False
        slot = r * M
        for a in range(alphabet):
            f = freqs[r, a]
            for k in range(f):
                fb[slot] = (f << 16) | k
                sym[slot] = a
                slot += 1
    return True


def decode_tables(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as :func:`kvstore.codecs.rans.decode_tables` (numpy in and out)."""
    rows = freqs.shape[0]
    fb = np.empty(rows * M, np.int32)
    sym = np.empty(rows * M, np.int16)
    if not _compiled().tables(np.ascontiguousarray(freqs, dtype=np.int32), fb, sym):
        raise RansError("frequency table rows must be non-negative and sum to 4096")
    return fb, sym


def decode_dequant(states: np.ndarray, counts: np.ndarray, words: np.ndarray, ctx: np.ndarray,
                   fb_table: np.ndarray, sym_table: np.ndarray, mu: np.ndarray, step: np.ndarray,
                   delta: np.ndarray, qmax: int, steps: int, channels: int, out: np.ndarray,
                   group: int = 1) -> bool:
    """False when the stream is corrupt (``out`` is then partly written garbage: discard it)."""
    kernels = _compiled()
    return kernels.decode(states, counts, words, ctx, fb_table, sym_table, mu, step, delta,
                          qmax, steps, channels, group, out) == 0


def encode(symbols: np.ndarray, ctx: np.ndarray, freqs: np.ndarray,
           group: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`kvstore.codecs.rans.encode` for symbols ``[rows, steps, C]`` (lane ``(r, c)`` is
    ``symbols[r, :, c]``, lanes in (row, C) order: cachegen's layout, no transpose)."""
    rows, steps, channels = symbols.shape
    lanes = rows * channels
    if lanes % group:
        raise RansError(f"{lanes} lanes do not split into streams of {group}")
    f = np.ascontiguousarray(freqs, dtype=np.int64)
    if ctx.size and (ctx.min() < 0 or ctx.max() >= f.shape[0]):
        raise RansError("a lane's table is outside the tables")
    states = np.empty(lanes // group, np.int32)
    counts = np.empty(lanes // group, np.int32)
    words = np.empty(lanes * steps, np.int32)
    kernels = _compiled()
    mul, add = _reciprocals(f)
    n = kernels.encode(np.ascontiguousarray(symbols, dtype=np.int32), ctx.astype(np.int64), mul.reshape(-1),
                       add.reshape(-1), f.shape[1], group, states, counts, words)
    if n < 0:
        raise RansError("a symbol is outside the tables' alphabet or has zero frequency in its table")
    return states, counts, words[:n]


def quantize(v: np.ndarray, mu: np.ndarray, inv: np.ndarray, qmax: int,
             allow_delta: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``v`` ``[rows, T, C]``, and per lane ``[rows, C]`` its mean and the step's reciprocal ->
    ``(symbols int32 [rows, T, C], delta mode bool [lanes], table per lane int64, histogram
    int64 [2 * rows, 2 * qmax + 1])``; lanes are (row, C) in order."""
    rows, steps, channels = v.shape
    sym = np.empty((rows, steps, channels), np.int32)
    mode = np.empty(rows * channels, np.bool_)
    ctx = np.empty(rows * channels, np.int64)
    hist = np.zeros(2 * rows * (2 * qmax + 1), np.int64)
    f32 = np.float32
    _compiled().quantize(np.ascontiguousarray(v, dtype=f32), np.ascontiguousarray(mu, dtype=f32),
                         np.ascontiguousarray(inv, dtype=f32), f32(qmax), allow_delta and steps > 1,
                         sym, mode, ctx, hist)
    return sym, mode, ctx, hist.reshape(2 * rows, 2 * qmax + 1)
