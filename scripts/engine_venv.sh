# Sourced (not run) by the test steps that need an engine package in a venv of its own: it moves
# to the project root and defines engine_venv. Such packages pin versions the main environment
# must not get, so each lives in its own venv that still sees the main one's torch and kvstore.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# engine_venv DIR: create DIR once (with --system-site-packages); later runs reuse it.
engine_venv() {
    if [ ! -x "$1/bin/python" ]; then
        "${PYTHON:-python3}" -m venv --system-site-packages "$1"
    fi
}
