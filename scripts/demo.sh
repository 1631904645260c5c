#!/usr/bin/env bash
# Install kvstore and run its demo on embedded defaults (cpu + disk tiers, no server).
# Extra arguments go to `kvstore demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
. scripts/torch.sh
ensure_torch
"$PY" -m pip install --quiet -e ".[demo]"
exec "$PY" -m kvstore demo "$@"
