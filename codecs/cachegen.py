"""CacheGen-style codec: per-channel scaled quantization (finer in early layers), optional
closed-loop delta along tokens, and rANS entropy coding with tables built from the chunk.

Payload = header | frame index | frames. A frame is a group of layers with its own tables, lane
states and word stream, so a reader decodes the first layers while later frames still arrive.

Per channel (layer, plane, head*head_size) the encoder stores a mean and a step (fp16). The step
is ``alpha * std`` (alpha from the quality level, halved in the first quarter of the layers,
where errors propagate through the most later layers), raised if needed so that no symbol
exceeds +-127: quantization never clips, the error per value is at most step/2. A channel uses
delta coding (each token predicted by the previous reconstructed one) where that gives smaller
symbols; decode is then a cumulative sum. Symbols are entropy coded with one frequency table
per (layer, plane, coding mode): the per-channel step already normalises each channel, so
channels of one layer share a distribution, and per-channel tables (255 entries for 256 tokens)
would cost more bytes than they save.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

import torch

from kvstore.codecs import rans
from kvstore.codecs.base import Codec, CodecError, register_codec
from kvstore.codecs.layout import ChunkLayout, Reader, seal, tensor_to_bytes, unseal

_MAGIC = b"KCG\x04"
_FRAME = struct.Struct("<HHHBBI")  # layer_start, layer_count, reserved, qmax, flags, nwords
_INDEX = struct.Struct("<I")
QMAX = 127

LEVELS: dict[str, float] = {"high": 0.02, "medium": 0.05, "low": 0.12, "tiny": 0.25}
"""Quality level -> quantization step as a fraction of each channel's standard deviation."""
DEFAULT_LEVEL = "medium"


@dataclass(frozen=True)
class CacheGenOptions:
    level: str = DEFAULT_LEVEL
    early_fraction: float = 0.25   # the first quarter of the layers...
    early_factor: float = 0.5      # ...gets half the step (more levels)
    delta: bool = True             # allow closed-loop delta coding along tokens per channel
    frame_layers: int = 8          # layers per independently decodable frame


class CacheGenCodec(Codec):
    name = "cachegen"
    lossless = False

    def __init__(self, options: CacheGenOptions | None = None) -> None:
        self.options = options or CacheGenOptions()
        if self.options.level not in LEVELS:
            raise CodecError(f"unknown cachegen level {self.options.level!r}; levels: {', '.join(LEVELS)}")

    def configured(self, option: str) -> "CacheGenCodec":
        """``cachegen:low`` style names: the option is the quality level."""
        return CacheGenCodec(CacheGenOptions(level=option))

    # ---- encode --------------------------------------------------------------------------

    def encode(self, kv: torch.Tensor, level: str | None = None) -> bytes:
        opts = self.options if level is None else CacheGenOptions(**{**self.options.__dict__, "level": level})
        if opts.level not in LEVELS:
            raise CodecError(f"unknown cachegen level {opts.level!r}; levels: {', '.join(LEVELS)}")
        lay = ChunkLayout.of(kv)
        x = kv.detach().float().reshape(lay.layers, lay.planes, lay.tokens, lay.channels)
        if not torch.isfinite(x).all():
            raise CodecError("cachegen cannot encode non-finite KV values")
        frames = [self._encode_frame(x, start, min(start + opts.frame_layers, lay.layers), opts)
                  for start in range(0, lay.layers, opts.frame_layers)]
        index = b"".join(_INDEX.pack(len(f)) for f in frames)
        return seal(lay.pack(_MAGIC, 1) + struct.pack("<H", len(frames)) + index + b"".join(frames))

    def _encode_frame(self, x: torch.Tensor, start: int, stop: int, opts: CacheGenOptions) -> bytes:
        layers, planes, tokens, channels = x.shape
        xf = x[start:stop]                                     # [l, P, T, C]
        alpha = torch.full((stop - start, 1, 1), LEVELS[opts.level])
        early = torch.arange(start, stop) < max(1, round(opts.early_fraction * layers))
        alpha[early] *= opts.early_factor
        mu = xf.mean(dim=2).half().float()                     # [l, P, C]
        dev = xf - mu[:, :, None]
        sd = xf.std(dim=2, correction=0) if tokens > 1 else torch.zeros_like(mu)
        peak = dev.abs().amax(dim=2)
        step = torch.maximum(alpha * sd, peak / (QMAX - 0.5))
        step = torch.where(step > 0, step, torch.ones_like(step))
        step = step.clamp(6.2e-5, 65000).half().float()        # fp16-exact, never zero
        step = torch.where((peak / step) > QMAX - 0.5, (peak / (QMAX - 0.5)).half().float(), step)
        q = torch.round(dev / step[:, :, None]).clamp_(-QMAX, QMAX)
        mode = torch.zeros_like(mu, dtype=torch.bool)
        if opts.delta and tokens > 1:
            qd = _delta_quantize(xf, mu, step)
            mode = qd.abs().sum(dim=2) < q.abs().sum(dim=2)
            q = torch.where(mode[:, :, None], qd, q)
        sym = (q + QMAX).to(torch.int64).permute(0, 1, 3, 2).reshape(-1, tokens)   # lanes = (l, P, C)
        ctx = _contexts(stop - start, planes, channels, mode.reshape(-1))
        hist = torch.zeros(2 * (stop - start) * planes, 2 * QMAX + 1, dtype=torch.int64)
        hist.index_put_((ctx[:, None].expand(-1, tokens).reshape(-1), sym.reshape(-1)),
                        torch.ones(sym.numel(), dtype=torch.int64), accumulate=True)
        freqs = rans.quantize_freqs(hist)
        states, counts, words = rans.encode(sym, ctx, freqs)
        head = _FRAME.pack(start, stop - start, 0, QMAX, int(opts.delta), words.numel())
        return b"".join([head, tensor_to_bytes(mu.half()), tensor_to_bytes(step.half()),
                         tensor_to_bytes(_pack_bits(mode.reshape(-1))), _pack_tables(freqs),
                         tensor_to_bytes(states), tensor_to_bytes(counts.to(torch.int16)),
                         tensor_to_bytes(words.to(torch.int16))])

    # ---- decode --------------------------------------------------------------------------

    def frames(self, payload: memoryview) -> tuple[ChunkLayout, list[memoryview]]:
        """The layout and the independently decodable frames (layer groups, in order)."""
        buf = unseal(payload)
        lay, off = ChunkLayout.unpack(buf, _MAGIC, 1)
        r = Reader(buf, off)
        (count,) = r.struct(struct.Struct("<H"))
        if count == 0 or count > lay.layers:
            raise CodecError(f"corrupt frame count {count} for {lay.layers} layers")
        sizes = [r.struct(_INDEX)[0] for _ in range(count)]
        frames = [r.take(n) for n in sizes]
        r.done()
        return lay, frames

    def decode_frame(self, lay: ChunkLayout, frame: memoryview,
                     out: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """Decode one frame: ``(layer_start, kv)`` with kv ``[n, planes, tokens, heads, head_size]``
        (float32, or written into ``out`` = the caller's view of those layers in its dtype)."""
        r = Reader(frame)
        start, count, _res, qmax, _flags, nwords = r.struct(_FRAME)
        if count == 0 or start + count > lay.layers or qmax != QMAX:
            raise CodecError(f"corrupt frame header (layers {start}+{count} of {lay.layers}, qmax {qmax})")
        P, T, C = lay.planes, lay.tokens, lay.channels
        mu = r.tensor(torch.float16, count * P * C).float()
        step = r.tensor(torch.float16, count * P * C).float()
        mode = _unpack_bits(r.tensor(torch.uint8, (count * P * C + 7) // 8), count * P * C)
        freqs = _unpack_tables(r, 2 * count * P, 2 * QMAX + 1)
        states = r.tensor(torch.int32, count * P * C)
        counts = r.tensor(torch.int16, count * P * C).to(torch.int32) & 0xFFFF
        words = r.tensor(torch.int16, nwords).to(torch.int32) & 0xFFFF
        r.done()
        if not (torch.isfinite(mu).all() and torch.isfinite(step).all()):
            raise CodecError("corrupt frame: non-finite quantization parameters")
        ctx = _contexts(count, P, C, mode)
        try:
            sym = rans.decode(states, counts, words, ctx, freqs, T)  # [T, lanes]
        except rans.RansError as exc:
            raise CodecError(f"entropy-coded stream is corrupt: {exc}") from exc
        # Dequantize in the decoder's step-major layout: a few passes, no transposes until the end.
        q = sym.float().sub_(QMAX)
        # Running sums on delta lanes only, row by row: torch.cumsum along a strided axis plus a
        # select costs ~10x more than these T contiguous multiply-adds.
        delta = mode.float()
        for t in range(1, T):
            q[t].addcmul_(q[t - 1], delta)
        x = torch.addcmul(mu, q, step)                              # [T, (l, P, C)]
        x = x.view(T, count, P, lay.heads, lay.head_size).permute(1, 2, 0, 3, 4)
        if out is None:
            return start, x.contiguous()
        if tuple(out.shape) != tuple(x.shape):
            raise CodecError(f"frame decodes to {tuple(x.shape)}, destination is {tuple(out.shape)}")
        out.copy_(x)
        return start, out

    def iter_decode(self, payload: memoryview) -> Iterator[tuple[int, torch.Tensor]]:
        lay, frames = self.frames(payload)
        for frame in frames:
            yield self.decode_frame(lay, frame)

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        lay, frames = self.frames(payload)
        lay.check(shape, dtype)
        out = torch.empty(lay.layers, lay.planes, lay.tokens, lay.heads, lay.head_size, dtype=dtype)
        covered = 0
        for frame in frames:
            r = Reader(frame)
            start, count = r.struct(_FRAME)[:2]
            if start != covered or start + count > lay.layers:
                raise CodecError(f"frames out of order: layers {start}+{count} after {covered}")
            self.decode_frame(lay, frame, out[start:start + count])
            covered = start + count
        if covered != lay.layers:
            raise CodecError(f"frames cover {covered} of {lay.layers} layers")
        return out.reshape(shape)


def _pack_tables(freqs: torch.Tensor) -> bytes:
    """Each table as (first, last) used symbol and the frequencies between: tables are narrow
    (most mass within a few dozen symbols of zero), and full 255-entry rows would dominate
    small chunks."""
    used = freqs > 0
    first = used.int().argmax(dim=1)
    last = freqs.shape[1] - 1 - used.flip(1).int().argmax(dim=1)
    ranges = torch.stack([first, last], dim=1).to(torch.uint8)
    body = torch.cat([freqs[i, int(a):int(b) + 1] for i, (a, b) in enumerate(ranges.tolist())])
    return tensor_to_bytes(ranges) + tensor_to_bytes(body.to(torch.int16))


def _unpack_tables(r: Reader, rows: int, alphabet: int) -> torch.Tensor:
    ranges = r.tensor(torch.uint8, rows, 2).to(torch.int64)
    widths = ranges[:, 1] - ranges[:, 0] + 1
    if bool((widths <= 0).any()) or bool((ranges[:, 1] >= alphabet).any()):
        raise CodecError("corrupt frequency table ranges")
    body = r.tensor(torch.int16, int(widths.sum())).to(torch.int32)
    freqs = torch.zeros(rows, alphabet, dtype=torch.int32)
    offset = 0
    for i, (a, width) in enumerate(zip(ranges[:, 0].tolist(), widths.tolist())):
        freqs[i, a:a + width] = body[offset:offset + width]
        offset += width
    return freqs


def _contexts(layers: int, planes: int, channels: int, mode: torch.Tensor) -> torch.Tensor:
    """Table index per lane: (layer, plane, coding mode). Delta and direct symbols of one layer
    have different distributions (deltas are peakier), so they get separate tables."""
    return torch.arange(layers * planes).repeat_interleave(channels) * 2 + mode.to(torch.int64)


def _delta_quantize(x: torch.Tensor, mu: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Closed-loop delta symbols: token t is coded against the reconstruction of token t-1, so
    errors never accumulate (decode is mu + step * cumsum(q), exactly what the encoder tracks)."""
    tokens = x.shape[2]
    q = torch.empty_like(x)
    total = torch.zeros_like(mu)
    for t in range(tokens):
        qt = torch.round((x[:, :, t] - mu) / step - total).clamp_(-QMAX, QMAX)
        q[:, :, t] = qt
        total += qt
    return q


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    pad = (-bits.numel()) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (b * weights).sum(dim=1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return ((packed[:, None] & weights) != 0).reshape(-1)[:n]


register_codec(CacheGenCodec())
