"""CacheGen-style codec: per-channel scaled quantization, optional closed-loop delta along
tokens, attention sinks kept exact, and rANS entropy coding with tables built from the chunk.

Payload = header | frame index | frames. A frame is a group of layers with its own tables,
stream states and word stream, so a reader decodes the first layers while later frames still
arrive.

Per channel (layer, plane, head*head_size) the encoder stores a mean and a step (fp16). The step
is the quality level's factor times a spread rule (``_spread_base``): one step for every value
channel of a layer, finer steps for wider key channels, because that is where the model feels
the error. It is raised if needed so that no symbol exceeds
+-127: quantization never clips, the error per value is at most step/2. A channel uses delta
coding (each token predicted by the previous reconstructed one) where that gives smaller
symbols; decode is then a cumulative sum. Symbols are entropy coded with one frequency table
per (layer, plane, coding mode): per-channel tables (255 entries for 256 tokens) would cost
more bytes than they save. Eight channels' symbols form one rANS stream (one state
and word count for the eight). Attention sinks (see ``sink_tokens``) are stored in fp16 beside
the stream and replaced in it by their channel's mean.

Judged by what the model does with the decoded cache (bench/codec_quality.py), never by the
error of the values alone: a flat error on the sink token alone cost 6x the KL.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from dataclasses import dataclass
from typing import Iterator

import torch

from kvstore.codecs import profiles, rans, rans_cpu
from kvstore.codecs.base import Codec, CodecError, register_codec
from kvstore.codecs.layout import ChunkLayout, Reader, seal, tensor_to_bytes, unseal

_MAGIC = b"KCG\x04"
_FRAME = struct.Struct("<HHHBBI")  # layer_start, layer_count, exact tokens, qmax, flags, nwords
MAX_EXACT = 4  # most tokens of a chunk kept exact (attention sinks are one or two)
SINK_RATIO = 0.4  # a token's V energy below this share of the median token's, in most layers: a sink
_INDEX = struct.Struct("<I")
QMAX = 127

LEVELS: dict[str, float] = {"high": 0.02, "medium": 0.05, "low": 0.12, "tiny": 0.25,
                            "balanced": 0.11, "compact": 0.27, "aggressive": 0.47, "extreme": 0.92}
"""Quality level -> the step as a fraction of the layer's typical channel spread (see
``_spread_base``; in MLA latents, of each channel's own). The named presets (``balanced``
about 3x smaller than fp16, ``compact`` 4x, ``aggressive`` 5x, ``extreme`` 7x) are chosen on
SmolLM2 by bench/codec_quality.py; the README prints what each costs the model."""
log = logging.getLogger(__name__)

DEFAULT_LEVEL = "medium"


@dataclass(frozen=True)
class CacheGenOptions:
    level: str = DEFAULT_LEVEL
    early_fraction: float = 0.25   # the first quarter of the layers...
    early_factor: float = 1.0      # ...gets this times the step (flat: measured better on 30 layers)
    delta: bool = True             # allow closed-loop delta coding along tokens per channel
    frame_layers: int = 8          # layers per independently decodable frame
    sinks: bool = True             # keep attention-sink tokens exact (fp16)
    # Step multiplier per plane (K, V): with the spread powers below, measured on SmolLM2 at
    # 3.2 bits/value, K at 0.85x of V's step is no better than 1x (KL 7.6e-3 vs 7.8e-3), at
    # 0.5x 30% worse.
    plane_factors: tuple[float, ...] = (1.0, 1.0)
    layer_factors: tuple[float, ...] | None = None  # step multiplier per layer (a calibrated profile: for_model)
    # How a channel's step follows its spread, per plane: step = alpha * g * (sd / g) ** power,
    # g the typical spread of the layer's channels in that plane (see _spread_base).
    spread_power: tuple[float, ...] = (-0.5, 0.0)


class CacheGenCodec(Codec):
    name = "cachegen"
    lossless = False
    layer_frames = True

    def __init__(self, options: CacheGenOptions | None = None) -> None:
        self.options = options or CacheGenOptions()
        self._variants: dict[tuple[float, ...], CacheGenCodec] = {}  # by profile (for_model)
        self._mismatch_said = False
        if self.options.level not in LEVELS:
            raise CodecError(f"unknown cachegen level {self.options.level!r}; levels: {', '.join(LEVELS)}")

    def configured(self, option: str) -> "CacheGenCodec":
        """``cachegen:low`` style names: the option is the quality level."""
        return CacheGenCodec(CacheGenOptions(level=option))

    def for_model(self, fingerprint: bytes) -> "CacheGenCodec":
        """With a calibrated profile for the model (kvstore.codecs.profiles), each layer's step
        scaled by its factor; explicit ``layer_factors`` win. One variant per profile, kept."""
        if self.options.layer_factors is not None:
            return self
        profile = profiles.profile_for(fingerprint)
        if profile is None:
            return self
        variant = self._variants.get(profile.layer_factors)
        if variant is None:
            variant = CacheGenCodec(dataclasses.replace(self.options, layer_factors=profile.layer_factors))
            self._variants[profile.layer_factors] = variant
        return variant

    # ---- encode --------------------------------------------------------------------------

    def encode(self, kv: torch.Tensor, level: str | None = None) -> bytes:
        opts = self.options if level is None else CacheGenOptions(**{**self.options.__dict__, "level": level})
        if opts.level not in LEVELS:
            raise CodecError(f"unknown cachegen level {opts.level!r}; levels: {', '.join(LEVELS)}")
        lay = ChunkLayout.of(kv)
        if opts.layer_factors is not None and len(opts.layer_factors) != lay.layers and not self._mismatch_said:
            self._mismatch_said = True
            log.warning("cachegen: %d layer factors (a profile or option) for KV of %d layers: steps left flat",
                        len(opts.layer_factors), lay.layers)
        x = kv.detach().float().reshape(lay.layers, lay.planes, lay.tokens, lay.channels)
        exact = sink_tokens(x) if opts.sinks else []
        frames = [self._encode_frame(x, start, min(start + opts.frame_layers, lay.layers), opts, exact)
                  for start in range(0, lay.layers, opts.frame_layers)]
        index = b"".join(_INDEX.pack(len(f)) for f in frames)
        return seal(lay.pack(_MAGIC, 1) + struct.pack("<H", len(frames)) + index + b"".join(frames))

    def _encode_frame(self, x: torch.Tensor, start: int, stop: int, opts: CacheGenOptions,
                      exact: list[int]) -> bytes:
        layers, planes, tokens, channels = x.shape
        n = stop - start
        # The KV's own layout [l, P, T, C]: the statistics reduce over tokens, and the compiled
        # quantizer walks each token's channels side by side (vectorized across lanes).
        xl = x[start:stop]
        kept = b""
        if exact:
            # Stored as they are; in the lanes they count as the mean of the others, so they
            # neither widen the step of their channel nor break its delta chain.
            sinks = xl[:, :, exact]  # a copy (advanced indexing)
            if not bool(torch.isfinite(sinks.half()).all()):  # stored in fp16: they must fit it
                raise CodecError("cachegen cannot encode non-finite KV values (or values beyond fp16's range)")
            kept = struct.pack(f"<{len(exact)}H", *exact) + tensor_to_bytes(sinks.transpose(2, 3).half())
        alpha = torch.full((n, 1, 1), LEVELS[opts.level])
        early = torch.arange(start, stop) < max(1, round(opts.early_fraction * layers))
        alpha[early] *= opts.early_factor
        if opts.layer_factors is not None and len(opts.layer_factors) == layers:
            alpha = alpha * torch.tensor(opts.layer_factors[start:stop]).view(n, 1, 1)
        if planes == len(opts.plane_factors):
            alpha = alpha * torch.tensor(opts.plane_factors).view(1, planes, 1)
        mu, peak, sd = _statistics(xl, exact)
        # A NaN or infinity anywhere in a lane makes its statistics non-finite (so does a mean
        # past fp16's range): checked per lane here, 8x cheaper than a pass over every value.
        if not bool(torch.isfinite(mu).all() and torch.isfinite(peak).all() and torch.isfinite(sd).all()):
            raise CodecError("cachegen cannot encode non-finite KV values (or values beyond fp16's range)")
        base = _spread_base(sd, opts.spread_power)
        step = torch.maximum(alpha * base, peak / (QMAX - 0.5))
        step = torch.where(step > 0, step, torch.ones_like(step))
        step = step.clamp(6.2e-5, 65000).half().float()        # fp16-exact, never zero
        step = torch.where((peak / step) > QMAX - 0.5, (peak / (QMAX - 0.5)).half().float(), step)
        if not bool(torch.isfinite(step).all()):  # a spread past fp16's range: no step can be stored
            raise CodecError("cachegen cannot encode KV values this far beyond fp16's range")
        sym, mode, ctx, hist = _symbols(xl, exact, mu, step, opts.delta and tokens > 1)
        freqs = rans.quantize_freqs(hist)
        group = stream_group(n * planes * channels, tokens)
        states, counts, words = _entropy_encode(sym, ctx, freqs, group)
        flags = int(opts.delta) | (group.bit_length() - 1) << 4
        head = _FRAME.pack(start, n, len(exact), QMAX, flags, words.numel())
        return b"".join([head, kept, tensor_to_bytes(mu.half()), tensor_to_bytes(step.half()),
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
        start, count, nexact, qmax, flags, nwords = r.struct(_FRAME)
        if count == 0 or start + count > lay.layers or qmax != QMAX or nexact > min(MAX_EXACT, lay.tokens):
            raise CodecError(f"corrupt frame header (layers {start}+{count} of {lay.layers}, qmax {qmax}, "
                             f"{nexact} exact tokens)")
        P, T, C = lay.planes, lay.tokens, lay.channels
        exact = list(r.struct(struct.Struct(f"<{nexact}H"))) if nexact else []
        if any(t >= T for t in exact) or len(set(exact)) != len(exact):
            raise CodecError(f"corrupt frame: exact tokens {exact} of a {T}-token chunk")
        kept = r.tensor(torch.float16, count, P, C, nexact) if nexact else None
        mu = r.tensor(torch.float16, count * P * C).float()
        step = r.tensor(torch.float16, count * P * C).float()
        mode = _unpack_bits(r.tensor(torch.uint8, (count * P * C + 7) // 8), count * P * C)
        freqs = _unpack_tables(r, 2 * count * P, 2 * QMAX + 1)
        group = 1 << (flags >> 4)  # lanes per rANS stream (1 in payloads written before streams)
        if (count * P * C) % group:
            raise CodecError(f"corrupt frame: {count * P * C} lanes in streams of {group}")
        states = r.tensor(torch.int32, count * P * C // group)
        counts = r.tensor(torch.int16, count * P * C // group).to(torch.int32) & 0xFFFF
        words = r.tensor(torch.int16, nwords)  # uint16 values; the decoders mask
        r.done()
        if not (torch.isfinite(mu).all() and torch.isfinite(step).all()):
            raise CodecError("corrupt frame: non-finite quantization parameters")
        ctx = _contexts(count, P, C, mode)
        try:
            if rans_cpu.available() and (out is None or out.device.type == "cpu"):
                x = self._decode_cpu(states, counts, words, ctx, freqs, mu, step, mode, T, C, group)
            else:
                x = self._decode_torch(states, counts, words, ctx, freqs, mu, step, mode, T, C, group)
        except rans.RansError as exc:
            raise CodecError(f"entropy-coded stream is corrupt: {exc}") from exc
        if float(step.max()) >= 32:
            # A lane this wide may reconstruct up to half a step past the dtype's largest value
            # (a full-range fp16 lane): clamped, never turned into inf by the final cast.
            limit = torch.finfo(lay.dtype).max
            x.clamp_(-limit, limit)
        if kept is not None:
            x = x.reshape(count, P, T, C)
            x[:, :, exact] = kept.float().transpose(2, 3)
        x = x.reshape(count, P, T, lay.heads, lay.head_size)
        if out is None:
            return start, x
        if tuple(out.shape) != tuple(x.shape):
            raise CodecError(f"frame decodes to {tuple(x.shape)}, destination is {tuple(out.shape)}")
        out.copy_(x)
        return start, out

    @staticmethod
    def _decode_cpu(states, counts, words, ctx, freqs, mu, step, mode, T: int, C: int, group: int) -> torch.Tensor:
        """Compiled decode with dequantization fused in, written straight in [l*P, T, C] order."""
        rans.check_stream(states, counts, words)
        table = rans_cpu.decode_tables(freqs.numpy())
        buf = torch.empty(mu.numel() // C, T, C)  # lanes, not streams
        ok = rans_cpu.decode_dequant(states.numpy(), counts.numpy(), words.numpy(), ctx.to(torch.int32).numpy(),
                                     table, mu.numpy(), step.numpy(),
                                     mode.numpy(), QMAX, T, C, buf.numpy(), group)
        if not ok:
            raise rans.RansError("lanes did not decode back to their initial states (corrupt stream)")
        return buf

    @staticmethod
    def _decode_torch(states, counts, words, ctx, freqs, mu, step, mode, T: int, C: int, group: int) -> torch.Tensor:
        sym = rans.decode(states, counts.to(torch.int32) & 0xFFFF, words.to(torch.int32) & 0xFFFF,
                          ctx, freqs, T, group)  # [T, lanes]
        # Dequantize in the decoder's step-major layout: a few passes, no transposes until the end.
        q = sym.float().sub_(QMAX)
        # Running sums on delta lanes only, row by row: torch.cumsum along a strided axis plus a
        # select costs ~10x more than these T contiguous multiply-adds.
        delta = mode.float()
        for t in range(1, T):
            q[t].addcmul_(q[t - 1], delta)
        x = torch.addcmul(mu, q, step)                              # [T, (l, P, C)]
        return x.view(T, -1, C).transpose(0, 1)                     # [l*P, T, C], a view

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


def _spread_base(sd: torch.Tensor, power: tuple[float, ...]) -> torch.Tensor:
    """Each channel's step before the level's factor: ``g * (sd / g) ** power`` per plane, with
    ``g`` the typical spread of the layer's channels in that plane (``sd`` is ``[layers, planes,
    channels]``). A layout without two planes (MLA latents) keeps each channel's own spread.

    Why not a step proportional to each channel's spread (power 1, every channel the same
    relative error, as before): at a given rate, entropy-coded uniform quantization
    spends bits best with the absolute step set by how much the model feels a channel's error,
    not by the channel's size. For values that is about the same in every channel of a layer
    (power 0: one step per layer). For keys it grows with the channel's size: a query reads
    keys through a dot product, and in RoPE models the queries' large channels are the keys'
    large channels (the same rotary frequencies), so a large key channel gets a finer step
    (power -0.5). Measured on SmolLM2 (bench/codec_quality.py, 6 passages): at 2.9-3.0
    bits/value, KL 2.5e-2 with power 1 (keys at half the values' step, the rule before) and
    1.6e-2 with (-0.5, 0); keys at -0.25 or -1 and values at +-0.25 within 5% of that. Grouping
    by head instead of layer gave 20% more KL, the frame's layers together 35% more (at 2% fewer
    bits)."""
    if len(power) != sd.shape[1]:  # a layout with other planes (MLA latents): the spread itself
        return sd
    # The RMS of the live channels' spreads, clipped at 4x their median: on SmolLM2 that clips
    # ~0.1% of value channels and almost no key channel, but one channel 400x the others must
    # not set the layer's step. Channels under 1/1000 of the widest are left out: constant (or
    # all but constant) channels, half of a layer's say, must not make the rest finer.
    live = sd > 1e-3 * sd.amax(dim=2, keepdim=True)
    typical = torch.where(live, sd, torch.nan).nanmedian(dim=2, keepdim=True).values.nan_to_num(0.0)
    clipped = torch.where(live, sd.minimum(4 * typical), 0.0)
    count = live.sum(dim=2, keepdim=True).clamp_min(1)
    g = (clipped.square().sum(dim=2, keepdim=True) / count).sqrt().clamp_min(1e-12)
    p = torch.tensor(power, dtype=sd.dtype).view(1, -1, 1)
    # Bounded so that no channel's step strays more than 16x from its layer's.
    return g * ((sd.clamp_min(1e-12) / g) ** p).clamp(1 / 16, 16)


def sink_tokens(x: torch.Tensor) -> list[int]:
    """Tokens to keep exact: attention sinks. A sink (the first token of a sequence) draws a
    large share of attention while its values are 3-10x smaller than a typical token's, so the
    absolute error a channel's step gives every token is a large error on it, and it is read by
    every later query. Found from the data, not the position (a codec sees one chunk): tokens
    whose V energy is under SINK_RATIO of the median token's in most layers, at most MAX_EXACT,
    the smallest first. ``x`` is ``[layers, planes, tokens, channels]``."""
    layers, planes, tokens, _channels = x.shape
    if planes != 2 or tokens < 8:  # MLA latents have no separate V; tiny chunks are not worth it
        return []
    energy = x[:, 1].square().mean(dim=2)  # [layers, tokens]
    low = energy < (SINK_RATIO ** 2) * energy.median(dim=1, keepdim=True).values
    votes = low.sum(dim=0)
    found = [int(t) for t in torch.nonzero(votes * 2 > layers).flatten()]
    found.sort(key=lambda t: float(energy[:, t].mean()))
    return sorted(found[:MAX_EXACT])


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
    # Scattered in one step (a loop over the rows was 8% of a chunk's decode).
    row = torch.repeat_interleave(torch.arange(rows), widths)
    first = torch.cumsum(widths, 0) - widths  # where each row's run starts in the body
    freqs[row, ranges[row, 0] + torch.arange(len(body)) - first[row]] = body
    return freqs


def _contexts(layers: int, planes: int, channels: int, mode: torch.Tensor) -> torch.Tensor:
    """Table index per lane: (layer, plane, coding mode). Delta and direct symbols of one layer
    have different distributions (deltas are peakier), so they get separate tables."""
    return torch.arange(layers * planes).repeat_interleave(channels) * 2 + mode.to(torch.int64)


def _statistics(x: torch.Tensor, exact: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per lane ``[l, P, C]`` of ``x`` ``[l, P, T, C]``: the mean of the tokens not kept exact
    (fp16-exact, as stored), the largest deviation from it and the RMS deviation over all T
    tokens, the exact ones counting as the mean. On CPU two compiled passes; the tensor
    version (CUDA) materializes the deviations. Both sum in float64, which makes the order of
    additions all but irrelevant: the two write the same payload (tests check it)."""
    n, planes, tokens, channels = x.shape
    others = tokens - len(exact)
    if rans_cpu.available() and x.device.type == "cpu":
        v = x.reshape(n * planes, tokens, channels).numpy()
        skip = _skip_mask(tokens, exact).numpy()
        mu = (torch.from_numpy(rans_cpu.sums(v, skip)) / others).half().float()
        peak, squares = (torch.from_numpy(a) for a in rans_cpu.spreads(v, skip, mu.numpy()))
        shape = (n, planes, channels)
        sd = squares.div_(tokens).sqrt_().float().view(shape) if tokens > 1 else torch.zeros(shape)
        return mu.view(shape), peak.view(shape), sd
    total = (x[:, :, ~_skip_mask(tokens, exact)] if exact else x).sum(dim=2, dtype=torch.float64)
    mu = (total / others).half().float()
    dev = x - mu[:, :, None]  # not in place: x may view the caller's KV
    if exact:
        dev[:, :, exact] = 0
    peak = torch.maximum(dev.amax(dim=2), dev.amin(dim=2).neg())
    if tokens == 1:
        return mu, peak, torch.zeros_like(mu)
    squares = dev.double().square_().sum(dim=2)
    return mu, peak, squares.div_(tokens).sqrt_().float()


def _skip_mask(tokens: int, exact: list[int]) -> torch.Tensor:
    skip = torch.zeros(tokens, dtype=torch.bool)
    skip[exact] = True
    return skip


def _symbols(x: torch.Tensor, exact: list[int], mu: torch.Tensor, step: torch.Tensor,
             delta: bool) -> tuple[torch.Tensor, ...]:
    """Symbols ``[lanes, T]`` (offset by QMAX; lanes are (l, P, C) in order), delta mode per
    lane, the table of every lane (``_contexts``) and the tables' histograms, from the values
    ``x`` ``[l, P, T, C]`` and each lane's mean and step ``[l, P, C]``. Tokens kept exact are
    coded as the mean (symbol 0: the decoder overwrites them).

    Deviations are scaled by the step's reciprocal (one multiply; both versions compute the
    same float32 operations, so they write one bitstream). A lane is delta coded only where
    that gives smaller symbols AND none clamps: a clamped delta (a jump of more than QMAX
    steps) leaves the reconstruction behind for several tokens, far beyond step/2. On CPU one
    compiled kernel does it all (two passes over each row); the tensor version is the same
    arithmetic."""
    n, planes, tokens, channels = x.shape
    alphabet = 2 * QMAX + 1
    inv = 1.0 / step
    if rans_cpu.available() and x.device.type == "cpu":
        rows = n * planes
        sym, mode, ctx, hist = rans_cpu.quantize(x.reshape(rows, tokens, channels).numpy(),
                                                 _skip_mask(tokens, exact).numpy(),
                                                 mu.reshape(rows, channels).numpy(),
                                                 inv.reshape(rows, channels).numpy(), QMAX, delta)
        return torch.from_numpy(sym), torch.from_numpy(mode), torch.from_numpy(ctx), torch.from_numpy(hist)
    if exact:
        x = x.clone()
        x[:, :, exact] = mu[:, :, None]
    dev = x - mu[:, :, None]
    v = dev * inv[:, :, None]
    q = torch.round(v).clamp_(-QMAX, QMAX)
    mode = torch.zeros_like(step, dtype=torch.bool)
    if delta:
        qd = _delta_quantize(v)
        mode = (qd.abs().sum(dim=2) < q.abs().sum(dim=2)) & (qd.abs().amax(dim=2) < QMAX)
        q = torch.where(mode[:, :, None], qd, q)
    sym = q.add_(QMAX).to(torch.int32).view(n * planes, tokens, channels)
    ctx = _contexts(n, planes, channels, mode.reshape(-1))
    keys = (ctx.view(n * planes, 1, channels).to(torch.int32) * alphabet) + sym
    hist = torch.bincount(keys.view(-1), minlength=2 * n * planes * alphabet).view(-1, alphabet)
    return sym.transpose(1, 2).reshape(n * planes * channels, tokens), mode.reshape(-1), ctx, hist


def _delta_quantize(v: torch.Tensor) -> torch.Tensor:
    """Closed-loop delta symbols: token t is coded against the reconstruction of token t-1, so
    errors never accumulate (decode is mu + step * cumsum(q), exactly what the encoder tracks).
    ``v`` is ``[l, P, T, C]``: deviations from the channel mean in units of the step."""
    q = torch.empty_like(v)
    total = torch.zeros_like(v[:, :, 0])
    for t in range(v.shape[2]):
        qt = torch.round(v[:, :, t] - total).clamp_(-QMAX, QMAX)
        q[:, :, t] = qt
        total += qt
    return q


def stream_group(lanes: int, tokens: int) -> int:
    """Lanes per rANS stream: each stream pays a 32-bit state and a 16-bit word count, 0.19
    bits a value when every 256-token lane is its own stream; eight lanes share them. Fewer
    streams mean fewer lanes to advance in parallel (the torch coder, on CUDA), and a stream's
    word count must fit 16 bits (at most one word per symbol)."""
    group = 8
    while group > 1 and (lanes % group or group * tokens > 0xFFFF):
        group //= 2
    return group


def _entropy_encode(sym: torch.Tensor, ctx: torch.Tensor, freqs: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """Symbols ``[lanes, T]`` into rANS streams: the compiled CPU coder when it is there (same
    bitstream, many times faster), else torch."""
    if rans_cpu.available() and sym.device.type == "cpu":
        return tuple(torch.from_numpy(a) for a in rans_cpu.encode(sym.numpy(), ctx.numpy(), freqs.numpy(), group))
    return rans.encode(sym, ctx, freqs, group)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    pad = (-bits.numel()) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (b * weights).sum(dim=1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return ((packed[:, None] & weights) != 0).reshape(-1)[:n]


register_codec(CacheGenCodec())
