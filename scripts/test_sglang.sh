#!/usr/bin/env bash
# kvstore as SGLang's HiCache storage backend, against the real sglang 0.5.23 package (its storage
# interface, config and dynamic-backend factory), in its own venv. Run after scripts/test.sh.
. "$(dirname "$0")/engine_venv.sh"
VENV=${KVSTORE_SGLANG_VENV:-.venv-sglang}
engine_venv "$VENV"
# --no-deps: sglang's requirements include CUDA kernels (sgl-kernel, flashinfer) and a CUDA
# torch. These are the pure-Python modules its storage code imports on CPU; triton only because
# sglang.srt.utils imports it at the top.
"$VENV/bin/python" -m pip install --quiet --no-deps sglang==0.5.23 psutil pybase64 starlette msgspec pyzmq dill triton
KVSTORE_SGLANG_TESTS=1 exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_sglang_storage.py "$@"
