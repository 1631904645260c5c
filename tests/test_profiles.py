"""Per-model codec profiles (kvstore.codecs.profiles) and their calibration (kvstore calibrate):
a profile only moves encoder steps, never what a payload decodes to."""

import json
import logging
import math
import subprocess
import sys

import pytest
import torch

from kvstore.codecs import get_codec, profiles
from kvstore.codecs.profiles import CodecProfile
from kvstore.codecs.quality import synthetic_kv
from kvstore.objects import decode_object, encode_object, join_parts, meta_for

FP = bytes(range(16))
KV = synthetic_kv(layers=4, heads=2, head_size=32, tokens=64, seed=5)


@pytest.fixture(autouse=True)
def profile_dir(tmp_path, monkeypatch):
    where = tmp_path / "profiles"
    monkeypatch.setenv("KVSTORE_CODEC_PROFILES", str(where))
    profiles.forget()
    yield where
    profiles.forget()


def test_factors_follow_the_inverse_square_root_of_sensitivity():
    p = CodecProfile.from_sensitivity(FP, [4e-3, 1e-3, 1e-3], [0, 1, 3], 4)
    f = p.layer_factors
    assert len(f) == 4 and f[1] == f[2] == f[3]
    assert f[1] / f[0] == pytest.approx(2.0, rel=1e-3)  # 4x the sensitivity: half the step
    assert math.prod(f) == pytest.approx(1.0, rel=1e-3)  # the level keeps its size
    wild = CodecProfile.from_sensitivity(FP, [1.0, 1e-9], [0, 1], 2).layer_factors
    assert max(wild) / min(wild) == pytest.approx(profiles.MAX_FACTOR ** 2, rel=1e-3)  # bounded
    with pytest.raises(ValueError):
        CodecProfile.from_sensitivity(FP, [1.0], [1], 2)


def test_missing_malformed_and_foreign_profiles_are_ignored(profile_dir, caplog):
    assert profiles.profile_for(FP) is None
    profile_dir.mkdir()
    other = bytes(16)
    for fp, text in ((FP, "{not json"), (other, json.dumps({"fingerprint": FP.hex(), "layer_factors": [1, 1]}))):
        (profile_dir / f"{fp.hex()}.json").write_text(text)
    bad = bytes([7] * 16)
    (profile_dir / f"{bad.hex()}.json").write_text(json.dumps({"fingerprint": bad.hex(), "layer_factors": [1, 100]}))
    profiles.forget()
    with caplog.at_level(logging.WARNING, logger="kvstore.codecs.profiles"):
        assert profiles.profile_for(FP) is None
        assert profiles.profile_for(other) is None  # a file under one name holding another model's profile
        assert profiles.profile_for(bad) is None
    assert len([r for r in caplog.records if "ignoring codec profile" in r.message]) == 3
    assert get_codec("compact").for_model(FP) is get_codec("compact")


def test_nothing_about_a_profile_file_can_raise_or_hang_an_encode(profile_dir, monkeypatch, caplog):
    """The lookup runs inside an engine's put: a FIFO under the profile's name (would block a
    plain open), JSON nested past the recursion limit, a directory in its place or a directory
    path too long to open are each a warning and no profile, and concurrent first reads warn
    once."""
    import os
    import threading

    profile_dir.mkdir()
    meta = meta_for(b"k" * 16, FP, KV.half(), False, codec="compact")
    os.mkfifo(profile_dir / f"{FP.hex()}.json")
    deep = bytes([9] * 16)
    (profile_dir / f"{deep.hex()}.json").write_text("[" * 200_000 + "]" * 200_000)
    dirlike = bytes([8] * 16)
    (profile_dir / f"{dirlike.hex()}.json").mkdir()
    with caplog.at_level(logging.WARNING, logger="kvstore.codecs.profiles"):
        threads = [threading.Thread(target=encode_object, args=(meta, KV.half())) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert profiles.profile_for(deep) is None and profiles.profile_for(dirlike) is None
        monkeypatch.setenv("KVSTORE_CODEC_PROFILES", str(profile_dir / ("a" * 300)))
        assert profiles.profile_for(FP) is None
        encode_object(meta, KV.half())
    warned = [r for r in caplog.records if "ignoring codec profile" in r.message]
    assert len(warned) == 4  # the FIFO once (8 threads), the deep file, the directory, the long path


def test_a_profile_moves_steps_and_payloads_decode_without_it(profile_dir):
    meta = meta_for(b"k" * 16, FP, KV.half(), False, codec="compact")
    plain = join_parts(encode_object(meta, KV.half()))
    profiles.save_profile(CodecProfile(FP.hex(), (3.0, 1.0, 1.0, 0.3334)))
    variant = get_codec("compact").for_model(FP)
    assert variant.options.layer_factors == (3.0, 1.0, 1.0, 0.3334)
    assert get_codec("compact").for_model(FP) is variant  # one variant per profile
    assert get_codec("compact").for_model(bytes(16)) is get_codec("compact")  # other models: the rule alone
    shaped = join_parts(encode_object(meta, KV.half()))
    assert shaped != plain
    a = decode_object(memoryview(plain), meta)
    profiles.save_profile(CodecProfile(FP.hex(), (1.0, 1.0, 1.0, 1.0)))
    profiles.forget()  # a reader with another profile (or none) decodes the same bytes alike
    b = decode_object(memoryview(shaped), meta)
    err = lambda got, layer: (got[layer].float() - KV[layer].float()).abs().mean().item()  # noqa: E731
    assert err(b, 0) > 2 * err(a, 0) and err(b, 3) < err(a, 3) / 2
    assert torch.equal(b, decode_object(memoryview(shaped), meta))


def test_calibrate_writes_the_profile_lossy_levels_then_follow(tmp_path, profile_dir, monkeypatch):
    from kvstore.connectors.reference import Engine
    from kvstore.connectors.reference.weights import DEFAULT_MODEL

    out = subprocess.run([sys.executable, "-m", "kvstore", "calibrate", "--model", str(DEFAULT_MODEL),
                          "--passages", "2", "--context", "512", "--forced", "64", "--groups", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    fp = Engine.load(DEFAULT_MODEL).kv_spec().fingerprint
    assert f"profile for model {fp.hex()[:16]}" in out.stdout
    profile = profiles.profile_for(fp)
    assert profile is not None and len(profile.layer_factors) == 6 and len(profile.sensitivity) == 3
    assert math.prod(profile.layer_factors) == pytest.approx(1.0, rel=1e-2)
    assert get_codec("aggressive").for_model(fp).options.layer_factors == profile.layer_factors
    for flags, said in ((["--context", "1000"], "--context must be a positive multiple of 256 tokens, got 1000"),
                        (["--fingerprint", ""], "--fingerprint must be hex (a KVSpec fingerprint), got ''"),
                        (["--profile-dir", "/etc/hostname"], "cannot write profiles to /etc/hostname")):
        bad = subprocess.run([sys.executable, "-m", "kvstore", "calibrate", "--model", str(DEFAULT_MODEL), *flags],
                             capture_output=True, text=True, timeout=120)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("kvstore: error: " + said), bad.stderr
