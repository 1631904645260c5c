"""docs/configuration.md is generated from the config dataclasses (#16): it must be current, and
every option must say what it is for (the comment on its line is its documentation)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_configuration_reference_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + "\n(regenerate: python scripts/config_reference.py)"


def test_every_option_is_documented():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import config_reference
    finally:
        sys.path.pop(0)
    assert config_reference.undocumented() == []
    text = (ROOT / "docs" / "configuration.md").read_text()
    for needle in ("`KVSTORE_CPU_CAPACITY`", "`--cpu-capacity`", "`KVSTORE_SERVE_TLS_CERT`", "`--metrics-port`",
                   "`KVSTORE_REMOTE_TLS_CA`", "`KVSTORE_CHUNK_SIZE`"):
        assert needle in text, needle
