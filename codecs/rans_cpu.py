"""CPU kernels for the rANS streams of :mod:`kvstore.codecs.rans`, compiled with numba.

Why a second implementation: the torch coder advances all lanes one step per handful of tensor
ops, which is what a GPU wants, but on a CPU each op is a pass over memory; a compiled scalar
loop per lane keeps the lane's state in a register and decodes 2-3x faster, and fuses the
dequantization (mean, step, running sum for delta lanes) into the same pass. The bitstreams are
the same: tests check both coders against each other, and the torch one remains the path for
CUDA tensors and for machines where numba does not import.

Corrupt input must never read out of bounds: callers run ``rans.check_stream`` and
``rans.decode_tables`` first (as ``rans.decode`` does), contexts come from the frame layout, and
the loops here check every word read against the lane's own range.
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
                                           delta=jit(_delta_symbols))
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
    or -1 for a corrupt stream."""
    streams = states.shape[0]
    ptr = 0
    for s in range(streams):
        x = np.int64(states[s])
        end = ptr + np.int64(counts[s])
        for lane in range(s * group, s * group + group):
            row = lane // channels
            c = lane - row * channels
            base = np.int64(ctx[lane]) * M
            m = mu[lane]
            st = step[lane]
            running = delta[lane]
            acc = np.float32(0.0)
            for t in range(steps):
                idx = base + (x & (M - 1))
                b = np.int64(fb_table[idx])
                x = (b >> 16) * (x >> SCALE_BITS) + (b & 0xFFFF)
                q = np.float32(sym_table[idx] - qmax)
                if running:
                    acc += q
                else:
                    acc = q
                out[row, t, c] = m + acc * st
                if x < RANS_L:
                    if ptr >= end:
                        return -1
                    x = (x << 16) | (np.int64(words[ptr]) & 0xFFFF)
                    ptr += 1
        if ptr != end or x != RANS_L:
            return -1
    return 0


def _encode(symbols, ctx, freqs, cum, group, states, counts, words):  # pragma: no cover - compiled
    """rANS-encode each stream (``group`` lanes of ``symbols[lane, t]`` in a row) backwards;
    words land stream-major in decode order. Returns the number of words written, or -1 when a
    symbol has no frequency in its table."""
    lanes, steps = symbols.shape
    scratch = np.empty(steps * group, np.int32)
    ptr = 0
    for s in range(lanes // group):
        x = np.int64(RANS_L)
        k = 0
        for lane in range(s * group + group - 1, s * group - 1, -1):
            c = ctx[lane]
            for t in range(steps - 1, -1, -1):
                sym = symbols[lane, t]
                f = np.int64(freqs[c, sym])
                if f <= 0:
                    return -1
                if x >= (f << _XMAX_SHIFT):
                    scratch[k] = x & 0xFFFF
                    k += 1
                    x >>= 16
                x = (x // f) * M + x % f + cum[c, sym]
        states[s] = x
        counts[s] = k
        for j in range(k):  # emitted last = read first
            words[ptr + j] = scratch[k - 1 - j]
        ptr += k
    return ptr


def _delta_symbols(dev, step, qmax, out):  # pragma: no cover - compiled
    """Closed-loop delta symbols per lane: token t against the reconstruction of token t-1."""
    lanes, steps = dev.shape
    for lane in range(lanes):
        total = np.float32(0.0)
        s = step[lane]
        for t in range(steps):
            q = np.round(dev[lane, t] / s - total)
            q = min(max(q, -qmax), qmax)
            out[lane, t] = q
            total += q


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
    """Same contract as :func:`kvstore.codecs.rans.encode` (symbols ``[lanes, steps]``)."""
    lanes, steps = symbols.shape
    if lanes % group:
        raise RansError(f"{lanes} lanes do not split into streams of {group}")
    f = np.ascontiguousarray(freqs, dtype=np.int64)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= f.shape[1]):
        raise RansError("symbol outside the tables' alphabet")
    cum = np.cumsum(f, axis=1) - f
    states = np.empty(lanes // group, np.int32)
    counts = np.empty(lanes // group, np.int32)
    words = np.empty(lanes * steps, np.int32)
    kernels = _compiled()
    n = kernels.encode(np.ascontiguousarray(symbols, dtype=np.int32), ctx.astype(np.int64), f, cum,
                       group, states, counts, words)
    if n < 0:
        raise RansError("a symbol has zero frequency in its table")
    return states, counts, words[:n]


def delta_symbols(dev: np.ndarray, step: np.ndarray, qmax: int) -> np.ndarray:
    out = np.empty(dev.shape, np.float32)
    kernels = _compiled()
    kernels.delta(np.ascontiguousarray(dev, dtype=np.float32), step.astype(np.float32), float(qmax), out)
    return out
