"""Prefix reuse for plain transformers generate(), across calls and across processes."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import disk_config
from kvstore.connectors.reference import build_tiny_model
from kvstore.errors import InvalidInputError

transformers = pytest.importorskip("transformers")  # a dev dependency: present wherever tests run
from kvstore.connectors.hf import HFConnector, spec_for  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("hf"), seed=5, dtype=torch.float32)


def load(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def test_generate_reuses_the_prefix_with_identical_output(tmp_path, model_dir):
    model = load(model_dir)
    ids = torch.arange(10, 150)[None]
    want = model.generate(ids, max_new_tokens=10, do_sample=False)
    with HFConnector(model, disk_config(tmp_path / "kv", chunk=32, disk="32MiB")) as conn:
        first = conn.generate(ids, max_new_tokens=10, do_sample=False)
        assert conn.last_hit_tokens == 0 and torch.equal(first, want)
        conn.flush()
        again = conn.generate(ids, max_new_tokens=10, do_sample=False)
        assert conn.last_hit_tokens == 139 and torch.equal(again, want)
        other = torch.cat([ids[:, :70], torch.arange(300, 340)[None]], dim=1)
        got = conn.generate(other, max_new_tokens=10, do_sample=False)
        assert conn.last_hit_tokens == 64
        assert torch.equal(got, model.generate(other, max_new_tokens=10, do_sample=False))


def test_another_process_reuses_the_cache(tmp_path, model_dir):
    cfg = disk_config(tmp_path / "kv", chunk=32, cpu=None, disk="32MiB")
    script = textwrap.dedent(f"""
        import json, torch, transformers
        from kvstore.connectors.hf import HFConnector
        model = transformers.AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32)
        with HFConnector(model, {cfg!r}) as conn:
            out = conn.generate(torch.arange(10, 150)[None], max_new_tokens=6, do_sample=False)
            print(json.dumps({{"hit": conn.last_hit_tokens, "tokens": out[0].tolist()}}))
    """)
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first["hit"] == 0 and second["hit"] == 139
    assert first["tokens"] == second["tokens"]


def test_spec_separates_checkpoints(tmp_path, model_dir):
    other = build_tiny_model(tmp_path / "other", seed=6, dtype=torch.float32)
    assert spec_for(load(model_dir)).fingerprint != spec_for(load(other)).fingerprint


def test_batch_of_two_is_refused(tmp_path, model_dir):
    with HFConnector(load(model_dir), disk_config(tmp_path / "kv")) as conn:
        with pytest.raises(InvalidInputError, match="batch size 1"):
            conn.generate(torch.ones(2, 5, dtype=torch.long), max_new_tokens=1)


@pytest.mark.parametrize("kind, extra", [
    ("sliding window", {"family": "mistral", "sliding_window": 48}),
    ("dynamic rope", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
])
def test_models_whose_prefix_kv_is_not_reusable_bypass_the_cache(tmp_path, kind, extra):
    """A sliding-window DynamicCache holds only the window, and dynamic RoPE makes a prefix's
    keys depend on the sequence length: reusing either would hand generate() wrong KV."""
    family = extra.pop("family", "llama")
    d = build_tiny_model(tmp_path / "m", family=family, seed=8, dtype=torch.float32)
    model = load(d)
    if "sliding_window" in extra:
        model.config.sliding_window = extra["sliding_window"]
    if "rope_scaling" in extra:
        model.config.rope_scaling = extra["rope_scaling"]
    ids = torch.arange(10, 54)[None]
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    with HFConnector(model, disk_config(tmp_path / "kv", chunk=16, disk="32MiB")) as conn:
        assert conn.bypass, kind
        for _ in range(2):
            assert torch.equal(conn.generate(ids, max_new_tokens=8, do_sample=False), want)
            assert conn.last_hit_tokens == 0
        conn.flush()
        assert conn.store.lookup(ids[0].tolist()) == 0  # nothing was stored
