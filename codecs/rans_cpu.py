"""CPU kernels for cachegen, compiled with numba: the rANS streams of :mod:`kvstore.codecs.rans`
and the quantization and statistics before them.

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
                                           quantize=jit(_quantize), tables=jit(_decode_tables),
                                           reciprocals=jit(_reciprocals), sums=jit(_sums),
                                           spreads=jit(_spreads))
    return _kernels


def _compiled() -> SimpleNamespace:
    kernels = _load()
    if kernels is None:
        raise RuntimeError("the compiled rANS coder is unavailable: check available() first")
    return kernels


def _decode_dequant(states, counts, words, ctx, table, mu, step, delta, qmax, steps,
                    channels, group, out):  # pragma: no cover - compiled
    """Decode every stream (``group`` lanes in a row) and write ``mu + step * q`` (q summed
    along tokens on delta lanes) to ``out[lane // channels, t, lane % channels]``. Returns 0,
    or -1 for a corrupt stream.

    Two streams advance side by side: one stream's symbols form a chain (each state comes from
    the one before), so a lone stream leaves the core waiting on each table load; two chains
    interleaved keep it busy (1.5x measured). An odd stream out is paired with itself: both
    chains decode it alike and write the same values. One table load per symbol (frequency,
    offset and symbol packed by ``decode_tables``), no branch for renormalization and none for
    the delta lanes' running sum (a multiply by 1 or 0): 1.3x together, measured on SmolLM2
    chunks."""
    streams = states.shape[0]
    last = words.shape[0] - 1  # words is never empty (decode_dequant pads an empty one)
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
            ma, sa = mu[la], step[la]
            mb, sb = mu[lb], step[lb]
            keepa = np.float32(1.0) if delta[la] else np.float32(0.0)  # delta lanes sum their q
            keepb = np.float32(1.0) if delta[lb] else np.float32(0.0)
            acca = np.float32(0.0)
            accb = np.float32(0.0)
            for t in range(steps):
                ea_ = np.int64(table[basea + (xa & (M - 1))])
                eb_ = np.int64(table[baseb + (xb & (M - 1))])
                xa = ((ea_ >> 20) + 1) * (xa >> SCALE_BITS) + ((ea_ >> 8) & (M - 1))
                xb = ((eb_ >> 20) + 1) * (xb >> SCALE_BITS) + ((eb_ >> 8) & (M - 1))
                qa = np.float32((ea_ & 0xFF) - qmax)
                qb = np.float32((eb_ & 0xFF) - qmax)
                acca = acca * keepa + qa
                accb = accb * keepb + qb
                out[ra, t, ca] = ma + acca * sa
                out[rb, t, cb] = mb + accb * sb
                # Renormalization without branches (a word is read every few symbols, at
                # random: the branch mispredicted often). The read is clamped to the array; a
                # stream that reads past its own words fails the check after its last lane.
                na = xa < RANS_L
                nb = xb < RANS_L
                wa = np.int64(words[min(pa, last)]) & 0xFFFF
                wb = np.int64(words[min(pb, last)]) & 0xFFFF
                xa = ((xa << 16) | wa) if na else xa
                xb = ((xb << 16) | wb) if nb else xb
                pa += np.int64(na)
                pb += np.int64(nb)
        if pa != ea or xa != RANS_L or pb != eb or xb != RANS_L:
            return -1
    return 0


def _encode(symbols, ctx, mul, add, group, states, counts, words):  # pragma: no cover - compiled
    """rANS-encode each stream (``group`` lanes in a row; lane ``l`` holds ``symbols[l]``, uint8)
    backwards; words land stream-major in decode order. Returns the number of words written,
    or -1 when a symbol has no frequency in its table.

    ``x // f * M + x % f + cum`` is computed as ``x + bias + q * cmpl`` with ``q = x // f`` from a
    multiply by a precomputed reciprocal (exact for states below 2**31, which rANS keeps them):
    an integer division per symbol was half of the encoder's time. ``mul`` and ``add`` (flat,
    ``table * 256 + symbol``) pack what a symbol needs into two loads (``_reciprocals``), and
    two streams are coded side by side so that their dependency chains overlap (as in the
    decoder). Each lane's symbols are contiguous (the quantizer writes them lane by lane) and
    bytes: the strided int32 reads before cost a fifth of the loop."""
    lanes, steps = symbols.shape
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
            at_a = la * steps
            at_b = lb * steps
            ta = ctx[la] * 256
            tb = ctx[lb] * 256
            for back in range(steps):
                t = steps - 1 - back
                sa = np.int64(flat[at_a + t])  # uint8: inside the padded tables
                sb = np.int64(flat[at_b + t])
                ma = mul[ta + sa]
                mb = mul[tb + sb]
                aa = add[ta + sa]
                ab = add[tb + sb]
                if (aa == 0) | (ab == 0):  # no frequency: a symbol its table cannot code
                    return -1
                # Renormalization without branches (a word is written every few symbols, at
                # random: a branch there mispredicts often): store always, advance if needed.
                fa = np.uint64(xa >= (aa >> np.uint64(32)))
                fb = np.uint64(xb >= (ab >> np.uint64(32)))
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


def _reciprocals(freqs, mul, add):  # pragma: no cover - compiled
    """Per (table, symbol), what the encoder needs to turn its division by the frequency into a
    multiply (Alverson's method, as in ryg_rans: exact for dividends below 2**31), in two
    words of the ``[tables, 256]`` arrays (padded: a uint8 symbol never indexes past its row):
    ``mul`` = reciprocal | shift << 32, ``add`` = bias | complement << 16 | the state limit
    past which a word is shed first << 32. A zero frequency leaves ``add`` 0, which the
    encoder refuses. Compiled: the same dozen array operations in numpy cost a millisecond per
    chunk."""
    rows, alphabet = freqs.shape
    mul[:, :] = 0
    add[:, :] = 0
    for r in range(rows):
        cum = np.uint64(0)
        for a in range(alphabet):
            f = np.uint64(freqs[r, a])
            if f == 0:
                continue
            if f == 1:
                rcp = np.uint64(0xFFFFFFFF)
                rshift = np.uint64(0)
                bias = cum + np.uint64(M - 1)
                cmpl = np.uint64(M - 1)
            else:
                shift = np.uint64(0)
                while (np.uint64(1) << shift) < f:
                    shift += np.uint64(1)
                rcp = ((np.uint64(1) << (shift + np.uint64(31))) + f - np.uint64(1)) // f
                rshift = shift - np.uint64(1)
                bias = cum
                cmpl = np.uint64(M) - f
            mul[r, a] = rcp | (rshift << np.uint64(32))
            add[r, a] = bias | (cmpl << np.uint64(16)) | ((f << np.uint64(_XMAX_SHIFT)) << np.uint64(32))
            cum += f


def _sums(v, skip, sums):  # pragma: no cover - compiled
    """Per lane ``[rows, C]``, the sum of its values over the tokens not skipped, in float64:
    exact for float32 values of any sane range, so the order of the additions (here, or a
    tensor library's) does not change it."""
    rows, steps, channels = v.shape
    for r in range(rows):
        for c in range(channels):
            sums[r, c] = 0
        for t in range(steps):
            if skip[t]:
                continue
            for c in range(channels):
                sums[r, c] += np.float64(v[r, t, c])


def _spreads(v, skip, mu, peak, squares):  # pragma: no cover - compiled
    """Per lane, the largest ``|v - mu|`` (float32) and the sum of ``(v - mu) ** 2`` (float64:
    summed in any order, it rounds to the same float32 but for ties) over the tokens not
    skipped, in one pass (as tensor operations: a deviation tensor and four passes over it).
    A NaN makes the lane's sum of squares NaN (``max`` would drop it)."""
    rows, steps, channels = v.shape
    for r in range(rows):
        for c in range(channels):
            peak[r, c] = 0
            squares[r, c] = 0
        for t in range(steps):
            if skip[t]:
                continue
            for c in range(channels):
                d = v[r, t, c] - mu[r, c]
                peak[r, c] = max(peak[r, c], abs(d))
                squares[r, c] += np.float64(d) * np.float64(d)


def _quantize(v, skip, mu, inv, qmax, allow_delta, sym, mode, ctx, hist):  # pragma: no cover - compiled
    """Cachegen's symbols: ``round((v - mu) * inv)`` direct (0 on skipped tokens: as if they
    held the mean), closed-loop delta ones (as ``cachegen._delta_quantize``), the lane's mode
    (delta where its symbols are smaller in sum and none clamps), the chosen symbols offset by
    ``qmax``, the lane's table (``row * 2 + mode``) and the tables' histograms. Per row one pass
    over its ``[T, C]`` values with the channels innermost (so the compiler vectorizes across
    lanes) keeps both candidates in small buffers, and a second pass over those picks, instead
    of the dozen passes over every value the same steps take as tensor operations."""
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
            held = skip[t]
            for c in range(channels):
                # Selected, not multiplied by 0: a skipped token's deviation may be inf, and
                # inf * 0 is a NaN that no clamp below stops.
                x = np.float32(0.0) if held else (v[r, t, c] - mu[r, c]) * inv[r, c]
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
        for c in range(channels):  # lane by lane: the coder reads each lane's symbols in a row
            cand = cand_d if use[c] else cand_q
            at = ctx[r * channels + c] * alphabet + np.int32(qmax)
            for t in range(steps):
                k = np.int32(cand[t, c])
                sym[r, c, t] = np.uint8(k + np.int32(qmax))
                hist[at + k] += 1


def _decode_tables(freqs, table):  # pragma: no cover - compiled
    """The packed decode table (see ``decode_tables``) in one loop (``rans.decode_tables``, the
    tensor version for the torch coder, is ~15 ops over every slot of every table, a fifth of a
    frame's decode). Returns False for rows that are negative or do not sum to M."""
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
                table[slot] = np.uint32(((f - 1) << 20) | (k << 8) | a)
                slot += 1
    return True


def decode_tables(freqs: np.ndarray) -> np.ndarray:
    """Every table slot's ``(frequency - 1) << 20 | offset in the symbol's range << 8 |
    symbol`` (uint32): one load per decoded symbol. Rows must be non-negative, sum to M, and
    have at most 256 symbols."""
    rows, alphabet = freqs.shape
    if alphabet > 256:
        raise RansError(f"the compiled decoder takes alphabets of at most 256 symbols, not {alphabet}")
    table = np.empty(rows * M, np.uint32)
    if not _compiled().tables(np.ascontiguousarray(freqs, dtype=np.int32), table):
        raise RansError("frequency table rows must be non-negative and sum to 4096")
    return table


def decode_dequant(states: np.ndarray, counts: np.ndarray, words: np.ndarray, ctx: np.ndarray,
                   table: np.ndarray, mu: np.ndarray, step: np.ndarray,
                   delta: np.ndarray, qmax: int, steps: int, channels: int, out: np.ndarray,
                   group: int = 1) -> bool:
    """False when the stream is corrupt (``out`` is then partly written garbage: discard it)."""
    kernels = _compiled()
    if words.size == 0:  # the decoder reads a word before it knows whether it needs it
        words = np.zeros(1, words.dtype)
    return kernels.decode(states, counts, words, ctx, table, mu, step, delta,
                          qmax, steps, channels, group, out) == 0


def encode(symbols: np.ndarray, ctx: np.ndarray, freqs: np.ndarray,
           group: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`kvstore.codecs.rans.encode` for symbols ``[lanes, steps]`` (uint8 as cachegen's
    quantizer writes them; other integer types are range-checked and converted)."""
    lanes, steps = symbols.shape
    if lanes % group:
        raise RansError(f"{lanes} lanes do not split into streams of {group}")
    f = np.ascontiguousarray(freqs, dtype=np.int64)
    if ctx.size and (ctx.min() < 0 or ctx.max() >= f.shape[0]):
        raise RansError("a lane's table is outside the tables")
    if f.shape[1] > 256:
        raise RansError(f"the compiled coder takes alphabets of at most 256 symbols, not {f.shape[1]}")
    if f.size and (f.min() < 0 or f.max() > M):
        raise RansError(f"frequencies must lie in 0..{M}")
    if symbols.dtype != np.uint8:  # cachegen's quantizer writes uint8; others are checked here
        if symbols.size and (symbols.min() < 0 or symbols.max() >= f.shape[1]):
            raise RansError("a symbol is outside the tables' alphabet")
        symbols = symbols.astype(np.uint8)
    states = np.empty(lanes // group, np.int32)
    counts = np.empty(lanes // group, np.int32)
    words = np.empty(lanes * steps, np.int32)
    kernels = _compiled()
    mul = np.empty((f.shape[0], 256), np.uint64)
    add = np.empty((f.shape[0], 256), np.uint64)
    kernels.reciprocals(f, mul, add)
    n = kernels.encode(np.ascontiguousarray(symbols), ctx.astype(np.int64), mul.reshape(-1),
                       add.reshape(-1), group, states, counts, words)
    if n < 0:
        raise RansError("a symbol is outside the tables' alphabet or has zero frequency in its table")
    return states, counts, words[:n]


def sums(v: np.ndarray, skip: np.ndarray) -> np.ndarray:
    """``v`` float32 ``[rows, T, C]``, ``skip`` bool ``[T]`` -> float64 ``[rows, C]``: each
    lane's sum over the tokens not skipped."""
    out = np.empty((v.shape[0], v.shape[2]), np.float64)
    _compiled().sums(np.ascontiguousarray(v, dtype=np.float32), skip, out)
    return out


def spreads(v: np.ndarray, skip: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per lane ``[rows, C]``: the largest deviation from ``mu`` and the sum of squared
    deviations (float64), over the tokens not skipped."""
    peak = np.empty(mu.shape, np.float32)
    squares = np.empty(mu.shape, np.float64)
    _compiled().spreads(np.ascontiguousarray(v, dtype=np.float32), skip,
                        np.ascontiguousarray(mu, dtype=np.float32), peak, squares)
    return peak, squares


def quantize(v: np.ndarray, skip: np.ndarray, mu: np.ndarray, inv: np.ndarray, qmax: int,
             allow_delta: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``v`` ``[rows, T, C]``, tokens to treat as the mean ``skip`` ``[T]``, and per lane
    ``[rows, C]`` its mean and the step's reciprocal -> ``(symbols uint8 [lanes, T], delta
    mode bool [lanes], table per lane int64, histogram int64 [2 * rows, 2 * qmax + 1])``;
    lanes are (row, C) in order."""
    rows, steps, channels = v.shape
    if 2 * qmax + 1 > 256:
        raise RansError(f"symbols are bytes: qmax {qmax} is over 127")
    sym = np.empty((rows, channels, steps), np.uint8)
    mode = np.empty(rows * channels, np.bool_)
    ctx = np.empty(rows * channels, np.int64)
    hist = np.zeros(2 * rows * (2 * qmax + 1), np.int64)
    f32 = np.float32
    _compiled().quantize(np.ascontiguousarray(v, dtype=f32), skip, np.ascontiguousarray(mu, dtype=f32),
                         np.ascontiguousarray(inv, dtype=f32), f32(qmax), allow_delta and steps > 1,
                         sym, mode, ctx, hist)
    return sym.reshape(rows * channels, steps), mode, ctx, hist.reshape(2 * rows, 2 * qmax + 1)
