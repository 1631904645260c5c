import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.codecs import CodecError, available_codecs, get_codec
from kvstore.errors import CorruptObjectError, MismatchedObjectError
from kvstore.objects import decode_object, encode_object, join_parts, meta_for, read_meta


def _obj(codec="raw", dtype=torch.float16, tokens=5):
    kv = torch.randn(2, 2, tokens, 2, 4).to(dtype)
    meta = meta_for(b"k" * 16, b"f" * 16, kv, partial=True, codec=codec)
    return kv, meta, join_parts(encode_object(meta, kv))


@pytest.mark.parametrize("codec", ["raw", "lz4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_round_trip(codec, dtype):
    kv, meta, blob = _obj(codec, dtype)
    out = decode_object(blob, meta)
    assert out.dtype == dtype and torch.equal(out.view(torch.uint8), kv.view(torch.uint8))
    assert read_meta(blob)[0] == meta


def test_every_single_byte_flip_is_detected():
    _kv, meta, blob = _obj()
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptObjectError):
            decode_object(bytes(bad), meta)


def test_truncation_is_detected():
    _kv, meta, blob = _obj("lz4")
    for n in range(0, len(blob)):
        with pytest.raises(CorruptObjectError):
            decode_object(blob[:n], meta)
    with pytest.raises(CorruptObjectError, match="payload is"):
        decode_object(blob + b"x", meta)


def test_foreign_object_is_a_mismatch():
    _kv, meta, blob = _obj()
    for field, value in (("key", b"x" * 16), ("fingerprint", b"y" * 16), ("num_tokens", 6)):
        other = meta.__class__(**{**{f: getattr(meta, f) for f in meta.__slots__}, field: value})
        with pytest.raises(MismatchedObjectError, match=field):
            decode_object(blob, other)


def test_unknown_codec_is_named():
    with pytest.raises(CodecError, match="unknown codec 'zstd9'"):
        get_codec("zstd9")
    assert {"raw", "lz4"} <= set(available_codecs())


def test_lz4_corrupt_payload_raises_codec_error():
    with pytest.raises(CodecError):
        get_codec("lz4").decode(memoryview(b"\xff" * 40), (2, 2, 5, 2, 4), torch.float16)
    with pytest.raises(CodecError, match="needs"):
        get_codec("raw").decode(memoryview(b"\x00" * 10), (2, 2, 5, 2, 4), torch.float16)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_decode(data):
    _kv, meta, blob = _obj()
    for candidate in (data, blob[:30] + data, blob[:len(blob) // 2] + data):
        try:
            decode_object(candidate, meta)
        except CorruptObjectError:
            continue
        assert candidate == blob  # only the genuine object may decode


@pytest.mark.parametrize("field, value", [("key", 2**63), ("fp", 2**62), ("dtype", [1]), ("shape", ["a", "b"]),
                                          ("shape", [[0], 20_000_000]), ("shape", [1] * 9), ("ntok", -1),
                                          ("partial", 1), ("plen", "64"), ("codec", None), ("key", b"")])
def test_a_header_field_of_the_wrong_type_is_a_corrupt_object(field, value):
    """The header is checksummed, not signed: anyone can send a valid checksum over any fields.
    A field of another type or range is a CorruptObjectError naming it, never an exception from
    deep inside (bytes(2**63)) nor an allocation it sizes ([0] * 20_000_000)."""
    import msgpack
    import struct
    import xxhash

    from kvstore.objects import parse_header

    payload = b"\0" * 64
    h = dict(codec="raw", dtype="float16", fp=b"\1" * 16, shape=[32], key=b"\2" * 16, ntok=1, partial=False,
             plen=64, psum=xxhash.xxh3_64_intdigest(payload))
    h[field] = value
    hb = msgpack.packb(h)
    blob = struct.pack("<4sHIQ", b"KVSO", 1, len(hb), xxhash.xxh3_64_intdigest(hb)) + hb + payload
    with pytest.raises(CorruptObjectError, match=f"bad {field!r}"):
        parse_header(blob, len(blob))
