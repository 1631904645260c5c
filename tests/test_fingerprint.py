"""The model fingerprint covers everything that changes K or V: every weight byte, the whole
effective config, the compute dtype. A byte-identical copy elsewhere still shares."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import disk_config
from kvstore import fingerprint
from kvstore.connectors.hooks import KVHooks
from kvstore.connectors.reference import Engine, SamplingParams, build_tiny_model
from kvstore.connectors.reference.weights import DEFAULT_MODEL
from kvstore.fingerprint import checkpoint_digest, config_digest, file_digest, tensors_digest
from kvstore.store import KVStore


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "kvstore-digests"


def _copy(dst, src=DEFAULT_MODEL):
    shutil.copytree(src, dst)
    return dst


def _finetune_attention(model_dir, layers=(4, 5)):
    """What a LoRA merged into two layers' attention does: most tensors and bytes unchanged."""
    w = load_file(str(model_dir / "model.safetensors"))
    for layer in layers:
        name = f"model.layers.{layer}.self_attn.k_proj.weight"
        w[name] = w[name] * 1.01
    save_file(w, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def test_a_byte_anywhere_in_the_file_changes_the_digest(tmp_path):
    f = tmp_path / "w.bin"
    data = bytearray(os.urandom(3 << 20))
    f.write_bytes(bytes(data))
    before = file_digest(f)
    data[len(data) // 2 + 12345] ^= 1  # far from any of the old 16 sample points
    f.write_bytes(bytes(data))
    assert file_digest(f) != before


def test_digests_are_cached_until_the_file_changes(tmp_path, monkeypatch, digest_cache):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 100_000)
    reads = []
    real = fingerprint._hash_file
    monkeypatch.setattr(fingerprint, "_hash_file", lambda p, progress=None: reads.append(p) or real(p, progress))
    first = file_digest(f)
    assert file_digest(f) == first and len(reads) == 1  # a restart does not re-read it
    assert len(list(digest_cache.glob("*.json"))) == 1
    f.write_bytes(b"y" * 100_000)  # same size, new content and mtime
    assert file_digest(f) != first and len(reads) == 2
    os.utime(f, ns=(1, 1))  # a backdated mtime still changes ctime: digested again
    file_digest(f)
    assert len(reads) == 3


def test_an_unwritable_digest_cache_only_costs_a_re_read(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"z" * 1000)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    assert file_digest(f, cache_dir=blocker / "sub") == file_digest(f)


def test_checkpoint_digest_sees_a_two_layer_finetune_and_ignores_the_directory(tmp_path):
    original = checkpoint_digest(DEFAULT_MODEL)
    copy = _copy(tmp_path / "elsewhere" / "renamed")
    assert checkpoint_digest(copy) == original  # byte-identical copy: shares
    _finetune_attention(copy)
    assert checkpoint_digest(copy) != original


def test_config_digest_covers_what_changes_kv_and_ignores_paths():
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    base = config_digest(cfg)
    assert config_digest({**cfg, "_name_or_path": "/somewhere/else", "transformers_version": "9"}) == base
    for key, value in [("rope_theta", 50000.0), ("rms_norm_eps", 1e-6), ("sliding_window", 128),
                       ("rope_scaling", {"rope_type": "linear", "factor": 2.0}), ("head_dim", 16)]:
        assert config_digest({**cfg, key: value}) != base, key
    nested = {"text_config": {**cfg}}
    assert config_digest(nested) != config_digest({"text_config": {**cfg, "rope_theta": 1.0}})


def test_config_digest_of_objects_is_the_same_in_every_process():
    class Quant:  # no to_dict, default repr with a memory address
        def __init__(self, bits):
            self.bits = bits
    assert config_digest({"q": Quant(4)}) == config_digest({"q": Quant(4)})
    assert config_digest({"q": Quant(4)}) != config_digest({"q": Quant(8)})
    assert config_digest({"d": torch.float16}) != config_digest({"d": torch.bfloat16})


def test_tensors_digest_sees_every_weight():
    a = {"x": torch.zeros(1000), "y": torch.ones(3, dtype=torch.bfloat16)}
    b = {**a, "x": a["x"].clone()}
    b["x"][777] = 1e-7
    assert tensors_digest(a.items()) == tensors_digest(dict(a).items())
    assert tensors_digest(a.items()) != tensors_digest(b.items())
    assert tensors_digest(a.items()) != tensors_digest({**a, "y": a["y"].float()}.items())


# ---- the reference engine: 0 cross-model hits ------------------------------------------------

def _spec(model_dir, **kw):
    return Engine.load(model_dir, **kw).kv_spec()


def test_reference_engine_spec_covers_weights_config_and_copies(tmp_path):
    original = _spec(DEFAULT_MODEL)
    assert _spec(_copy(tmp_path / "a" / DEFAULT_MODEL.name)) == original
    ft = _copy(tmp_path / "b" / DEFAULT_MODEL.name)
    _finetune_attention(ft)
    assert _spec(ft).fingerprint != original.fingerprint
    for key, value in [("rope_theta", 50000.0), ("rms_norm_eps", 1e-3)]:
        d = _copy(tmp_path / key / DEFAULT_MODEL.name)
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        assert _spec(d).fingerprint != original.fingerprint, key
    assert _spec(DEFAULT_MODEL, dtype=torch.bfloat16).fingerprint != original.fingerprint


def test_models_built_in_memory_are_told_apart(tmp_path):
    from kvstore.connectors.reference.model import Transformer

    a = Engine(Transformer.load(build_tiny_model(tmp_path / "a", seed=1)))
    b = Engine(Transformer.load(build_tiny_model(tmp_path / "b", seed=2)))
    assert a.kv_spec().fingerprint != b.kv_spec().fingerprint


def test_a_finetuned_engine_gets_no_hits_on_the_originals_kv(tmp_path):
    cfg = disk_config(tmp_path / "kv", chunk=32, cpu=None, disk="32MiB")  # one directory, shared
    prompt = list(range(40, 200))
    params = SamplingParams(max_new_tokens=6)
    ft = _copy(tmp_path / "ft" / DEFAULT_MODEL.name)
    _finetune_attention(ft)
    engine = Engine.load(DEFAULT_MODEL)
    with KVStore(engine.kv_spec(), cfg) as store:
        engine.attach(KVHooks(store))
        engine.generate(prompt, params)
        assert store.lookup(prompt) == len(prompt)
    want = Engine.load(ft).generate(prompt, params)
    tuned = Engine.load(ft)
    with KVStore(tuned.kv_spec(), cfg) as store:
        tuned.attach(KVHooks(store))
        got = tuned.generate(prompt, params)
    assert got.hit_tokens == 0 and got.tokens == want.tokens
    torch.testing.assert_close(got.first_logits, want.first_logits, atol=1e-5, rtol=0)
