#!/usr/bin/env bash
# Install kvstore and run its demo on embedded defaults (cpu + disk tiers, no server).
# Extra arguments go to `kvstore demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A bare `pip install torch` pulls a multi-GB CUDA build; the CPU build is enough and is what
# these machines carry.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[demo]"
exec "$PY" -m kvstore demo "$@"
