#!/usr/bin/env bash
# The LMCache compatibility test against the real lmcache 0.5.6 package, in its own venv
# (lmcache pins packages the main environment should not get). Run after scripts/test.sh.
. "$(dirname "$0")/engine_venv.sh"
VENV=${KVSTORE_LMCACHE_VENV:-.venv-lmcache}
engine_venv "$VENV"
# --no-deps: its CUDA-only requirements (cupy-cuda13x, cuda-python, cufile-python) cannot install
# here; these are the pure-Python ones the engine and its lm:// connector import on CPU.
"$VENV/bin/python" -m pip install --quiet --no-deps lmcache==0.5.6
"$VENV/bin/python" -m pip install --quiet psutil numba cachetools transformers aiofile msgspec pyzmq py-cpuinfo
KVSTORE_LMCACHE_TESTS=1 exec "$VENV/bin/python" -m pytest -q tests/test_lmcache_engine.py "$@"
