"""Codecs: round trips, error bounds, frames, bad input and fuzzing of every decoder."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import KVSpec, KVStore
from kvstore.codecs import CodecError, get_codec
from kvstore.codecs import cachegen
from kvstore.codecs.cachegen import CacheGenCodec, CacheGenOptions
from kvstore.codecs.quality import attention_error, relative_error, synthetic_kv

KV = synthetic_kv(layers=4, heads=2, head_size=32, tokens=64, seed=3)
LOSSY = ["int8", "fp8", "cachegen", "cachegen:high", "cachegen:low"]


def roundtrip(name, kv=KV):
    codec = get_codec(name)
    blob = codec.encode(kv)
    return blob, codec.decode(memoryview(blob), tuple(kv.shape), kv.dtype)


@pytest.mark.parametrize("name", ["raw", "lz4"])
def test_lossless_codecs_are_exact(name):
    _blob, out = roundtrip(name)
    assert torch.equal(out, KV)


@pytest.mark.parametrize("name,max_rel,min_ratio", [
    ("int8", 0.005, 1.8), ("fp8", 0.03, 1.8), ("cachegen:high", 0.01, 1.5), ("cachegen", 0.02, 1.8),
    ("cachegen:low", 0.05, 2.2),
])
def test_lossy_error_and_size(name, max_rel, min_ratio):
    blob, out = roundtrip(name)
    assert out.shape == KV.shape and out.dtype == KV.dtype
    assert relative_error(KV, out) < max_rel
    assert KV.numel() * 2 / len(blob) > min_ratio


def test_cachegen_levels_trade_size_for_error():
    sizes, errors = [], []
    for level in ("high", "medium", "low", "tiny"):
        blob = get_codec("cachegen").encode(KV, level=level)
        out = get_codec("cachegen").decode(memoryview(blob), tuple(KV.shape), KV.dtype)
        sizes.append(len(blob))
        errors.append(attention_error(KV, out))
    assert sizes == sorted(sizes, reverse=True) and errors == sorted(errors)


def _steps(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The step the codec gives each channel of ``x`` ``[L, P, T, H, D]`` (as ``[L, P, 1, H, D]``):
    the level's factor times the spread rule, raised so that no symbol clips."""
    L, P, T, H, D = x.shape
    dev = x - x.mean(dim=2, keepdim=True)
    sd = dev.square().mean(dim=2).reshape(L, P, H * D).sqrt()
    base = cachegen._spread_base(sd, CacheGenOptions().spread_power).reshape(L, P, 1, H, D)
    return torch.maximum(alpha * base, dev.abs().amax(dim=2, keepdim=True) / 126.5)


def test_cachegen_error_is_bounded_by_half_a_step():
    """No clipping: every value is within step/2 of the original (outlier channels included)."""
    kv = KV.float().clone()
    kv[0, 0, :, 0, 3] *= 200  # an extreme outlier channel
    kv = kv.half()
    codec = CacheGenCodec(CacheGenOptions(level="low"))
    out = codec.decode(memoryview(codec.encode(kv)), tuple(kv.shape), kv.dtype)
    x = kv.float()
    peak = (x - x.mean(dim=2, keepdim=True)).abs().amax(dim=2, keepdim=True)
    step = _steps(x, cachegen.LEVELS["low"])
    err = (out.float() - x).abs()
    assert (err <= step / 2 * 1.01 + x.abs() * 2**-10 + 1e-4).all()
    assert err[0, 0, :, 0, 3].max() < 0.02 * peak[0, 0, 0, 0, 3]  # the outlier channel kept its precision


def test_key_steps_shrink_with_the_channels_spread_and_value_steps_are_shared():
    """The spread rule: a key channel 8x wider than its layer's others gets a finer absolute
    step than they do (queries read keys through a dot product, and their large channels are
    the keys' large ones); a value channel 8x wider gets the same absolute step as the others,
    so its relative error is far smaller. Step ~ spread (the old rule) fails both."""
    kv = torch.randn(4, 2, 64, 2, 32, generator=torch.Generator().manual_seed(5))
    kv[:, :, :, 0, 5] *= 4
    kv = kv.half()
    codec = CacheGenCodec(CacheGenOptions(level="tiny"))
    err = (codec.decode(memoryview(codec.encode(kv)), tuple(kv.shape), kv.dtype).float() - kv.float()).abs()
    rest = torch.ones(kv.shape[3], kv.shape[4], dtype=torch.bool)
    rest[0, 5] = False
    for layer in range(kv.shape[0]):
        k_wide, k_rest = err[layer, 0, :, 0, 5].mean(), err[layer, 0][:, rest].mean()
        v_wide, v_rest = err[layer, 1, :, 0, 5].mean(), err[layer, 1][:, rest].mean()
        assert k_wide < 0.8 * k_rest, (layer, float(k_wide), float(k_rest))
        assert 0.5 * v_rest < v_wide < 2 * v_rest, (layer, float(v_wide), float(v_rest))


def test_constant_channels_do_not_make_the_others_finer():
    """Half a layer's channels constant (zeroed heads, padding): the live ones keep the level's
    step, so the chunk costs about what the live channels cost alone. (A median over every
    channel was 0 there, and each live value took 8.5 bits at ``extreme``.)"""
    codec = get_codec("cachegen:extreme")
    kv = synthetic_kv(layers=1, heads=4, head_size=32, tokens=256, seed=3)
    for dead in (15, 17):
        x = kv.clone()
        x[..., :dead] = 0
        whole, live = len(codec.encode(x)), len(codec.encode(x[..., dead:].contiguous()))
        assert whole < 1.4 * live, (dead, whole, live)


def test_cachegen_delta_never_lags_behind_a_jump():
    """A flat channel (delta coding pays) that swings from its minimum to its maximum in one
    token: that delta is ~2 x QMAX steps, would clamp, and the reconstruction would trail the
    jump; the channel must use direct coding and stay within half a step everywhere."""
    t = torch.linspace(0, 0.1, 64)
    ch = torch.where(torch.arange(64) < 32, -10.0, 10.0) + t
    kv = ch[None, None, :, None, None].expand(2, 2, 64, 1, 8).half().contiguous()
    codec = CacheGenCodec(CacheGenOptions(level="high"))
    out = codec.decode(memoryview(codec.encode(kv)), tuple(kv.shape), kv.dtype).float()
    x = kv.float()
    peak = (x - x.mean(dim=2, keepdim=True)).abs().amax(dim=2, keepdim=True)
    assert ((out - x).abs() <= peak / 126.5 / 2 * 1.01 + 2e-3).all()


@pytest.mark.parametrize("tokens", [1, 2, 64])
def test_encoding_never_modifies_the_callers_kv(tokens):
    kv = KV[:, :, :tokens].float().contiguous()
    before = kv.clone()
    for name in LOSSY:
        get_codec(name).encode(kv)
    assert torch.equal(kv, before)


def test_cachegen_delta_coding_is_exact_where_chosen():
    smooth = torch.linspace(0, 1, 64)[None, None, :, None, None].expand(2, 2, 64, 1, 8).half().contiguous()
    on = CacheGenCodec(CacheGenOptions(delta=True))
    off = CacheGenCodec(CacheGenOptions(delta=False))
    b_on, b_off = on.encode(smooth), off.encode(smooth)
    assert len(b_on) < len(b_off)
    assert relative_error(smooth, on.decode(memoryview(b_on), tuple(smooth.shape), smooth.dtype)) < 0.01


def test_cachegen_frames_decode_independently():
    codec = CacheGenCodec(CacheGenOptions(frame_layers=1))
    blob = codec.encode(KV)
    whole = codec.decode(memoryview(blob), tuple(KV.shape), KV.dtype)
    lay, frames = codec.frames(memoryview(blob))
    assert len(frames) == KV.shape[0]
    for frame in reversed(frames):  # any order: each frame stands alone
        start, part = codec.decode_frame(lay, frame)
        assert torch.allclose(part.to(KV.dtype), whole[start:start + 1])


@pytest.mark.parametrize("name", LOSSY)
def test_mla_and_bfloat16(name):
    mla = torch.randn(3, 1, 40, 64).to(torch.bfloat16)
    _blob, out = roundtrip(name, mla)
    assert out.shape == mla.shape and out.dtype == torch.bfloat16
    assert relative_error(mla, out) < 0.1


@pytest.mark.parametrize("name", LOSSY + ["lz4"])
def test_truncation_and_flips_raise_codec_error(name):
    codec = get_codec(name)
    blob = codec.encode(KV)
    for n in (0, 3, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CodecError):
            codec.decode(memoryview(blob[:n]), tuple(KV.shape), KV.dtype)
    if name != "lz4":  # lz4 has no checksum of its own; the object header covers it in the store
        for pos in (0, 10, len(blob) // 3, len(blob) - 9):
            bad = bytearray(blob)
            bad[pos] ^= 0x10
            with pytest.raises(CodecError):
                codec.decode(memoryview(bytes(bad)), tuple(KV.shape), KV.dtype)


@pytest.mark.parametrize("name", LOSSY)
def test_foreign_payload_and_shape_mismatch(name):
    codec = get_codec(name)
    other = "int8" if name != "int8" else "fp8"
    with pytest.raises(CodecError, match="magic"):
        codec.decode(memoryview(get_codec(other).encode(KV)), tuple(KV.shape), KV.dtype)
    with pytest.raises(CodecError):
        codec.decode(memoryview(codec.encode(KV)), (4, 2, 65, 2, 32), KV.dtype)


def test_bad_codec_names_and_inputs():
    with pytest.raises(CodecError, match="unknown codec 'zstd'"):
        get_codec("zstd")
    with pytest.raises(CodecError, match="unknown cachegen level 'ultra'"):
        get_codec("cachegen:ultra")
    with pytest.raises(CodecError, match="takes no options"):
        get_codec("raw:fast")
    with pytest.raises(CodecError, match="non-finite"):
        get_codec("cachegen").encode(torch.full((1, 2, 4, 1, 8), float("nan")).half())
    with pytest.raises(CodecError, match="float16/bfloat16/float32"):
        get_codec("int8").encode(torch.zeros(1, 2, 4, 1, 8, dtype=torch.int8))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(LOSSY + ["lz4", "raw"]), data=st.binary(max_size=600), cut=st.integers(0, 400))
def test_fuzz_decoders_only_raise_codec_error(name, data, cut):
    codec = get_codec(name)
    small = KV[:1, :, :8, :1]
    genuine = codec.encode(small)
    for candidate in (data, bytes(genuine[:cut]) + data, data + bytes(genuine[cut:])):
        try:
            out = codec.decode(memoryview(candidate), tuple(small.shape), small.dtype)
        except CodecError:
            continue
        assert out.shape == small.shape  # anything that decodes has the asked-for shape
        if name != "raw":
            assert candidate == bytes(genuine) or name == "lz4"


@pytest.mark.parametrize("codec", ["lz4", "int8", "cachegen:high"])
def test_store_tiers_use_codecs_and_record_them(tmp_path, codec):
    spec = KVSpec(model_id="test/codec", num_layers=4, num_kv_heads=2, head_size=32)
    toks = list(range(64))
    kv = KV
    cfg = {"chunk_size": 32, "tiers": {"disk": {"path": str(tmp_path), "capacity": "64MiB", "codec": codec}}}
    with KVStore(spec, cfg) as store:
        store.put(toks, kv)
    # A reader configured with another codec still decodes: the header names the codec.
    cfg["tiers"]["disk"]["codec"] = "raw"
    with KVStore(spec, cfg) as store:
        hit, out = store.get(toks)
    assert hit == 64
    if codec == "lz4":
        assert torch.equal(out, kv)
    else:
        assert relative_error(kv, out) < 0.02


def test_layerwise_get_decodes_cachegen_frame_by_frame(tmp_path):
    spec = KVSpec(model_id="test/codec", num_layers=4, num_kv_heads=2, head_size=32)
    toks = list(range(64))
    cfg = {"chunk_size": 32, "tiers": {"disk": {"path": str(tmp_path), "capacity": "64MiB",
                                                "codec": "cachegen:high"}}}
    with KVStore(spec, cfg) as store:
        store.put(toks, KV)
        hit, whole = store.get(toks)
        handle = store.get_layers(toks)
        assert handle.hit_tokens == hit == 64
        for layer, part in handle:
            assert torch.equal(part, whole[layer])


def test_compiled_and_torch_coders_agree(monkeypatch):
    """The numba CPU coder and the torch coder (the CUDA path) write and read one bitstream."""
    from kvstore.codecs import rans_cpu

    assert rans_cpu.available(), "numba is a dependency: the compiled CPU coder must load"
    # The second: 24 lanes, 3 streams of 8 (the compiled coders run streams in pairs; the odd
    # one out alone). The third has an attention sink (token 5 kept exact, counted as the mean
    # by the compiled statistics and quantizer).
    odd = synthetic_kv(layers=1, heads=3, head_size=4, tokens=40, seed=9)
    sink = KV.float().clone()
    sink[:, 1, 5] *= 0.1
    for level in ("cachegen", "compact", "cachegen:extreme"):
        codec = get_codec(level)
        for kv in (KV, odd, sink.half()):
            monkeypatch.setattr(rans_cpu, "ENABLED", True)
            fast = bytes(codec.encode(kv))
            fast_out = codec.decode(memoryview(fast), tuple(kv.shape), kv.dtype)
            monkeypatch.setattr(rans_cpu, "ENABLED", False)
            slow = bytes(codec.encode(kv))
            assert slow == fast
            assert torch.equal(codec.decode(memoryview(fast), tuple(kv.shape), kv.dtype), fast_out)
            assert relative_error(kv, fast_out) < (0.05 if level == "cachegen" else 0.3)
    assert cachegen.sink_tokens(sink.reshape(4, 2, 64, 64)) == [5]


def test_the_compiled_encoder_refuses_symbols_outside_its_tables():
    """Cachegen's quantizer hands the coder bytes; any other caller's symbols are range-checked
    (a symbol past the alphabet would index past its table), and a symbol with no frequency in
    its table is refused by the loop itself."""
    import numpy as np

    from kvstore.codecs import rans, rans_cpu

    freqs = np.zeros((1, 5), np.int32)
    freqs[0, :2] = (4000, 96)
    ctx = np.zeros(2, np.int64)
    ok = np.array([[0, 1, 0], [1, 1, 0]], np.int32)
    rans_cpu.encode(ok, ctx, freqs, group=2)
    for bad in (np.array([[0, 1, 5], [1, 1, 0]], np.int32), np.array([[0, -1, 0], [1, 1, 0]], np.int32),
                np.array([[0, 1, 3], [1, 1, 0]], np.uint8)):
        with pytest.raises(rans.RansError):
            rans_cpu.encode(bad, ctx, freqs, group=2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
       compiled=st.booleans())
def test_corrupt_frames_past_the_checksum_raise_codec_error(flips, compiled):
    """The checksum normally stops corruption first; the entropy decoders must still never read
    out of bounds or crash when handed a damaged frame directly (the compiled loop has no bounds
    checks of its own)."""
    from kvstore.codecs import rans_cpu

    codec = get_codec("cachegen")
    small = KV[:2, :, :16]
    lay, frames = codec.frames(memoryview(codec.encode(small)))
    frame = bytearray(frames[0])
    for pos, bit in flips:
        frame[pos % len(frame)] ^= bit
    saved = rans_cpu.ENABLED
    rans_cpu.ENABLED = compiled
    try:
        _start, out = codec.decode_frame(lay, memoryview(bytes(frame)))
        assert out.shape[1:] == small.shape[1:]
    except CodecError:
        pass
    finally:
        rans_cpu.ENABLED = saved


def test_importing_the_codecs_does_not_import_numba():
    """numba (and llvmlite) load on the first cachegen call only: engines that never use cachegen
    (the vLLM connector uses raw/lz4) must not carry them (vLLM's kernel scan trips over llvmlite)."""
    import subprocess
    import sys

    code = "import sys, kvstore.codecs, kvstore.connectors.hooks; print('numba' in sys.modules, 'llvmlite' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_streams_of_lanes_are_smaller_and_single_lane_payloads_still_decode(monkeypatch, compiled):
    """Eight lanes share one rANS state and word count; payloads written with one stream per
    lane (before streams, or where lanes do not split) decode as before, by both coders."""
    from kvstore.codecs import cachegen, rans_cpu

    codec = get_codec("cachegen")
    grouped = bytes(codec.encode(KV))
    with monkeypatch.context() as m:
        m.setattr(cachegen, "stream_group", lambda lanes, tokens: 1)
        single = bytes(codec.encode(KV))
    monkeypatch.setattr(rans_cpu, "ENABLED", compiled)
    a = codec.decode(memoryview(grouped), tuple(KV.shape), KV.dtype)
    b = codec.decode(memoryview(single), tuple(KV.shape), KV.dtype)
    assert torch.equal(a, b)
    lanes = KV.shape[0] * 2 * KV.shape[3] * KV.shape[4]
    # 6 bytes a stream (state, word count) for 7 of every 8 lanes, less the words a chained state spills
    assert lanes * 4 < len(single) - len(grouped) < lanes * 6 * 7 // 8
    assert cachegen.stream_group(6, 256) == 2 and cachegen.stream_group(16, 10_000) == 4


def test_an_attention_sink_is_kept_exact_and_costs_only_where_there_is_one():
    """Token 0 of a sequence has values several times smaller than the others (measured on
    SmolLM2) and is read by every later query: kept in fp16, it comes back bit-exact, and a
    chunk without such a token stores no exact tokens."""
    from kvstore.codecs import cachegen

    kv = KV.float().clone()
    kv[:, 1, 0] *= 0.1
    kv = kv.half()
    codec = get_codec("cachegen:low")
    blob = codec.encode(kv)
    out = codec.decode(memoryview(blob), tuple(kv.shape), kv.dtype)
    assert torch.equal(out[:, :, 0], kv[:, :, 0])
    assert relative_error(kv[:, :, 1:], out[:, :, 1:]) < 0.05
    assert cachegen.sink_tokens(kv.float().reshape(4, 2, 64, 64)) == [0]
    _lay, frames = codec.frames(memoryview(codec.encode(KV)))
    assert all(cachegen._FRAME.unpack_from(f)[2] == 0 for f in frames)  # no sink: no exact tokens


def test_presets_name_what_users_choose():
    """``lossless`` is exact; ``balanced``, ``compact`` and ``aggressive`` are cachegen levels,
    each smaller than the one before; a store configured with a preset reads its objects back."""
    _blob, out = roundtrip("lossless")
    assert torch.equal(out, KV)
    sizes = [len(roundtrip(name)[0]) for name in ("balanced", "compact", "aggressive", "cachegen:extreme")]
    assert sizes == sorted(sizes, reverse=True)
    assert get_codec("compact") is get_codec("cachegen:compact")
    from kvstore.codecs import is_bytewise

    assert is_bytewise("lossless") and not is_bytewise("compact")


def test_layer_factors_scale_each_layers_step():
    """A per-layer step multiplier (what a sensitivity profile sets): the coarser layer's error
    grows, the others' stay as they were."""
    flat = CacheGenCodec(CacheGenOptions(level="low"))
    coarse = CacheGenCodec(CacheGenOptions(level="low", layer_factors=(1.0, 4.0, 1.0, 1.0)))
    a = flat.decode(memoryview(flat.encode(KV)), tuple(KV.shape), KV.dtype)
    b = coarse.decode(memoryview(coarse.encode(KV)), tuple(KV.shape), KV.dtype)
    assert relative_error(KV[1], b[1]) > 2 * relative_error(KV[1], a[1])
    assert torch.equal(a[0], b[0]) and torch.equal(a[2:], b[2:])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["a token", "a sink's key"])
def test_one_non_finite_value_anywhere_is_refused(bad, where):
    kv = KV.float().clone()
    if where == "a sink's key":
        kv[:, 1, 0] *= 0.1  # token 0 is kept exact: its values skip the lanes' checks
        kv[2, 0, 0, 1, 5] = bad
    else:
        kv[3, 1, 40, 0, 17] = bad
    with pytest.raises(CodecError, match="non-finite"):
        get_codec("compact").encode(kv.half())


def test_tokens_kept_exact_never_feed_the_quantizer_a_nan():
    """A skipped (sink) token's deviation can overflow float32; the compiled quantizer must
    select 0 for it rather than multiply by 0 (inf * 0 is NaN, and a NaN symbol indexed the
    histogram out of bounds)."""
    import numpy as np

    from kvstore.codecs import rans_cpu

    rows, steps, channels = 1, 16, 12
    v = (np.random.default_rng(0).standard_normal((rows, steps, channels)) * 1e-3).astype(np.float32)
    v[0, 3, :] = 3e38
    skip = np.zeros(steps, bool)
    skip[3] = True
    mu = np.zeros((rows, channels), np.float32)
    inv = np.full((rows, channels), 16000.0, np.float32)
    n = 2 * rows * (2 * cachegen.QMAX + 1)
    guard = np.zeros(n + 200_000, np.int64)
    hist = guard[100_000:100_000 + n]
    sym = np.empty((rows, channels, steps), np.uint8)
    mode = np.empty(rows * channels, bool)
    ctx = np.empty(rows * channels, np.int64)
    rans_cpu._compiled().quantize(v, skip, mu, inv, np.float32(cachegen.QMAX), True, sym, mode, ctx, hist)
    assert hist.sum() == rows * steps * channels
    assert not guard[:100_000].any() and not guard[100_000 + n:].any()


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_values_beyond_fp16_are_refused_and_full_range_fp16_stays_finite(monkeypatch, compiled):
    """What cachegen stores in fp16 (exact sink tokens, means, steps) must fit it: a bf16 sink of
    1e36 or fp32 values of 1e9 are a CodecError at encode, never a payload that cannot decode. And
    fp16 lanes spanning its whole range decode to finite values (half a coarse step past 65504
    was rounded to inf)."""
    from kvstore.codecs import rans_cpu

    monkeypatch.setattr(rans_cpu, "ENABLED", compiled)
    codec = get_codec("cachegen")
    kv = (KV.float() * 0.01).to(torch.bfloat16)
    kv[:, 1, 3] *= 0.01
    kv[0, 0, 3] = 1e36
    with pytest.raises(CodecError, match="fp16"):
        codec.encode(kv)
    huge = KV.float() * 1e9
    with pytest.raises(CodecError, match="fp16"):
        codec.encode(huge)
    full = torch.full_like(KV, 65504.0)
    full[:, :, 1::2] = -65504.0
    for level in ("cachegen", "compact"):
        out = get_codec(level).decode(memoryview(get_codec(level).encode(full)), tuple(full.shape), full.dtype)
        assert bool(torch.isfinite(out).all())
        assert relative_error(full, out) < 0.02
