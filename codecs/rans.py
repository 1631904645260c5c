"""Vectorized rANS entropy coding in torch: many independent lanes advance in lock-step.

Each lane is one sequence of symbols coded with one of a few frequency tables (its context). A
step codes one symbol in every lane with a handful of tensor ops, so Python runs once per step,
not once per symbol, and the same code runs on CUDA tensors. The lanes share one word stream,
interleaved the way the decoder consumes it (step by step, lanes in order), so no per-lane
lengths are stored; only each lane's final state.

State x lives in [2^15, 2^31) with 16-bit renormalisation and 12-bit frequencies, so every
intermediate fits a signed 32-bit integer.
"""

from __future__ import annotations

import torch

SCALE_BITS = 12
M = 1 << SCALE_BITS
RANS_L = 1 << 15
_XMAX_SHIFT = (15 - SCALE_BITS) + 16  # x_max = ((RANS_L >> SCALE_BITS) << 16) * freq


class RansError(ValueError):
    """Streams that cannot be decoded (wrong length, impossible states or tables)."""


def quantize_freqs(counts: torch.Tensor) -> torch.Tensor:
    """Integer frequencies summing to M per row, every seen symbol >= 1 (rows: contexts)."""
    counts = counts.to(torch.float64)
    total = counts.sum(dim=1, keepdim=True).clamp_min(1)
    freqs = torch.floor(counts * (M / total)).to(torch.int64)
    freqs = torch.where((counts > 0) & (freqs == 0), torch.ones_like(freqs), freqs)
    # Give the rounding remainder to (or take the excess from) each row's most frequent symbol.
    diff = M - freqs.sum(dim=1)
    top = counts.argmax(dim=1)
    freqs[torch.arange(len(freqs)), top] += diff
    bad = freqs[torch.arange(len(freqs)), top] <= 0
    if bool(bad.any()):  # pathological: many singletons; fall back to a flat table on those rows
        flat = torch.full_like(freqs[bad], M // freqs.shape[1])
        flat[:, 0] += M - flat.sum(dim=1)
        freqs[bad] = flat
    return freqs.to(torch.int32)


def streams_of(symbols: torch.Tensor, ctx: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``group`` lanes in a row make one stream (one state, one word count: side data a lane
    would otherwise pay alone): symbols ``[lanes, steps]`` -> ``[streams, group * steps]`` and
    the table of every symbol, the same shape."""
    lanes, steps = symbols.shape
    if lanes % group:
        raise RansError(f"{lanes} lanes do not split into streams of {group}")
    ctx_s = ctx.to(torch.int64).view(lanes // group, group).repeat_interleave(steps, dim=1)
    return symbols.reshape(lanes // group, group * steps), ctx_s


def encode(symbols: torch.Tensor, ctx: torch.Tensor, freqs: torch.Tensor,
           group: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode ``symbols`` ``[lanes, steps]`` (ints in [0, A)); lane i uses table ``freqs[ctx[i]]``;
    ``group`` lanes in a row are one stream.

    Returns (final states int32 ``[streams]``, words per stream int32 ``[streams]``, words ``[n]``
    as int32 holding uint16 values, stream-major: stream 0's words in decode order, then 1's...)."""
    sym, ctx_s = streams_of(symbols, ctx, group)
    lanes, steps = sym.shape
    freqs = freqs.to(torch.int64)
    cum = torch.cumsum(freqs, dim=1) - freqs
    sym = sym.to(torch.int64)
    f_all = freqs[ctx_s, sym]          # [streams, steps]
    if bool((f_all <= 0).any()):
        raise RansError("a symbol has zero frequency in its table")
    c_all = cum[ctx_s, sym]
    x = torch.full((lanes,), RANS_L, dtype=torch.int64, device=symbols.device)
    emitted = torch.empty((steps, lanes), dtype=torch.int32, device=symbols.device)
    mask = torch.empty((steps, lanes), dtype=torch.bool, device=symbols.device)
    for t in range(steps - 1, -1, -1):
        f = f_all[:, t]
        m = x >= (f << _XMAX_SHIFT)
        mask[t] = m
        emitted[t] = (x & 0xFFFF).to(torch.int32)
        x = torch.where(m, x >> 16, x)
        x = torch.div(x, f, rounding_mode="floor") * M + torch.remainder(x, f) + c_all[:, t]
    # Word emitted before coding step t is read right after decoding step t: per lane, in t order.
    mask_t = mask.t()
    words = emitted.t()[mask_t]
    return x.to(torch.int32), mask_t.sum(dim=1, dtype=torch.int32), words


def decode_tables(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (context, slot): int32 ``freq << 16 | (slot - cum)`` (one gather gives both) and the
    int16 symbol."""
    n_ctx, alphabet = freqs.shape
    f = freqs.to(torch.int64)
    if bool((f < 0).any()) or bool((f.sum(dim=1) != M).any()):
        raise RansError("frequency table rows must be non-negative and sum to 4096")
    cum = torch.cumsum(f, dim=1) - f
    sym = torch.repeat_interleave(torch.arange(alphabet, device=freqs.device).repeat(n_ctx), f.reshape(-1))
    slot = torch.arange(M, device=freqs.device).repeat(n_ctx)
    ctx = torch.arange(n_ctx, device=freqs.device).repeat_interleave(M)
    return ((f[ctx, sym] << 16) | (slot - cum[ctx, sym])).to(torch.int32), sym.to(torch.int16)


def check_stream(states: torch.Tensor, counts: torch.Tensor, words: torch.Tensor) -> None:
    """What every decoder checks before its loop, so that no corrupt count or state can make it
    read outside the word stream."""
    lanes = states.numel()
    if counts.numel() != lanes or bool((counts < 0).any()):
        raise RansError("lane word counts do not match the lanes")
    nwords = int(counts.sum()) if lanes else 0
    if nwords != words.numel():
        raise RansError(f"lanes claim {nwords} words, the stream has {words.numel()}")
    if bool((states < RANS_L).any()):
        raise RansError("lane state out of range")


def decode(states: torch.Tensor, counts: torch.Tensor, words: torch.Tensor, ctx: torch.Tensor,
           freqs: torch.Tensor, steps: int, group: int = 1) -> torch.Tensor:
    """Inverse of :func:`encode`: symbols as int16, laid out ``[steps, lanes]`` (step-major is
    what the loop writes and what dequantization wants).

    Everything is int32 (states stay below 2^31), buffers are preallocated and every op writes
    in place: the loop is memory-bound, and fresh tensors per step would be page-faulted in."""
    check_stream(states, counts, words)
    lanes = states.numel()  # streams, from here on
    if ctx.numel() != lanes * group:
        raise RansError(f"{ctx.numel()} lanes for {lanes} streams of {group}")
    tokens, steps = steps, steps * group
    nwords = words.numel()
    fb_table, sym_table = decode_tables(freqs)
    # The table base of every (step, stream): lane g of a stream covers steps g*tokens onwards.
    base = (ctx.to(torch.int32) * M).view(lanes, group).t().repeat_interleave(tokens, dim=0).contiguous()
    x = states.to(torch.int32).clone()
    w = torch.cat([words.to(torch.int32), words.new_zeros(1, dtype=torch.int32)])  # pad: reads stay in range
    end = torch.cumsum(counts.to(torch.int32), dim=0, dtype=torch.int32)
    ptr = end - counts.to(torch.int32)
    slots = torch.empty((steps, lanes), dtype=torch.int32, device=states.device)
    f = torch.empty_like(x)
    b = torch.empty_like(x)
    wv = torch.empty_like(x)
    sh = torch.empty_like(x)
    m = torch.empty(lanes, dtype=torch.bool, device=x.device)
    for t in range(steps):
        idx = slots[t]  # the slot index doubles as the symbol's address: looked up after the loop
        torch.bitwise_and(x, M - 1, out=idx)
        idx += base[t]
        torch.index_select(fb_table, 0, idx, out=b)
        torch.bitwise_right_shift(b, 16, out=f)
        x >>= SCALE_BITS
        x *= f
        x += b.bitwise_and_(0xFFFF)
        torch.lt(x, RANS_L, out=m)
        torch.index_select(w, 0, ptr.clamp_(max=nwords), out=wv)
        # x = m ? (x << 16 | w) : x, branch-free: shift by 16*m, and zero w where not refilling.
        sh.copy_(m)
        wv *= sh
        sh <<= 4
        x <<= sh
        x |= wv
        ptr += m
    if not torch.equal(ptr, end):
        raise RansError("lanes did not consume exactly their words (corrupt stream)")
    if bool((x != RANS_L).any()):
        raise RansError("stream does not decode back to the initial state (corrupt)")
    sym = torch.index_select(sym_table, 0, slots.view(-1))
    # [group * tokens, streams] -> [tokens, lanes] with lane = stream * group + g
    return sym.view(group, tokens, lanes).permute(1, 2, 0).reshape(tokens, lanes * group)
